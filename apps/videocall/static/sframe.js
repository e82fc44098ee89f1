// SFrame (RFC 9605) for the browser participant, with WebCrypto.
//
// The same frame layout as the gateway's Python module (gateways/webrtc/sframe.py), so
// the browser and the aiortc participant open each other's frames:
//
//   frame[:clear] | SFrame header | AES-GCM(frame[clear:]) incl. 16-byte tag
//   aad   = header || frame[:clear]     (the clear bytes are SFrame metadata)
//   nonce = sframe_salt XOR CTR         (CTR as a 12-byte big-endian integer)
//
// clear = 10 for a VP8 key frame, 3 for a VP8 delta frame (bit 0 of byte 0 tells
// which, and it stays readable), 0 for Opus. Keys (RFC 9605 4.4.2), with the suite's
// hash, KID as 8 bytes and the suite as 2 bytes, big-endian:
//
//   sframe_secret = HKDF-Extract("", base_key)
//   sframe_key    = HKDF-Expand(secret, "SFrame 1.0 Secret key "  || KID || suite, Nk)
//   sframe_salt   = HKDF-Expand(secret, "SFrame 1.0 Secret salt " || KID || suite, 12)
//
// Only the AES-GCM suites: WebCrypto has no compound AES-CTR + HMAC AEAD and the
// gateway offers only these two. KIDs and CTRs are BigInts (up to 2^64 - 1).
//
// This module runs in the page and in the RTCRtpScriptTransform worker
// (sframe-worker.js). No key bytes are ever logged or put in stats.

export const AES_128_GCM_SHA256_128 = 0x0004;
export const AES_256_GCM_SHA512_128 = 0x0005;

const SUITES = new Map([
  [AES_128_GCM_SHA256_128, { hash: 'SHA-256', nk: 16, nn: 12, nt: 16 }],
  [AES_256_GCM_SHA512_128, { hash: 'SHA-512', nk: 32, nn: 12, nt: 16 }],
]);

export const VP8_KEY_FRAME_CLEAR = 10;
export const VP8_DELTA_FRAME_CLEAR = 3;
export const OPUS_CLEAR_BYTES = 0;   // as gateways/webrtc/media.py: Opus is sealed whole

const MAX_U64 = (1n << 64n) - 1n;
const KEY_LABEL = new TextEncoder().encode('SFrame 1.0 Secret key ');
const SALT_LABEL = new TextEncoder().encode('SFrame 1.0 Secret salt ');

export class SFrameError extends Error {}
export class MalformedFrame extends SFrameError {}
export class UnknownKey extends SFrameError {}
export class AuthenticationFailed extends SFrameError {}
export class CounterExhausted extends SFrameError {}

function suiteParams(suite) {
  const params = SUITES.get(suite);
  if (!params) throw new SFrameError(`cipher suite ${suite} is not supported here`);
  return params;
}

function u64(name, value) {
  const v = BigInt(value);
  if (v < 0n || v > MAX_U64) throw new RangeError(`${name} must be in [0, 2^64 - 1]`);
  return v;
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let pos = 0;
  for (const p of parts) {
    out.set(p, pos);
    pos += p.length;
  }
  return out;
}

function minimalBytes(value) {
  const out = [];
  for (let v = value; v > 0n; v >>= 8n) out.unshift(Number(v & 0xffn));
  return out;
}

function bigEndian(value, length) {
  const out = new Uint8Array(length);
  let v = value;
  for (let i = length - 1; i >= 0; i--, v >>= 8n) out[i] = Number(v & 0xffn);
  return out;
}

// -- header (RFC 9605 4.3): config byte X|KKK|Y|CCC, then KID and CTR bytes ------------

export function encodeHeader(kid, ctr) {
  const k = u64('kid', kid);
  const c = u64('ctr', ctr);
  let config = 0;
  const tail = [];
  if (k < 8n) {
    config |= Number(k) << 4;
  } else {
    const bytes = minimalBytes(k);
    config |= 0x80 | ((bytes.length - 1) << 4);
    tail.push(...bytes);
  }
  if (c < 8n) {
    config |= Number(c);
  } else {
    const bytes = minimalBytes(c);
    config |= 0x08 | (bytes.length - 1);
    tail.push(...bytes);
  }
  return Uint8Array.of(config, ...tail);
}

