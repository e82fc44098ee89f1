"""Sealed records: the wire format, the key derivation, and every way to break one."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time
import traceback

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from gateways.ledger.reading import Reading
from gateways.ledger.records import (
    MAX_VALUES,
    RecordInvalid,
    SealedRecord,
    open_record,
    record_label,
    seal,
)
from qgw.errors import QgwError
from qgw.secret import Secret

QKD_KEY = bytes(range(32))
KEY_ID = "2b0c5f0e-04a5-4d5e-9b1a-3f3e5b7f0c11:17"
READING = Reading("sensor-0001", 17, 1_790_000_000_000,
                  {"temperature_c": 21.5, "humidity_pct": 40, "door": "open", "alarm": False})
FAILED = "record sensor-0001#17 failed authentication (tampered, or not this key)"


def key(raw: bytes = QKD_KEY) -> Secret:
    return Secret(raw)


@pytest.fixture
def rec() -> SealedRecord:
    return seal(READING, key(), KEY_ID)


# -- the format, checked from its description ---------------------------------------


def test_layout_matches_the_documented_format(rec: SealedRecord) -> None:
    dev, kid = b"sensor-0001", KEY_ID.encode()
    label = b"qkdgw/ledger/v1/sensor-0001/17"
    header = (b"\x01" + bytes([len(dev)]) + dev + struct.pack("!Qq", 17, 1_790_000_000_000)
              + bytes([len(kid)]) + kid + struct.pack("!H", len(label)) + label)
    assert rec.label == label.decode() == record_label("sensor-0001", 17)
    assert rec.header() == header
    assert rec.encode() == (header + rec.nonce + struct.pack("!I", len(rec.ciphertext))
                            + rec.ciphertext)
    assert rec.leaf() == rec.encode()


def test_independent_decryption_from_the_spec(rec: SealedRecord) -> None:
    """HKDF-SHA256(QKD key, info = product prefix + label), AES-256-GCM, AAD = header."""
    record_key = HKDF(hashes.SHA256(), 32, None,
                      b"qkdgw/v1/qkdgw/ledger/v1/sensor-0001/17").derive(QKD_KEY)
    plaintext = AESGCM(record_key).decrypt(rec.nonce, rec.ciphertext, rec.header())
    assert plaintext == (b'{"alarm":false,"door":"open","humidity_pct":40,'
                         b'"temperature_c":21.5}')
    assert len(rec.ciphertext) == len(plaintext) + 16


def test_round_trips(rec: SealedRecord) -> None:
    assert SealedRecord.decode(rec.encode()) == rec
    assert open_record(SealedRecord.decode(rec.encode()), key()) == READING
    got = open_record(rec, key())
    assert type(got.values["alarm"]) is bool and type(got.values["humidity_pct"]) is int


def test_fresh_nonce_per_seal() -> None:
    a, b = seal(READING, key(), KEY_ID), seal(READING, key(), KEY_ID)
    assert a.nonce != b.nonce and a.ciphertext != b.ciphertext


printable = st.text(min_size=1, max_size=30).filter(str.isprintable)
scalar = st.one_of(st.booleans(), st.integers(-(2**70), 2**70),
                   st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
readings = st.builds(Reading, printable, st.integers(0, 2**63 - 1),
                     st.integers(-(2**63), 2**63 - 1),
                     st.dictionaries(st.text(max_size=10), scalar, max_size=6))


@given(readings, printable)
def test_any_reading_round_trips(reading: Reading, key_id: str) -> None:
    rec = seal(reading, key(), key_id)
    raw = rec.encode()
    assert SealedRecord.decode(raw) == rec
    got = open_record(SealedRecord.decode(raw), key())
    assert got == reading
    assert {k: type(v) for k, v in got.values.items()} == \
        {k: type(v) for k, v in reading.values.items()}


@given(st.binary(max_size=200) | st.builds(
    lambda raw, at, cut, insert: raw[:at] + insert + raw[at + cut:],
    st.just(seal(READING, key(), KEY_ID).encode()), st.integers(0, 140), st.integers(0, 3),
    st.binary(max_size=3)))
def test_decode_accepts_only_canonical_bytes(data: bytes) -> None:
    """Random bytes, and a real record with bytes cut out or slipped in."""
    try:
        rec = SealedRecord.decode(data)
    except RecordInvalid:
        return
    assert rec.encode() == data


# -- tampering and the wrong key -------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"device": "sensor-0002"}, {"seq": 18}, {"ts_ms": 1_790_000_000_001},
    {"key_id": "2b0c5f0e-04a5-4d5e-9b1a-3f3e5b7f0c11:18"},
    {"label": "qkdgw/ledger/v1/sensor-0001/18"}, {"label": "qkdgw/ledger/v2/sensor-0001/17"},
])
def test_any_changed_header_field_fails(rec: SealedRecord, change: dict[str, object]) -> None:
    bad = dataclasses.replace(rec, **change)  # type: ignore[arg-type]
    with pytest.raises(RecordInvalid, match="failed authentication"):
        open_record(bad, key())


def test_changed_nonce_or_ciphertext_fails(rec: SealedRecord) -> None:
    for i in range(len(rec.nonce)):
        nonce = bytearray(rec.nonce)
        nonce[i] ^= 0x01
        with pytest.raises(RecordInvalid) as exc:
            open_record(dataclasses.replace(rec, nonce=bytes(nonce)), key())
        assert str(exc.value) == FAILED
    for i in range(len(rec.ciphertext)):
        ct = bytearray(rec.ciphertext)
        ct[i] ^= 0x80
        with pytest.raises(RecordInvalid, match="failed authentication"):
            open_record(dataclasses.replace(rec, ciphertext=bytes(ct)), key())


def test_every_flipped_bit_of_the_encoding_is_caught(rec: SealedRecord) -> None:
    raw = rec.encode()
    for bit in range(8 * len(raw)):
        bad = bytearray(raw)
        bad[bit // 8] ^= 1 << bit % 8
        with pytest.raises(RecordInvalid):
            open_record(SealedRecord.decode(bytes(bad)), key())


def test_wrong_key_fails_and_leaks_nothing(rec: SealedRecord) -> None:
    other = bytes(reversed(QKD_KEY))
    with pytest.raises(RecordInvalid) as exc:
        open_record(rec, key(other))
    assert str(exc.value) == FAILED
    assert isinstance(exc.value, QgwError)
    assert exc.value.__cause__ is None and exc.value.__suppress_context__
    text = "".join(traceback.format_exception(exc.value))
    for raw in (QKD_KEY, other):
        assert raw.hex() not in text and repr(raw) not in text


def test_third_party_sees_metadata_but_not_values(rec: SealedRecord) -> None:
    raw = rec.encode()
    for secret in (b"temperature_c", b"21.5", b"humidity_pct", b"open"):
        assert secret not in raw
    assert b"sensor-0001" in raw           # who and when are public, by design
    for guess in (bytes(32), b"\xff" * 32, QKD_KEY[:16] + bytes(16)):
        with pytest.raises(RecordInvalid):
            open_record(rec, key(guess))


def test_records_under_one_qkd_key_have_keys_of_their_own() -> None:
    """A record's nonce and ciphertext moved under another record's header fail."""
    a = seal(READING, key(), KEY_ID)
    b = seal(dataclasses.replace(READING, seq=18), key(), KEY_ID)
    moved = dataclasses.replace(b, nonce=a.nonce, ciphertext=a.ciphertext)
    with pytest.raises(RecordInvalid, match="sensor-0001#18 failed"):
        open_record(moved, key())
    assert open_record(b, key()).seq == 18


def test_relabelled_record_fails_even_with_matching_crypto() -> None:
    """A label other than the one version 1 derives for (device, seq) is refused."""
    reading = dataclasses.replace(READING, seq=18)
    forged = seal(reading, key(), KEY_ID)
    forged = dataclasses.replace(forged, seq=17)   # header says #17, key derived for #18
    with pytest.raises(RecordInvalid, match="#17 failed authentication"):
        open_record(forged, key())


def test_short_qkd_key_refused() -> None:
    with pytest.raises(RecordInvalid, match="64 bits is too short"):
        seal(READING, key(bytes(8)), KEY_ID)


# -- limits and malformed input --------------------------------------------------------


@pytest.mark.parametrize(("reading", "message"), [
    (dataclasses.replace(READING, device=""), "device must be a non-empty string"),
    (dataclasses.replace(READING, device="x" * 256), "device is 256 bytes long"),
    (dataclasses.replace(READING, device="sensor\n1"), "non-printable"),
    (dataclasses.replace(READING, seq=-1), "seq -1 is not an integer"),
    (dataclasses.replace(READING, seq=2**63), "is not an integer in 0..2"),
    (dataclasses.replace(READING, ts_ms=2**63), "ts_ms"),
    (dataclasses.replace(READING, values={"a": [1, 2]}), "must map names to numbers"),  # type: ignore[dict-item]
    (dataclasses.replace(READING, values={"a": None}), "must map names to numbers"),  # type: ignore[dict-item]
    (dataclasses.replace(READING, values={1: 2}), "must map names to numbers"),  # type: ignore[dict-item]
    (dataclasses.replace(READING, values={"a": math.nan}), "cannot be written as JSON"),
    (dataclasses.replace(READING, values={"a": math.inf}), "cannot be written as JSON"),
    (dataclasses.replace(READING, values={"a": "x" * MAX_VALUES}), "over the 16384-byte"),
])
def test_unsealable_readings(reading: Reading, message: str) -> None:
    with pytest.raises(RecordInvalid, match=message):
        seal(reading, key(), KEY_ID)


def test_bad_key_id_refused() -> None:
    with pytest.raises(RecordInvalid, match="key_id must be a non-empty"):
        seal(READING, key(), "")


def test_decode_every_truncation_and_trailing_byte(rec: SealedRecord) -> None:
    raw = rec.encode()
    for n in range(len(raw)):
        with pytest.raises(RecordInvalid, match="truncated"):
            SealedRecord.decode(raw[:n])
    with pytest.raises(RecordInvalid, match="1 bytes after the record"):
        SealedRecord.decode(raw + b"\x00")


def test_decode_rejects_malformed_fields(rec: SealedRecord) -> None:
    raw = rec.encode()
    with pytest.raises(RecordInvalid, match="version 2 is not supported"):
        SealedRecord.decode(b"\x02" + raw[1:])
    bad_utf8 = b"\x01\x02\xff\xfe" + raw[2 + len("sensor-0001"):]
    with pytest.raises(RecordInvalid):
        SealedRecord.decode(bad_utf8)
    header = rec.header()
    body = raw[len(header):]
    label_at = len(header) - 2 - len(rec.label)
    with pytest.raises(RecordInvalid, match="label length 60000 is over 512"):
        SealedRecord.decode(header[:label_at] + struct.pack("!H", 60000) + b"x" * 60000
                            + body)
    short_ct = header + rec.nonce + struct.pack("!I", 15) + bytes(15)
    with pytest.raises(RecordInvalid, match="ciphertext length 15 is outside"):
        SealedRecord.decode(short_ct)
    huge = header + rec.nonce + struct.pack("!I", 2**32 - 1)
    with pytest.raises(RecordInvalid, match="outside"):
        SealedRecord.decode(huge)


def test_decrypted_values_of_the_wrong_shape_are_reported() -> None:
    """Only the key holder can make one; reported as a writer bug, not as tampering."""
    label = record_label("sensor-0001", 17)
    rk = HKDF(hashes.SHA256(), 32, None, b"qkdgw/v1/" + label.encode()).derive(QKD_KEY)
    template = seal(READING, key(), KEY_ID)
    for plaintext in (b"[1,2]", b'{"a":{"b":1}}', b'{"a":NaN}', b"\xff"):
        ct = AESGCM(rk).encrypt(template.nonce, plaintext, template.header())
        with pytest.raises(RecordInvalid, match="decrypted, but its values"):
            open_record(dataclasses.replace(template, ciphertext=ct), key())


def test_constructor_checks_fields(rec: SealedRecord) -> None:
    with pytest.raises(RecordInvalid, match="nonce must be 12 bytes"):
        dataclasses.replace(rec, nonce=b"short")
    with pytest.raises(RecordInvalid, match="ciphertext must be"):
        dataclasses.replace(rec, ciphertext=b"")


def test_repr_names_fields_not_keys(rec: SealedRecord) -> None:
    assert "sensor-0001" in repr(rec) and QKD_KEY.hex() not in repr(rec)
    assert json.dumps(rec.name) == '"sensor-0001#17"'


def test_seal_and_open_cost() -> None:
    n = 2000
    start = time.perf_counter()
    recs = [seal(dataclasses.replace(READING, seq=i), key(), KEY_ID) for i in range(n)]
    mid = time.perf_counter()
    for r in recs:
        open_record(r, key())
    end = time.perf_counter()
    seal_us, open_us = (mid - start) / n * 1e6, (end - mid) / n * 1e6
    assert seal_us < 2000 and open_us < 2000, (seal_us, open_us)     # ~50 us each here
