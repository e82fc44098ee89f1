"""SFrame (RFC 9605): end-to-end authenticated encryption of media frames.

An SFrame ciphertext is a short header followed by the AEAD encryption of the frame:

    +--------------+---------------------------------------+
    | header       | AEAD.Encrypt(sframe_key, nonce, aad,  |
    | (1-17 bytes) |              plaintext) incl. the tag |
    +--------------+---------------------------------------+
    aad   = header || metadata            (metadata: application bytes, not sent here)
    nonce = sframe_salt XOR CTR           (CTR as an AEAD.Nn-byte big-endian integer)

The header (section 4.3) is a config byte `X|KKK|Y|CCC` then the KID and the CTR as
minimal big-endian integers. A value below 8 is carried inline in KKK (CCC) with X (Y)
clear; otherwise X (Y) is set, KKK (CCC) holds the byte length minus one and the bytes
follow the config byte, KID first. Encodings that are not minimal are rejected.

Keys (section 4.4.2), with the suite's hash for HKDF, KID as 8 bytes and the suite as
2 bytes, both big-endian:

    sframe_secret = HKDF-Extract("", base_key)
    sframe_key    = HKDF-Expand(sframe_secret, "SFrame 1.0 Secret key "  || KID || suite, Nk)
    sframe_salt   = HKDF-Expand(sframe_secret, "SFrame 1.0 Secret salt " || KID || suite, Nn)

All five RFC 9605 cipher suites are implemented: AES-GCM (0x0004, 0x0005) and the
AES-CTR + truncated HMAC-SHA256 compound AEAD of section 4.5.1 (0x0001-0x0003).

`SFrameContext` holds base keys by KID and one send counter per KID. The counter of a
KID is never reused within a context, not even after `remove_key` and a later
`add_key` of the same KID, and `encrypt` refuses (CounterExhausted) once 2^64 frames
have been sent under a KID.

Partial encryption (browser E2EE of video): encoded VP8 frames keep a few leading bytes
in the clear so that packetizers and SFUs can still read the frame type and size, as
the Chromium / Jitsi insertable-streams E2EE does (10 bytes of a key frame: the 3-byte
frame tag, the 3-byte start code and 4 bytes of dimensions; 3 bytes, the frame tag, of a
delta frame; RFC 6386 section 9.1). `protect` / `unprotect` lay such a frame out as

    +---------------------+---------------+---------------------------------+
    | frame[:clear]       | SFrame header | AEAD(frame[clear:]) incl. tag   |
    | (in the clear)      |               |                                 |
    +---------------------+---------------+---------------------------------+
    metadata = frame[:clear], so aad = header || frame[:clear]

i.e. an SFrame ciphertext of the rest of the frame, prefixed by the clear bytes, which
are bound to it as SFrame metadata: changing a clear byte fails authentication. (This
is SFrame with a clear prefix, not Jitsi's own trailer format.) The receiver finds
`clear` from the protected frame itself (`vp8_clear_bytes` reads only the first byte).

Errors: everything a received frame can cause is an `SFrameError` (MalformedHeader,
MalformedFrame, UnknownKey, AuthenticationFailed); CounterExhausted on the send side.
Neither keys nor salts appear in any repr, str or exception message.
"""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass
from enum import Enum, IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

__all__ = [
    "MAX_CTR",
    "MAX_KID",
    "MIN_BASE_KEY_BYTES",
    "VP8_DELTA_FRAME_CLEAR",
    "VP8_KEY_FRAME_CLEAR",
    "AuthenticationFailed",
    "CipherSuite",
    "CounterExhausted",
    "Header",
    "KeyMaterial",
    "KeyUsage",
    "MalformedFrame",
    "MalformedHeader",
    "SFrameContext",
    "SFrameError",
    "UnknownKey",
    "aead_decrypt",
    "aead_encrypt",
    "decode_header",
    "decrypt_frame",
    "derive",
    "encode_header",
    "encrypt_frame",
    "key_label",
    "make_nonce",
    "protect",
    "salt_label",
    "sframe_secret",
    "unprotect",
    "vp8_clear_bytes",
]

