"""One sensor reading sealed for the ledger: AES-256-GCM under a key derived from a QKD key.

Key. Each record has a key of its own, HKDF-SHA256 of the QKD key with the label
`qkdgw/ledger/v1/<device>/<seq>` (keyclient.kdf adds the product prefix). So one QKD
key may protect many records without two records ever sharing an AES key, and the
partner gateway, holding the same QKD key (ETSI 004 chunk `<Key_stream_ID>:<index>`
or an ETSI 014 key UUID: `key_id`), derives the same record key from the record's
own fields. The nonce is random as well: should a sensor ever send one (device, seq)
twice with other values, the two records still never reuse a (key, nonce) pair.

What a third party with ledger access learns: device, seq, ts_ms, key_id and label
(the header, in clear, authenticated as GCM associated data) and the length of the
values; not the values. Tampering with any header field, the nonce or the ciphertext
makes `open_record` fail with one opaque RecordInvalid, as does a wrong key.

Wire format (version 1), big-endian, every variable field length-prefixed; the
encoding is canonical (`decode(b).encode() == b` for every accepted `b`):

    u8   version = 1
    u8   device length,  device (UTF-8, 1..255 bytes, printable)
    u64  seq (below 2**63: SQLite's integers; no sensor counts that far)
    i64  ts_ms
    u8   key_id length,  key_id (UTF-8, 1..255 bytes, printable)
    u16  label length,   label (UTF-8, 1..512 bytes, printable)
    12   nonce
    u32  ciphertext length, ciphertext (GCM ciphertext || 16-byte tag, 16..16400 bytes)

The associated data is the header: every byte before the nonce. The plaintext is the
reading's values as canonical JSON (sorted keys, no spaces, ASCII only).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateways.ledger.reading import Reading, Value
from keyclient.kdf import hkdf
from qgw.errors import QgwError
from qgw.secret import Secret

VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
MAX_NAME = 255                  # bytes of device or key_id
MAX_LABEL = 512
MAX_VALUES = 16384              # bytes of canonical JSON values per reading
MAX_CIPHERTEXT = MAX_VALUES + TAG_LEN
MIN_QKD_KEY = 16                # bytes: the key policy's smallest key (128 bits)
LABEL_PREFIX = "qkdgw/ledger/v1"

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_SEQ_TS = struct.Struct("!Qq")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_SEQ_MAX = _I64_MAX
_SCALARS = (bool, int, float, str)
# Canonical JSON; built once, as json.dumps with options builds an encoder per call.
_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
_FAILED = "failed authentication (tampered, or not this key)"


class RecordInvalid(QgwError):
    """A record that cannot be encoded, decoded or opened; the message says which and why."""


def record_label(device: str, seq: int) -> str:
    """The HKDF label of a record's key: one key per (device, seq)."""
    return f"{LABEL_PREFIX}/{device}/{seq}"


def _text(value: str, what: str, limit: int) -> bytes:
    if not isinstance(value, str) or not value:
        raise RecordInvalid(f"{what} must be a non-empty string")
    if not value.isprintable():
        # Names end up in labels and log lines: no newlines or control characters.
        raise RecordInvalid(f"{what} {value!r} holds non-printable characters")
    raw = value.encode()
    if len(raw) > limit:
        raise RecordInvalid(f"{what} is {len(raw)} bytes long, over the {limit}-byte limit")
    return raw


def _header(device: str, seq: int, ts_ms: int, key_id: str, label: str) -> bytes:
    dev = _text(device, "device", MAX_NAME)
    kid = _text(key_id, "key_id", MAX_NAME)
    lab = _text(label, "label", MAX_LABEL)
    if not (isinstance(seq, int) and 0 <= seq <= _SEQ_MAX) or isinstance(seq, bool):
        raise RecordInvalid(f"seq {seq!r} is not an integer in 0..2**63-1")
    if not (isinstance(ts_ms, int) and _I64_MIN <= ts_ms <= _I64_MAX) or isinstance(ts_ms, bool):
        raise RecordInvalid(f"ts_ms {ts_ms!r} is not a signed 64-bit integer")
    return b"".join((_U8.pack(VERSION), _U8.pack(len(dev)), dev, _SEQ_TS.pack(seq, ts_ms),
                     _U8.pack(len(kid)), kid, _U16.pack(len(lab)), lab))