function readField(data, pos, extended, bits, name) {
  if (!extended) return [BigInt(bits), pos];
  const length = bits + 1;
  if (pos + length > data.length) throw new MalformedFrame(`truncated SFrame header (${name})`);
  const raw = data.subarray(pos, pos + length);
  // Non-minimal encodings are refused, as in the Python module: one header per value.
  if ((length > 1 && raw[0] === 0) || (length === 1 && raw[0] < 8)) {
    throw new MalformedFrame(`SFrame header ${name} is not minimally encoded`);
  }
  let value = 0n;
  for (const b of raw) value = (value << 8n) | BigInt(b);
  return [value, pos + length];
}

export function decodeHeader(data) {
  if (data.length === 0) throw new MalformedFrame('empty input: no SFrame header');
  const config = data[0];
  const [kid, pos] = readField(data, 1, (config & 0x80) !== 0, (config >> 4) & 0x07, 'KID');
  const [ctr, end] = readField(data, pos, (config & 0x08) !== 0, config & 0x07, 'CTR');
  return { kid, ctr, length: end };
}

// -- keys (RFC 9605 4.4.2) ----------------------------------------------------------

function label(prefix, suite, kid) {
  return concat(prefix, bigEndian(u64('kid', kid), 8), bigEndian(BigInt(suite), 2));
}

// sframe_key and sframe_salt as bytes (the self-test compares them with RFC 9605 C.4).
export async function deriveSecrets(suite, kid, baseKey) {
  const p = suiteParams(suite);
  const ikm = await crypto.subtle.importKey('raw', baseKey, 'HKDF', false, ['deriveBits']);
  // WebCrypto's HKDF is Extract then Expand; an empty salt is HMAC's all-zero key,
  // which RFC 5869 prescribes for "no salt".
  const expand = async (prefix, bytes) => new Uint8Array(await crypto.subtle.deriveBits(
    { name: 'HKDF', hash: p.hash, salt: new Uint8Array(0), info: label(prefix, suite, kid) },
    ikm, bytes * 8));
  return { key: await expand(KEY_LABEL, p.nk), salt: await expand(SALT_LABEL, p.nn) };
}

// The key of one KID, ready for AES-GCM: a non-extractable CryptoKey and the salt.
export async function deriveKeyMaterial(suite, kid, baseKey) {
  const { key, salt } = await deriveSecrets(suite, kid, baseKey);
  const aes = await crypto.subtle.importKey('raw', key, 'AES-GCM', false, ['encrypt', 'decrypt']);
  key.fill(0);
  return { suite, kid: u64('kid', kid), key: aes, salt, tagBits: suiteParams(suite).nt * 8 };
}

export function makeNonce(salt, ctr) {
  const c = bigEndian(u64('ctr', ctr), salt.length);
  return c.map((b, i) => b ^ salt[i]);
}

// -- frames -------------------------------------------------------------------------

// header || AEAD(plaintext), aad = header || metadata. The caller never repeats a CTR.
export async function encryptFrame(km, ctr, plaintext, metadata = new Uint8Array(0)) {
  const header = encodeHeader(km.kid, ctr);
  const sealed = await crypto.subtle.encrypt(
    { name: 'AES-GCM', iv: makeNonce(km.salt, ctr), additionalData: concat(header, metadata),
      tagLength: km.tagBits },
    km.key, plaintext);
  return concat(header, new Uint8Array(sealed));
}