MAX_KID = 2**64 - 1
MAX_CTR = 2**64 - 1
MIN_BASE_KEY_BYTES = 16
VP8_KEY_FRAME_CLEAR = 10
VP8_DELTA_FRAME_CLEAR = 3

_KEY_LABEL = b"SFrame 1.0 Secret key "
_SALT_LABEL = b"SFrame 1.0 Secret salt "


# -- errors -------------------------------------------------------------------------------


class SFrameError(Exception):
    """Base of every SFrame failure."""


class MalformedFrame(SFrameError, ValueError):
    """The input is not a well-formed (protected) frame."""


class MalformedHeader(MalformedFrame):
    """The SFrame header is truncated or not minimally encoded."""


class UnknownKey(SFrameError):
    """No key for this KID (for this direction)."""


class AuthenticationFailed(SFrameError):
    """The ciphertext, header or metadata does not authenticate under the KID's key."""


class CounterExhausted(SFrameError):
    """All 2^64 counter values of a KID have been used: a new KID is needed."""


# -- cipher suites ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Params:
    nh: int           # hash output size
    nka: int | None   # AES key size inside the CTR+HMAC compound key (None: AES-GCM)
    nk: int           # AEAD key size
    nn: int           # nonce size
    nt: int           # tag size
    sha512: bool      # HKDF hash: SHA-512, else SHA-256


class CipherSuite(IntEnum):
    """The SFrame cipher suites of RFC 9605 section 8.1 (value = registry code point)."""

    AES_128_CTR_HMAC_SHA256_80 = 0x0001
    AES_128_CTR_HMAC_SHA256_64 = 0x0002
    AES_128_CTR_HMAC_SHA256_32 = 0x0003
    AES_128_GCM_SHA256_128 = 0x0004
    AES_256_GCM_SHA512_128 = 0x0005

    @property
    def _params(self) -> _Params:
        return _PARAMS[self]

    @property
    def nh(self) -> int:
        """Hash.Nh: the size in bytes of the hash output."""
        return self._params.nh

    @property
    def nka(self) -> int | None:
        """AEAD.Nka: the AES key size within the CTR+HMAC key; None for AES-GCM."""
        return self._params.nka

    @property
    def nk(self) -> int:
        """AEAD.Nk: the size in bytes of sframe_key."""
        return self._params.nk

    @property
    def nn(self) -> int:
        """AEAD.Nn: the size in bytes of the nonce (and of sframe_salt)."""
        return self._params.nn

    @property
    def nt(self) -> int:
        """AEAD.Nt: the bytes the AEAD adds to the plaintext (the tag)."""
        return self._params.nt

    @property
    def is_gcm(self) -> bool:
        return self._params.nka is None

    @property
    def hash(self) -> hashes.HashAlgorithm:
        """The suite's hash (for HKDF), a fresh instance."""
        return hashes.SHA512() if self._params.sha512 else hashes.SHA256()


_PARAMS: dict[CipherSuite, _Params] = {
    CipherSuite.AES_128_CTR_HMAC_SHA256_80: _Params(32, 16, 48, 12, 10, sha512=False),
    CipherSuite.AES_128_CTR_HMAC_SHA256_64: _Params(32, 16, 48, 12, 8, sha512=False),
    CipherSuite.AES_128_CTR_HMAC_SHA256_32: _Params(32, 16, 48, 12, 4, sha512=False),
    CipherSuite.AES_128_GCM_SHA256_128: _Params(32, None, 16, 12, 16, sha512=False),
    CipherSuite.AES_256_GCM_SHA512_128: _Params(64, None, 32, 12, 16, sha512=True),
}


# -- header -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """A decoded SFrame header."""

    kid: int
    ctr: int

    def encode(self) -> bytes:
        return encode_header(self.kid, self.ctr)


