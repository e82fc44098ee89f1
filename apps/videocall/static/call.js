// The browser participant of a quantum-keyed video call.
//
// Address: /?room=R&name=N#keys=<the local gateway's key URL, URL-encoded>. The
// fragment never leaves the browser, so the signalling server never sees where the
// keys come from (nor the token in that URL). The keys come from this participant's
// own gateway (gateways/webrtc/handoff.py) over a loopback WebSocket; the page seals
// and opens every media frame with SFrame (sframe.js) before RTP sees it.
//
// Frame hook: RTCRtpScriptTransform with a worker (sframe-worker.js) where the browser
// has it (recent Chromium, Firefox, Safari); otherwise Chromium's older insertable
// streams (createEncodedStreams) on the main thread. `&transform=streams` forces the
// latter. Both are tested in headless Chromium 156 (tests/gateways/webrtc/test_browser.py).

import { FrameCrypto } from './sframe.js';

const $ = (id) => document.getElementById(id);
const SOURCE_NAMES = {
  qkd: 'QKD: quantum key distribution',
  hybrid: 'Hybrid: QKD + ML-KEM-768',
  pqc: 'PQC: ML-KEM-768 (no QKD key)',
};
const STATS_INTERVAL_MS = 1000;
const ICE_GATHERING_TIMEOUT_MS = 5000;
const KEYS_RECONNECT_MS = 2000;
// Frames the encoder (decoder) may be ahead of the SFrame counters by, in flight or
// not yet reported by the worker, before the page assumes a bypass (see Guard).
const BYPASS_SLACK_FRAMES = 45;

const params = new URLSearchParams(location.search);
const room = params.get('room') || 'quantum';
const name = params.get('name') || 'browser';

// -- where the keys come from ------------------------------------------------------

function keysUrl() {
  const raw = new URLSearchParams(location.hash.slice(1)).get('keys');
  if (!raw) return null;
  let url;
  try {
    url = new URL(raw);
  } catch {
    return null;
  }
  // Only a gateway on this machine may hand over keys: a link whose fragment names
  // some other host would have the page encrypt under keys a stranger chose. (The
  // page's CSP allows the same two names: CSP cannot name an IPv6 literal.)
  const loopback = ['127.0.0.1', 'localhost'].includes(url.hostname);
  return url.protocol === 'ws:' && loopback ? url.href : null;
}

// -- the frame hook: worker transform or insertable streams --------------------------

class ScriptTransformCrypto {
  constructor() {
    this.mode = 'script-transform';
    this.worker = new Worker(new URL('./sframe-worker.js', import.meta.url), { type: 'module' });
    this.counters = {};
    this.ready = new Promise((resolve) => {
      this.worker.onmessage = (event) => {
        if (event.data.type === 'stats') this.counters = event.data.stats;
        if (event.data.type === 'ready') resolve();
      };
    });
  }

  peerConfig() {
    return {};
  }

  keyMessage(message) {
    this.worker.postMessage(message);
  }

  attach(senderOrReceiver, side, kind) {
    senderOrReceiver.transform = new RTCRtpScriptTransform(this.worker, { side, kind });
  }

  stats() {
    return this.counters;
  }
}

class InsertableStreamsCrypto {
  constructor() {
    this.mode = 'insertable-streams';
    this.frames = new FrameCrypto();
    this.ready = Promise.resolve();
  }

  peerConfig() {
    return { encodedInsertableStreams: true };
  }

  keyMessage(message) {
    this.frames.handle(message);
  }

  attach(senderOrReceiver, side, kind) {
    // With encodedInsertableStreams every sender and receiver must be piped, or no media.
    const { readable, writable } = senderOrReceiver.createEncodedStreams();
    readable.pipeThrough(this.frames.transform(side, kind)).pipeTo(writable)
      .catch((err) => console.error(`SFrame ${side} ${kind} stream stopped: ${err.name}`));
  }

  stats() {
    return this.frames.stats;
  }
}

function makeCrypto() {
  const forced = params.get('transform');
  if (forced !== 'streams' && 'RTCRtpScriptTransform' in window) return new ScriptTransformCrypto();
  if ('createEncodedStreams' in RTCRtpSender.prototype) return new InsertableStreamsCrypto();
  return null;
}

// -- what the page shows -----------------------------------------------------------

const ui = {
  status(text) {
    $('status').textContent = text;
  },
  keyState(text) {
    $('key-state').textContent = text;
  },
  show(stats) {
    $('key-source').textContent = stats.source ? (SOURCE_NAMES[stats.source] || stats.source) : '—';
    $('key-source').dataset.source = stats.source || 'none';
    $('key-id').textContent = stats.key_id || (stats.source === 'pqc' ? '(ML-KEM only)' : '—');
    $('send-kid').textContent = stats.send_kid ?? '—';
    $('epoch').textContent = stats.epoch ?? '—';
    $('rotations').textContent = stats.rotations;
    $('frames-encrypted').textContent = stats.frames_encrypted;
    $('frames-decrypted').textContent = stats.frames_decrypted;
    $('decrypt-failures').textContent = stats.decrypt_failures;
    $('unknown-kid').textContent = stats.unknown_kid;
    $('dropped-no-key').textContent = stats.dropped_no_key;
    $('video-decoded').textContent = stats.video_frames_decoded;
    $('video-size').textContent = stats.video_width ? `${stats.video_width}×${stats.video_height}` : '—';
    $('connection').textContent = stats.connection_state;
    $('transform').textContent = stats.transform;
  },
};