// `lookup(kid)` gives the key material of a KID this side may open, or undefined.
export async function decryptFrame(lookup, data, metadata = new Uint8Array(0)) {
  const { kid, ctr, length } = decodeHeader(data);
  const km = lookup(kid);
  if (!km) throw new UnknownKey(`no key for KID ${kid}`);
  const header = data.subarray(0, length);
  let plaintext;
  try {
    plaintext = await crypto.subtle.decrypt(
      { name: 'AES-GCM', iv: makeNonce(km.salt, ctr), additionalData: concat(header, metadata),
        tagLength: km.tagBits },
      km.key, data.subarray(length));
  } catch {
    throw new AuthenticationFailed('SFrame authentication failed');
  }
  return { kid, ctr, plaintext: new Uint8Array(plaintext) };
}

// frame[:clear] || SFrame(frame[clear:]), the clear bytes bound as metadata.
export async function protect(km, ctr, frame, clear) {
  if (clear < 0 || clear > frame.length) {
    throw new MalformedFrame(`cannot keep ${clear} bytes of a ${frame.length}-byte frame clear`);
  }
  const prefix = frame.slice(0, clear);
  return concat(prefix, await encryptFrame(km, ctr, frame.subarray(clear), prefix));
}

export async function unprotect(lookup, data, clear) {
  if (data.length < clear) throw new MalformedFrame('protected frame shorter than its clear prefix');
  const prefix = data.slice(0, clear);
  const { kid, ctr, plaintext } = await decryptFrame(lookup, data.subarray(clear), prefix);
  return { kid, ctr, frame: concat(prefix, plaintext) };
}

export function vp8ClearBytes(frame) {
  if (frame.length === 0) throw new MalformedFrame('empty VP8 frame');
  // Bit 0 of the VP8 frame tag is the inverse key-frame flag (RFC 6386 9.1).
  const clear = frame[0] & 0x01 ? VP8_DELTA_FRAME_CLEAR : VP8_KEY_FRAME_CLEAR;
  if (frame.length < clear) throw new MalformedFrame('VP8 frame shorter than its header');
  return clear;
}

export function clearBytes(kind, frame) {
  return kind === 'video' ? vp8ClearBytes(frame) : OPUS_CLEAR_BYTES;
}

function fromBase64(text) {
  return Uint8Array.from(atob(text), (ch) => ch.charCodeAt(0));
}

// -- one participant's frame crypto ---------------------------------------------------

// Keys by KID as the gateway hands them over (gateways/webrtc/handoff.py), the send
// counters, and the counters the page shows. Key messages are applied in order (an
// activate waits for the derivation of its install); frames use whatever is current.
export class FrameCrypto {
  constructor() {
    this.epochs = new Map();     // epoch -> { sendKid, recvKid, source, keyId }
    this.material = new Map();   // KID (BigInt) -> key material
    this.recvKids = new Set();   // KIDs the peer sends under: the only ones opened
    this.active = null;          // the epoch sent under, null: frames are dropped
    this.nextCtr = new Map();    // send KID -> next CTR
    this.ctrBase = 0n;           // this page's counter range (see 'hello')
    this.ctrLimit = 1n << 32n;
    this.pending = Promise.resolve();
    this.stats = {
      frames_encrypted: 0, frames_decrypted: 0, decrypt_failures: 0, unknown_kid: 0,
      dropped_no_key: 0, malformed: 0, rotations: 0, send_kid: null, epoch: null,
      source: null, key_id: null, keys_held: 0,
      // Per-kind: the page compares them with the browser's own encoder and decoder
      // counts, which would run ahead if frames bypassed SFrame.
      video_send_frames: 0, video_frames_opened: 0,
    };
  }

  handle(message) {
    this.pending = this.pending.then(() => this.apply(message)).catch((err) => {
      console.error(`SFrame: could not apply a ${message.type} key message: ${err.name}`);
    });
    return this.pending;
  }