@dataclass(frozen=True)
class SealedRecord:
    device: str
    seq: int
    ts_ms: int
    key_id: str           # the QKD key's ID at the KME: "<Key_stream_ID>:<index>" or a UUID
    label: str            # HKDF label the record key was derived with
    nonce: bytes
    ciphertext: bytes     # GCM ciphertext || tag
    _header: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_LEN:
            raise RecordInvalid(f"nonce must be {NONCE_LEN} bytes")
        if not (isinstance(self.ciphertext, bytes)
                and TAG_LEN <= len(self.ciphertext) <= MAX_CIPHERTEXT):
            raise RecordInvalid(f"ciphertext must be {TAG_LEN}..{MAX_CIPHERTEXT} bytes")
        # Checks every other field; kept, as encode() and open_record() need it again.
        object.__setattr__(self, "_header", _header(self.device, self.seq, self.ts_ms,
                                                    self.key_id, self.label))

    @property
    def name(self) -> str:
        """How messages name the record: `sensor-0001#17`."""
        return f"{self.device}#{self.seq}"

    def header(self) -> bytes:
        """The encoded fields before the nonce: the GCM associated data."""
        return self._header

    def encode(self) -> bytes:
        return b"".join((self._header, self.nonce, _U32.pack(len(self.ciphertext)),
                         self.ciphertext))

    def leaf(self) -> bytes:
        """The record's Merkle leaf data: its canonical encoding."""
        return self.encode()

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> SealedRecord:
        """Exactly one record, nothing before or after it; RecordInvalid otherwise."""
        raw = bytes(data)
        n = len(raw)
        if n and raw[0] != VERSION:
            raise RecordInvalid(f"record version {raw[0]} is not supported (this is {VERSION})")
        if n < 2:
            raise _truncated("version and device length", n)
        pos = 2 + raw[1]
        if pos + _SEQ_TS.size + 1 > n:
            raise _truncated("device, seq and ts_ms", n)
        device = raw[2:pos]
        seq, ts_ms = _SEQ_TS.unpack_from(raw, pos)
        pos += _SEQ_TS.size
        end = pos + 1 + raw[pos]
        key_id = raw[pos + 1:end]
        if end + 2 > n:
            raise _truncated("key_id and label length", n)
        (label_len,) = _U16.unpack_from(raw, end)
        if label_len > MAX_LABEL:
            raise RecordInvalid(f"record label length {label_len} is over {MAX_LABEL}")
        pos = end + 2 + label_len
        label = raw[end + 2:pos]
        if pos + NONCE_LEN + 4 > n:
            raise _truncated("label, nonce and ciphertext length", n)
        nonce = raw[pos:pos + NONCE_LEN]
        (ct_len,) = _U32.unpack_from(raw, pos + NONCE_LEN)
        pos += NONCE_LEN + 4
        if not TAG_LEN <= ct_len <= MAX_CIPHERTEXT:
            raise RecordInvalid(f"record ciphertext length {ct_len} is outside "
                                f"{TAG_LEN}..{MAX_CIPHERTEXT}")
        if pos + ct_len > n:
            raise _truncated("ciphertext", n)
        if pos + ct_len < n:
            raise RecordInvalid(f"{n - pos - ct_len} bytes after the record")
        try:
            texts = device.decode(), key_id.decode(), label.decode()
        except UnicodeDecodeError:
            raise RecordInvalid("record device, key_id or label is not UTF-8") from None
        return cls(texts[0], seq, ts_ms, texts[1], texts[2], nonce, raw[pos:])


def _truncated(what: str, n: int) -> RecordInvalid:
    return RecordInvalid(f"record truncated in {what} ({n} bytes)")


def _record_key(qkd_key: Secret, label: str) -> AESGCM:
    if len(qkd_key) < MIN_QKD_KEY:
        raise RecordInvalid(f"a QKD key of {len(qkd_key) * 8} bits is too short "
                            f"(at least {MIN_QKD_KEY * 8})")
    sub = hkdf(qkd_key.expose(), salt=None, label=label)
    try:
        return AESGCM(sub.expose())
    finally:
        sub.wipe()


def _values_json(reading: Reading) -> bytes:
    name = f"{reading.device}#{reading.seq}"
    values = reading.values
    if not (isinstance(values, dict) and all(isinstance(k, str) for k in values)
            and all(isinstance(v, _SCALARS) for v in values.values())):
        # Anything else would not come back equal from open_record.
        raise RecordInvalid(f"values of {name} must map names to numbers, strings or booleans")
    try:
        text = _JSON.encode(values)
    except ValueError as exc:       # NaN, infinity, an integer of over 4300 digits
        raise RecordInvalid(f"values of {name} cannot be written as JSON: {exc}") from None
    raw = text.encode()
    if len(raw) > MAX_VALUES:
        raise RecordInvalid(f"values of {name} take {len(raw)} bytes, "
                            f"over the {MAX_VALUES}-byte limit")
    return raw


def seal(reading: Reading, qkd_key: Secret, key_id: str) -> SealedRecord:
    """Encrypt `reading` under a key derived from `qkd_key` (whose KME ID is `key_id`)."""
    label = record_label(reading.device, reading.seq)
    header = _header(reading.device, reading.seq, reading.ts_ms, key_id, label)
    plaintext = _values_json(reading)
    nonce = os.urandom(NONCE_LEN)
    ciphertext = _record_key(qkd_key, label).encrypt(nonce, plaintext, header)
    return SealedRecord(reading.device, reading.seq, reading.ts_ms, key_id, label, nonce,
                        ciphertext)


def _values(plaintext: bytes, name: str) -> dict[str, Value]:
    # Only reached after authentication: the writer holds the key, so a bad shape here
    # is a writer bug, reported as such rather than as tampering.
    try:
        values = json.loads(plaintext, parse_constant=_no_constant)
    except ValueError:
        values = None
    if not (isinstance(values, dict)
            and all(isinstance(v, _SCALARS) for v in values.values())):
        raise RecordInvalid(f"record {name} decrypted, but its values are not a JSON object "
                            "of numbers, strings and booleans")
    return values


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def open_record(rec: SealedRecord, qkd_key: Secret) -> Reading:
    """The reading sealed in `rec`; RecordInvalid if it was altered or `qkd_key` is not its key."""
    if rec.label != record_label(rec.device, rec.seq):
        # Version 1 derives one key per (device, seq); any other label is not ours.
        raise RecordInvalid(f"record {rec.name} {_FAILED}")
    try:
        plaintext = _record_key(qkd_key, rec.label).decrypt(rec.nonce, rec.ciphertext,
                                                            rec.header())
    except InvalidTag:
        raise RecordInvalid(f"record {rec.name} {_FAILED}") from None
    return Reading(rec.device, rec.seq, rec.ts_ms, _values(plaintext, rec.name))