def _check_u64(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_KID:
        raise ValueError(f"{name} must be an integer in [0, 2^64 - 1], not {value!r}")


def _minimal(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def encode_header(kid: int, ctr: int) -> bytes:
    """The SFrame header of (kid, ctr) (section 4.3)."""
    _check_u64("kid", kid)
    _check_u64("ctr", ctr)
    config = 0
    tail = b""
    if kid < 8:
        config |= kid << 4
    else:
        kid_bytes = _minimal(kid)
        config |= 0x80 | (len(kid_bytes) - 1) << 4
        tail += kid_bytes
    if ctr < 8:
        config |= ctr
    else:
        ctr_bytes = _minimal(ctr)
        config |= 0x08 | (len(ctr_bytes) - 1)
        tail += ctr_bytes
    return bytes([config]) + tail


def _read_field(data: bytes, pos: int, extended: bool, bits: int, name: str) -> tuple[int, int]:
    if not extended:
        return bits, pos
    length = bits + 1
    if pos + length > len(data):
        raise MalformedHeader(
            f"truncated SFrame header: {name} needs {length} bytes, {len(data) - pos} left")
    raw = data[pos:pos + length]
    if (length > 1 and raw[0] == 0) or (length == 1 and raw[0] < 8):
        raise MalformedHeader(f"SFrame header {name} is not minimally encoded")
    return int.from_bytes(raw, "big"), pos + length


def decode_header(data: bytes) -> tuple[Header, int]:
    """The header at the start of `data` and its length in bytes.

    Raises MalformedHeader on truncated input or a non-minimal encoding.
    """
    if len(data) == 0:
        raise MalformedHeader("empty input: no SFrame header")
    config = data[0]
    kid, pos = _read_field(data, 1, bool(config & 0x80), (config >> 4) & 0x07, "KID")
    ctr, pos = _read_field(data, pos, bool(config & 0x08), config & 0x07, "CTR")
    return Header(kid, ctr), pos


# -- key derivation -----------------------------------------------------------------------


class KeyMaterial:
    """sframe_key and sframe_salt of one KID (section 4.4.2). The repr hides both."""

    __slots__ = ("_aesgcm", "key", "kid", "salt", "suite")

    def __init__(self, suite: CipherSuite, kid: int, key: bytes, salt: bytes) -> None:
        suite = CipherSuite(suite)
        _check_u64("kid", kid)
        if len(key) != suite.nk or len(salt) != suite.nn:
            raise ValueError(f"{suite.name} needs a {suite.nk}-byte key and "
                             f"a {suite.nn}-byte salt")
        self.suite = suite
        self.kid = kid
        self.key = bytes(key)
        self.salt = bytes(salt)
        self._aesgcm = AESGCM(self.key) if suite.is_gcm else None

    def __repr__(self) -> str:
        return (f"KeyMaterial(suite={self.suite.name}, kid={self.kid}, "
                f"key=<{len(self.key) * 8} bits hidden>, salt=<hidden>)")

    __str__ = __repr__

    def __reduce__(self) -> str:
        raise TypeError("KeyMaterial cannot be pickled")


def key_label(suite: CipherSuite, kid: int) -> bytes:
    """The HKDF info of sframe_key: "SFrame 1.0 Secret key " || KID(8) || suite(2)."""
    _check_u64("kid", kid)
    return _KEY_LABEL + kid.to_bytes(8, "big") + int(suite).to_bytes(2, "big")


def salt_label(suite: CipherSuite, kid: int) -> bytes:
    """The HKDF info of sframe_salt: "SFrame 1.0 Secret salt " || KID(8) || suite(2)."""
    _check_u64("kid", kid)
    return _SALT_LABEL + kid.to_bytes(8, "big") + int(suite).to_bytes(2, "big")


def _check_base_key(base_key: bytes) -> None:
    if not isinstance(base_key, bytes | bytearray | memoryview):
        raise TypeError("base_key must be bytes")
    if len(base_key) < MIN_BASE_KEY_BYTES:
        raise ValueError(f"base_key must have at least {MIN_BASE_KEY_BYTES} bytes, "
                         f"got {len(base_key)}")


def sframe_secret(suite: CipherSuite, base_key: bytes) -> bytes:
    """HKDF-Extract with an empty salt, under the suite's hash."""
    _check_base_key(base_key)
    return HKDF.extract(CipherSuite(suite).hash, b"", bytes(base_key))


def derive(suite: CipherSuite, kid: int, base_key: bytes) -> KeyMaterial:
    """sframe_key and sframe_salt of `kid` from `base_key` (section 4.4.2)."""
    suite = CipherSuite(suite)
    _check_u64("kid", kid)
    secret = sframe_secret(suite, base_key)
    key = HKDFExpand(suite.hash, suite.nk, key_label(suite, kid)).derive(secret)
    salt = HKDFExpand(suite.hash, suite.nn, salt_label(suite, kid)).derive(secret)
    return KeyMaterial(suite, kid, key, salt)


def make_nonce(salt: bytes, ctr: int) -> bytes:
    """sframe_salt XOR CTR, CTR as a big-endian integer of len(salt) bytes."""
    _check_u64("ctr", ctr)
    # One integer XOR, not a per-byte loop: this runs for every media frame.
    return (int.from_bytes(salt, "big") ^ ctr).to_bytes(len(salt), "big")


# -- AEAD ---------------------------------------------------------------------------------


def _ctr_hmac_parts(suite: CipherSuite, key: bytes) -> tuple[bytes, bytes]:
    nka = suite.nka
    assert nka is not None
    if len(key) != suite.nk:
        raise ValueError(f"{suite.name} needs a {suite.nk}-byte key")
    return key[:nka], key[nka:]


def _ctr_hmac_tag(suite: CipherSuite, auth_key: bytes, nonce: bytes, aad: bytes,
                  ct: bytes) -> bytes:
    mac = crypto_hmac.HMAC(auth_key, hashes.SHA256())
    mac.update(len(aad).to_bytes(8, "big") + len(ct).to_bytes(8, "big")
               + suite.nt.to_bytes(8, "big"))
    mac.update(nonce)
    mac.update(aad)
    mac.update(ct)
    return mac.finalize()[:suite.nt]


def _aes_ctr(enc_key: bytes, nonce: bytes, data: bytes) -> bytes:
    ctx = Cipher(algorithms.AES(enc_key), modes.CTR(nonce + bytes(4))).encryptor()
    return ctx.update(data) + ctx.finalize()


def _seal(suite: CipherSuite, key: bytes, nonce: bytes, aad: bytes, pt: bytes,
          aesgcm: AESGCM | None = None) -> bytes:
    if suite.is_gcm:
        return (aesgcm or AESGCM(key)).encrypt(nonce, pt, aad)
    enc_key, auth_key = _ctr_hmac_parts(suite, key)
    ct = _aes_ctr(enc_key, nonce, pt)
    return ct + _ctr_hmac_tag(suite, auth_key, nonce, aad, ct)


def _open(suite: CipherSuite, key: bytes, nonce: bytes, aad: bytes, ct: bytes,
          aesgcm: AESGCM | None = None) -> bytes:
    if len(ct) < suite.nt:
        raise AuthenticationFailed("SFrame ciphertext shorter than the authentication tag")
    if suite.is_gcm:
        try:
            return (aesgcm or AESGCM(key)).decrypt(nonce, ct, aad)
        except InvalidTag:
            raise AuthenticationFailed("SFrame authentication failed") from None
    enc_key, auth_key = _ctr_hmac_parts(suite, key)
    inner, tag = ct[:-suite.nt], ct[-suite.nt:]
    if not hmac.compare_digest(tag, _ctr_hmac_tag(suite, auth_key, nonce, aad, inner)):
        raise AuthenticationFailed("SFrame authentication failed")
    return _aes_ctr(enc_key, nonce, inner)


def aead_encrypt(suite: CipherSuite, key: bytes, nonce: bytes, aad: bytes,
                 plaintext: bytes) -> bytes:
    """AEAD.Encrypt of the suite: ciphertext || tag."""
    return _seal(CipherSuite(suite), bytes(key), bytes(nonce), bytes(aad), bytes(plaintext))


def aead_decrypt(suite: CipherSuite, key: bytes, nonce: bytes, aad: bytes,
                 ciphertext: bytes) -> bytes:
    """AEAD.Decrypt of the suite; AuthenticationFailed if the tag does not verify."""
    return _open(CipherSuite(suite), bytes(key), bytes(nonce), bytes(aad), bytes(ciphertext))


# -- frames -------------------------------------------------------------------------------


def encrypt_frame(km: KeyMaterial, ctr: int, plaintext: bytes, metadata: bytes = b"") -> bytes:
    """The SFrame ciphertext of `plaintext` under km at counter `ctr` (section 4.4.3).

    Stateless: the caller guarantees that (KID, CTR) is never used twice. Prefer
    `SFrameContext.encrypt`, which does.
    """
    header = encode_header(km.kid, ctr)
    nonce = make_nonce(km.salt, ctr)
    return header + _seal(km.suite, km.key, nonce, header + bytes(metadata), bytes(plaintext),
                          km._aesgcm)


def _decrypt_body(km: KeyMaterial, header: Header, raw_header: bytes, body: bytes,
                  metadata: bytes) -> bytes:
    nonce = make_nonce(km.salt, header.ctr)
    return _open(km.suite, km.key, nonce, raw_header + bytes(metadata), body, km._aesgcm)


def decrypt_frame(km: KeyMaterial, frame: bytes, metadata: bytes = b"") -> tuple[Header, bytes]:
    """The header and plaintext of an SFrame ciphertext under km (section 4.4.4)."""
    frame = bytes(frame)
    header, n = decode_header(frame)
    if header.kid != km.kid:
        raise UnknownKey(f"frame is under KID {header.kid}, the key is for KID {km.kid}")
    return header, _decrypt_body(km, header, frame[:n], frame[n:], metadata)


class KeyUsage(Enum):
    """What a base key may be used for (RFC 9605 4.4.1 asks for one direction per key)."""

    ENCRYPT = "encrypt"
    DECRYPT = "decrypt"
    BOTH = "both"


@dataclass(frozen=True)
class _Entry:
    material: KeyMaterial
    usage: KeyUsage


class SFrameContext:
    """The keys of one SFrame session, by KID, and a send counter per KID (Appendix A).

    Thread-safe: counters are taken under a lock, so concurrent `encrypt` calls never
    share a (KID, CTR).
    """

    def __init__(self, suite: CipherSuite = CipherSuite.AES_128_GCM_SHA256_128) -> None:
        self.suite = CipherSuite(suite)
        self._keys: dict[int, _Entry] = {}
        # Next CTR per KID that has sent. Kept across remove_key/add_key so that no
        # (KID, CTR) is ever used twice by this context; one int per sending KID.
        self._next_ctr: dict[int, int] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        with self._lock:
            kids = sorted(self._keys)
        return f"SFrameContext(suite={self.suite.name}, kids={kids})"

    def add_key(self, kid: int, base_key: bytes, *, usage: KeyUsage = KeyUsage.BOTH,
                next_ctr: int = 0) -> None:
        """Derive and hold the keys of `kid`, replacing any earlier key of that KID.

        `next_ctr` resumes a persisted counter (RFC 9605 9.1); the context never goes
        below a counter it has already used for this KID.
        """
        _check_u64("next_ctr", next_ctr)
        material = derive(self.suite, kid, base_key)
        with self._lock:
            self._keys[kid] = _Entry(material, KeyUsage(usage))
            if next_ctr > self._next_ctr.get(kid, 0):
                self._next_ctr[kid] = next_ctr

    def remove_key(self, kid: int) -> None:
        """Forget the key of `kid` (no error if there is none). Its counter is kept."""
        with self._lock:
            self._keys.pop(kid, None)

    def has_key(self, kid: int) -> bool:
        with self._lock:
            return kid in self._keys

    def kids(self) -> list[int]:
        with self._lock:
            return sorted(self._keys)

    def next_counter(self, kid: int) -> int:
        """The CTR the next `encrypt` under `kid` will use (2^64 once exhausted)."""
        with self._lock:
            return self._next_ctr.get(kid, 0)

    def encrypt(self, kid: int, plaintext: bytes, metadata: bytes = b"") -> bytes:
        """The SFrame ciphertext of `plaintext` under `kid`, at that KID's next counter."""
        with self._lock:
            entry = self._keys.get(kid)
            if entry is None or entry.usage is KeyUsage.DECRYPT:
                raise UnknownKey(f"no encryption key for KID {kid!r}")
            ctr = self._next_ctr.get(kid, 0)
            if ctr > MAX_CTR:
                raise CounterExhausted(f"KID {kid}: all 2^64 counter values are used")
            self._next_ctr[kid] = ctr + 1   # taken before use: never handed out twice
        return encrypt_frame(entry.material, ctr, plaintext, metadata)

    def decrypt(self, frame: bytes, metadata: bytes = b"") -> tuple[int, bytes]:
        """The KID and plaintext of an SFrame ciphertext.

        MalformedHeader, UnknownKey or AuthenticationFailed otherwise. Replay
        protection is the application's (RFC 9605 9.3).
        """
        frame = bytes(frame)
        header, n = decode_header(frame)
        with self._lock:
            entry = self._keys.get(header.kid)
        if entry is None or entry.usage is KeyUsage.ENCRYPT:
            raise UnknownKey(f"no decryption key for KID {header.kid}")
        return header.kid, _decrypt_body(entry.material, header, frame[:n], frame[n:], metadata)

    def protect(self, kid: int, frame: bytes, clear: int) -> bytes:
        """`frame` with its first `clear` bytes in the clear (see the module docstring)."""
        frame = bytes(frame)
        if not 0 <= clear <= len(frame):
            raise MalformedFrame(f"cannot keep {clear} bytes of a {len(frame)}-byte frame "
                                 "in the clear")
        prefix = frame[:clear]
        return prefix + self.encrypt(kid, frame[clear:], metadata=prefix)

    def unprotect(self, data: bytes, clear: int) -> tuple[int, bytes]:
        """The KID and original frame of `protect`'s output."""
        data = bytes(data)
        if clear < 0:
            raise ValueError("clear must not be negative")
        if len(data) < clear:
            raise MalformedFrame(f"protected frame of {len(data)} bytes is shorter than "
                                 f"its {clear}-byte clear prefix")
        prefix = data[:clear]
        kid, body = self.decrypt(data[clear:], metadata=prefix)
        return kid, prefix + body


def protect(ctx: SFrameContext, kid: int, frame: bytes, clear: int) -> bytes:
    """`ctx.protect`: clear prefix || SFrame(header, rest), the prefix bound as metadata."""
    return ctx.protect(kid, frame, clear)


def unprotect(ctx: SFrameContext, data: bytes, clear: int) -> tuple[int, bytes]:
    """`ctx.unprotect`: the KID and the original frame."""
    return ctx.unprotect(data, clear)


def vp8_clear_bytes(frame: bytes) -> int:
    """How many leading bytes of an encoded VP8 frame stay in the clear.

    10 for a key frame, 3 for a delta frame. Bit 0 of the first byte is the VP8
    frame tag's inverse key-frame flag (0: key frame, RFC 6386 9.1). It is in the
    clear prefix, so the same call works on a protected frame at the receiver.
    MalformedFrame if the frame is shorter than its clear prefix.
    """
    if len(frame) == 0:
        raise MalformedFrame("empty VP8 frame")
    clear = VP8_DELTA_FRAME_CLEAR if frame[0] & 0x01 else VP8_KEY_FRAME_CLEAR
    if len(frame) < clear:
        raise MalformedFrame(f"VP8 frame of {len(frame)} bytes is shorter than its "
                             f"{clear}-byte header")
    return clear