  async apply(m) {
    switch (m.type) {
      case 'hello':
        // A new connection to the gateway: it replays the keys held now, under a counter
        // range no earlier connection of this gateway run has used (its keys may be the
        // same as before a reload, its counters must not be).
        this.dropAll();
        this.ctrBase = BigInt(m.ctr_base);
        this.ctrLimit = this.ctrBase + (1n << 32n);
        this.nextCtr.clear();
        break;
      case 'install': {
        const send = await deriveKeyMaterial(m.suite, m.send_kid, fromBase64(m.send_key));
        const recv = await deriveKeyMaterial(m.suite, m.recv_kid, fromBase64(m.recv_key));
        this.material.set(send.kid, send);
        this.material.set(recv.kid, recv);
        this.recvKids.add(recv.kid);
        this.epochs.set(m.epoch, { epoch: m.epoch, sendKid: send.kid, recvKid: recv.kid,
          source: m.source, keyId: m.key_id });
        break;
      }
      case 'activate': {
        const ep = this.epochs.get(m.epoch);
        if (!ep) {
          console.error(`SFrame: activate of epoch ${m.epoch}, which was never installed`);
          break;
        }
        this.active = ep;
        this.stats.rotations += 1;
        break;
      }
      case 'retire': {
        const ep = this.epochs.get(m.epoch);
        if (!ep) break;
        this.epochs.delete(m.epoch);
        this.material.delete(ep.sendKid);
        this.material.delete(ep.recvKid);
        this.recvKids.delete(ep.recvKid);
        if (this.active === ep) this.active = null;
        break;
      }
      case 'invalidate':
        this.dropAll();
        break;
      default:
        break;
    }
    this.refreshKeyStats();
  }

  dropAll() {
    this.epochs.clear();
    this.material.clear();
    this.recvKids.clear();
    this.active = null;
    this.refreshKeyStats();
  }

  refreshKeyStats() {
    const ep = this.active;
    this.stats.send_kid = ep ? Number(ep.sendKid) : null;
    this.stats.epoch = ep ? ep.epoch : null;
    this.stats.source = ep ? ep.source : null;
    this.stats.key_id = ep ? ep.keyId : null;
    this.stats.keys_held = this.epochs.size;
  }

  // The protected frame, or null: not sent (no key, or not a frame we can protect).
  async seal(kind, data) {
    if (kind === 'video') this.stats.video_send_frames += 1;
    const ep = this.active;
    if (!ep) {
      this.stats.dropped_no_key += 1;   // fail closed: never sent in clear
      return null;
    }
    const frame = new Uint8Array(data);
    let clear;
    try {
      clear = clearBytes(kind, frame);
    } catch {
      this.stats.malformed += 1;
      return null;
    }
    const km = this.material.get(ep.sendKid);
    const ctr = this.nextCtr.get(ep.sendKid) ?? this.ctrBase;
    if (ctr >= this.ctrLimit) {
      this.stats.dropped_no_key += 1;   // this page's counter range of the KID is used up
      return null;
    }
    this.nextCtr.set(ep.sendKid, ctr + 1n);   // taken before the await: never twice
    const out = await protect(km, ctr, frame, clear);
    this.stats.frames_encrypted += 1;
    return out;
  }

  // The original frame, or null: dropped and counted, never passed on garbled.
  async open(kind, data) {
    const sealed = new Uint8Array(data);
    try {
      const { frame } = await unprotect(
        (kid) => (this.recvKids.has(kid) ? this.material.get(kid) : undefined),
        sealed, clearBytes(kind, sealed));
      this.stats.frames_decrypted += 1;
      if (kind === 'video') this.stats.video_frames_opened += 1;
      return frame;
    } catch (err) {
      if (err instanceof UnknownKey) this.stats.unknown_kid += 1;
      else if (err instanceof AuthenticationFailed) this.stats.decrypt_failures += 1;
      else this.stats.malformed += 1;
      return null;
    }
  }

  // A TransformStream of RTCEncoded{Video,Audio}Frames for one sender or receiver.
  transform(side, kind) {
    const step = side === 'send' ? (d) => this.seal(kind, d) : (d) => this.open(kind, d);
    return new TransformStream({
      async transform(encoded, controller) {
        const out = await step(encoded.data);
        if (out === null) return;   // dropped: the frame goes nowhere
        encoded.data = out.buffer;
        controller.enqueue(encoded);
      },
    });
  }
}