// -- the keys socket ---------------------------------------------------------------

function connectKeys(url, media, socket) {
  const ws = new WebSocket(url);
  socket.current = ws;
  ws.onopen = () => ui.keyState('connected to the local gateway');
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    media.keyMessage(message);
    if (message.type === 'invalidate') ui.keyState(`keys dropped: ${message.reason}`);
    if (message.type === 'activate') ui.keyState('sending under a fresh key');
  };
  ws.onclose = () => {
    // Fail closed: without its gateway the page would never hear of a retire or an
    // invalidate, so it stops using the keys it has.
    media.keyMessage({ type: 'invalidate', reason: 'the local gateway went away' });
    ui.keyState('local gateway unreachable: nothing is sent (retrying)');
    socket.current = null;
    setTimeout(() => connectKeys(url, media, socket), KEYS_RECONNECT_MS);
  };
}

// -- the call ----------------------------------------------------------------------

function preferCodec(transceiver, kind) {
  // Only VP8 and Opus have an SFrame clear-byte layout agreed with the aiortc side.
  const mime = kind === 'video' ? 'video/vp8' : 'audio/opus';
  const codecs = RTCRtpReceiver.getCapabilities(kind).codecs
    .filter((c) => c.mimeType.toLowerCase() === mime);
  transceiver.setCodecPreferences(codecs);
}

function iceGathered(pc) {
  // ICE is not trickled: the SDP goes out with every candidate in it.
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== 'complete') return;
      pc.removeEventListener('icegatheringstatechange', done);
      resolve();
    };
    pc.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, ICE_GATHERING_TIMEOUT_MS);
    done();
  });
}

class Call {
  constructor(media, localStream, signal) {
    this.media = media;
    this.localStream = localStream;
    this.signal = signal;
    this.pc = null;
    this.remoteStream = null;
    this.baseline = { sent: 0, opened: 0 };
  }

  newPeer() {
    this.hangUp();
    const pc = new RTCPeerConnection({ iceServers: [], ...this.media.peerConfig() });
    this.remoteStream = new MediaStream();
    $('remote').srcObject = this.remoteStream;
    pc.ontrack = (event) => this.remoteStream.addTrack(event.track);
    pc.onconnectionstatechange = () => ui.status(`call ${pc.connectionState}`);
    this.pc = pc;
    const counters = this.media.stats();   // the bypass guard counts from here
    this.baseline = { sent: counters.video_send_frames ?? 0,
      opened: counters.video_frames_opened ?? 0 };
    return pc;
  }

  wire(transceiver, kind) {
    preferCodec(transceiver, kind);
    this.media.attach(transceiver.sender, 'send', kind);
    this.media.attach(transceiver.receiver, 'recv', kind);
  }

  async offer() {
    const pc = this.newPeer();
    for (const track of this.localStream.getTracks()) {
      const transceiver = pc.addTransceiver(track, {
        direction: 'sendrecv', streams: [this.localStream] });
      this.wire(transceiver, track.kind);
    }
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc);
    this.signal({ type: 'offer', sdp: pc.localDescription.sdp });
    ui.status('offer sent, waiting for the answer');
  }

  async answer(sdp) {
    const pc = this.newPeer();
    // Transceivers are made and hooked before the offer is applied: Chromium passes
    // the frames of a transceiver that setRemoteDescription creates straight through,
    // unencrypted, even once a transform is set on it. addTrack's transceivers are
    // the ones an offer's m-lines take over (JSEP 5.10).
    const wired = new Set();
    for (const track of this.localStream.getTracks()) {
      const sender = pc.addTrack(track, this.localStream);
      const transceiver = pc.getTransceivers().find((t) => t.sender === sender);
      this.wire(transceiver, track.kind);
      wired.add(transceiver);
    }
    await pc.setRemoteDescription({ type: 'offer', sdp });
    for (const transceiver of pc.getTransceivers()) {
      // An m-line beyond our own tracks would carry media without SFrame: refuse it.
      if (!wired.has(transceiver)) transceiver.direction = 'inactive';
    }
    await pc.setLocalDescription(await pc.createAnswer());
    await iceGathered(pc);
    this.signal({ type: 'answer', sdp: pc.localDescription.sdp });
    ui.status('answer sent, connecting');
  }

  async accept(sdp) {
    if (this.pc) await this.pc.setRemoteDescription({ type: 'answer', sdp });
  }

  hangUp() {
    if (this.pc) this.pc.close();
    this.pc = null;
  }

  async videoStats() {
    const out = { video_frames_decoded: 0, video_frames_encoded: 0, video_width: null,
      video_height: null };
    if (!this.pc) return out;
    (await this.pc.getStats()).forEach((s) => {
      if (s.kind !== 'video') return;
      if (s.type === 'outbound-rtp') out.video_frames_encoded += s.framesEncoded || 0;
      if (s.type !== 'inbound-rtp') return;
      out.video_frames_decoded += s.framesDecoded || 0;
      out.video_width = s.frameWidth ?? out.video_width;
      out.video_height = s.frameHeight ?? out.video_height;
    });
    return out;
  }
}

function joinRoom(call) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}/ws`);
  call.signal = (message) => ws.send(JSON.stringify(message));
  let queue = Promise.resolve();   // one signalling message at a time, in order
  const handle = async (message) => {
    switch (message.type) {
      case 'joined':
        $('room').textContent = message.room;
        if (message.offerer) await call.offer();
        else ui.status('waiting for the other participant');
        break;
      case 'offer':
        await call.answer(message.sdp);
        break;
      case 'answer':
        await call.accept(message.sdp);
        break;
      case 'left':
      case 'bye':
        call.hangUp();
        ui.status('the other participant left; waiting for the next one');
        break;
      case 'error':
        ui.status(`signalling: ${message.message}`);
        break;
      default:
        break;
    }
  };
  ws.onopen = () => ws.send(JSON.stringify({ type: 'join', room, name }));
  ws.onmessage = (event) => {
    const message = JSON.parse(event.data);
    queue = queue.then(() => handle(message)).catch((err) => {
      console.error(`call: ${message.type} failed: ${err}`);
      ui.status(`call failed: ${err.message}`);
    });
  };
  ws.onclose = () => ui.status('signalling server disconnected');
  window.addEventListener('pagehide', () => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'bye' }));
  });
}

// -- the bypass guard ----------------------------------------------------------------

// Chromium hands a transceiver's frames straight to RTP, unencrypted, when its
// transform is not in place the way it expects (see Call.answer). Should that happen
// in some other way, the encoder would count more video frames than reached the
// SFrame sender, or the decoder more than SFrame opened: then the call is ended.
class Guard {
  constructor() {
    this.pc = null;
    this.strikes = 0;
    this.tripped = false;
  }

  check(stats, call) {
    if (!call.pc) return;
    if (call.pc !== this.pc) {   // a new call: getStats counts from zero again
      this.pc = call.pc;
      this.strikes = 0;
      this.tripped = false;
    }
    if (this.tripped) return;
    const unsealed = stats.video_frames_encoded - (stats.video_send_frames - call.baseline.sent);
    const unopened = stats.video_frames_decoded
      - (stats.video_frames_opened - call.baseline.opened);
    if (unsealed <= BYPASS_SLACK_FRAMES && unopened <= BYPASS_SLACK_FRAMES) {
      this.strikes = 0;
      return;
    }
    this.strikes += 1;
    if (this.strikes < 2) return;   // one report may lag behind a burst
    this.tripped = true;
    call.signal({ type: 'bye' });
    call.hangUp();
    ui.status('call ended: video was bypassing end-to-end encryption in this browser');
  }
}

// -- stats -------------------------------------------------------------------------

function reportStats(media, call, keySocket) {
  const guard = new Guard();
  setInterval(async () => {
    const counters = media.stats();
    const stats = {
      type: 'stats',
      frames_encrypted: counters.frames_encrypted ?? 0,
      frames_decrypted: counters.frames_decrypted ?? 0,
      decrypt_failures: counters.decrypt_failures ?? 0,
      unknown_kid: counters.unknown_kid ?? 0,
      dropped_no_key: counters.dropped_no_key ?? 0,
      malformed: counters.malformed ?? 0,
      rotations: counters.rotations ?? 0,
      video_send_frames: counters.video_send_frames ?? 0,
      video_frames_opened: counters.video_frames_opened ?? 0,
      send_kid: counters.send_kid ?? null,
      epoch: counters.epoch ?? null,
      source: counters.source ?? null,
      key_id: counters.key_id ?? null,
      ...(await call.videoStats()),
      connection_state: call.pc ? call.pc.connectionState : 'new',
      transform: media.mode,
    };
    guard.check(stats, call);
    stats.bypass_detected = guard.tripped;
    window.qgwStats = stats;
    ui.show(stats);
    const ws = keySocket.current;
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(stats));
  }, STATS_INTERVAL_MS);
}

async function main() {
  $('participant').textContent = name;
  const url = keysUrl();
  if (!url) {
    $('needs-gateway').hidden = false;
    return;
  }
  if (!window.isSecureContext) {
    $('insecure').hidden = false;
    return;
  }
  const media = makeCrypto();
  if (!media) {
    $('no-transform').hidden = false;
    return;
  }
  $('call').hidden = false;
  const keySocket = { current: null };
  connectKeys(url, media, keySocket);
  ui.status('starting the camera');
  const localStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
  $('local').srcObject = localStream;
  await media.ready;
  const call = new Call(media, localStream, null);
  reportStats(media, call, keySocket);
  joinRoom(call);
}

main().catch((err) => {
  console.error(`call: ${err}`);
  ui.status(`cannot start: ${err.message}`);
});
