"""Batches: the wire format, its strictness, and the root every record is proven against."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

import pytest
from eth_account import Account
from hypothesis import given, settings
from hypothesis import strategies as st

from gateways.ledger.batch import (
    MAX_RECORDS,
    BatchInvalid,
    batch_root,
    content_hash,
    decode_batch,
    encode_batch,
)
from gateways.ledger.merkle import MerkleTree, root, verify_inclusion
from gateways.ledger.reading import Reading
from gateways.ledger.records import RecordInvalid, SealedRecord, open_record, seal
from gateways.ledger.signing import sign_root, verify_root
from gateways.ledger.vault import KeyVault
from qgw.secret import Secret

KEY = Secret(bytes(range(32)))


def records(n: int, device: str = "sensor-0001") -> list[SealedRecord]:
    return [seal(Reading(device, seq, 1_790_000_000_000 + seq, {"t": 20 + seq / 10}),
                 KEY, f"stream:{seq}") for seq in range(1, n + 1)]


RECS = records(5)


def test_layout() -> None:
    raw = encode_batch(RECS)
    assert raw[:9] == b"QKDL\x01" + struct.pack("!I", 5)
    pos = 9
    for rec in RECS:
        enc = rec.encode()
        assert raw[pos:pos + 4] == struct.pack("!I", len(enc))
        assert raw[pos + 4:pos + 4 + len(enc)] == enc
        pos += 4 + len(enc)
    assert pos == len(raw)


def test_round_trip() -> None:
    raw = encode_batch(RECS)
    assert decode_batch(raw) == RECS
    assert encode_batch(decode_batch(raw)) == raw


def test_root_and_proofs() -> None:
    r = batch_root(RECS)
    assert r == root([rec.encode() for rec in RECS])
    tree = MerkleTree([rec.leaf() for rec in RECS])
    assert tree.root == r
    for i, rec in enumerate(decode_batch(encode_batch(RECS))):
        assert verify_inclusion(rec.leaf(), i, len(RECS), tree.proof(i), r)
    # the root commits to the order, and to every byte of every record
    assert batch_root(list(reversed(RECS))) != r
    altered = dataclasses.replace(RECS[2], ts_ms=RECS[2].ts_ms + 1)
    assert batch_root([*RECS[:2], altered, *RECS[3:]]) != r


def test_content_hash() -> None:
    raw = encode_batch(RECS)
    assert content_hash(raw) == hashlib.sha256(raw).digest()
    assert content_hash(raw) != batch_root(RECS)


def test_every_truncation_and_trailing_bytes() -> None:
    raw = encode_batch(RECS[:2])
    for n in range(len(raw)):
        with pytest.raises(BatchInvalid):
            decode_batch(raw[:n])
    with pytest.raises(BatchInvalid, match="3 bytes after the last record"):
        decode_batch(raw + b"xyz")


def test_too_many_records_refused_before_reading_them() -> None:
    raw = encode_batch(RECS)
    with pytest.raises(BatchInvalid, match="claims 5 records, over the limit of 4"):
        decode_batch(raw, max_records=4)
    liar = b"QKDL\x01" + struct.pack("!I", 2**32 - 1) + raw[9:]
    with pytest.raises(BatchInvalid, match=f"over the limit of {MAX_RECORDS}"):
        decode_batch(liar)
    assert len(decode_batch(raw, max_records=5)) == 5


@pytest.mark.parametrize(("data", "message"), [
    (b"", "shorter than its header"),
    (b"QKDX\x01\x00\x00\x00\x01", "bad magic"),
    (b"QKDL\x02\x00\x00\x00\x01", "version 2 is not supported"),
    (b"QKDL\x01\x00\x00\x00\x00", "holds no records"),
    (b"QKDL\x01\x00\x00\x00\x01\xff\xff\xff\xff", "truncated in record 0 of 1"),
    (b"QKDL\x01\x00\x00\x00\x02\x00\x00", "truncated at record 0 of 2"),
    (b"QKDL\x01\x00\x00\x00\x01\x00\x00\x00\x01\x07", "record 0 of the batch: record version 7"),
])
def test_malformed(data: bytes, message: str) -> None:
    with pytest.raises(BatchInvalid, match=message):
        decode_batch(data)


def test_record_count_shorter_than_contents() -> None:
    raw = encode_batch(RECS)
    fewer = raw[:5] + struct.pack("!I", 4) + raw[9:]
    with pytest.raises(BatchInvalid, match="bytes after the last record"):
        decode_batch(fewer)


def test_a_replayed_record_in_one_batch_is_refused() -> None:
    with pytest.raises(BatchInvalid, match="sensor-0001#2 appears twice"):
        encode_batch([*RECS, RECS[1]])
    raw = encode_batch(RECS)
    enc = RECS[1].encode()
    replayed = (raw[:5] + struct.pack("!I", 6) + raw[9:] + struct.pack("!I", len(enc)) + enc)
    with pytest.raises(BatchInvalid, match="appears twice"):
        decode_batch(replayed)


def test_same_seq_of_another_device_is_fine() -> None:
    mixed = records(3) + records(3, device="sensor-0002")
    assert decode_batch(encode_batch(mixed)) == mixed


def test_empty_batch_refused() -> None:
    with pytest.raises(BatchInvalid, match="at least one record"):
        encode_batch([])


@settings(max_examples=60)
@given(st.lists(st.integers(1, 10**6), min_size=1, max_size=8, unique=True), st.data())
def test_round_trip_and_mutations(seqs: list[int], data: st.DataObject) -> None:
    recs = [seal(Reading("d", s, s, {"v": s}), KEY, "k:1") for s in seqs]
    raw = encode_batch(recs)
    assert decode_batch(raw) == recs
    at = data.draw(st.integers(0, len(raw)))
    cut = data.draw(st.integers(0, 4))
    insert = data.draw(st.binary(max_size=4))
    mutated = raw[:at] + insert + raw[at + cut:]
    try:
        got = decode_batch(mutated)
    except BatchInvalid:
        return
    assert encode_batch(got) == mutated        # accepted only if canonical


def test_writer_to_reader_through_the_batch_bytes(tmp_path: Path) -> None:
    """What the ledger carries is enough for the partner gateway, and for nobody else."""
    writer = Account.from_key(bytes.fromhex("11" * 32))
    contract = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    qkd = {f"stream-1:{i}": Secret(bytes([0xC0 + i]) * 32) for i in range(3)}
    readings = [Reading("sensor-0001", seq, 1_790_000_000_000 + seq, {"t": seq})
                for seq in range(1, 31)]
    recs = [seal(r, qkd[f"stream-1:{r.seq % 3}"], f"stream-1:{r.seq % 3}") for r in readings]
    raw = encode_batch(recs)
    root = batch_root(recs)
    signature = sign_root(writer, root, chain_id=1337, contract=contract)

    # the reader: its vault holds the same QKD keys (delivered by its own KME)
    with KeyVault(tmp_path / "vault.sqlite") as vault:
        for key_id, key in qkd.items():
            vault.put(key_id, Secret(key.expose()))
        got = decode_batch(raw)
        assert batch_root(got) == root
        verify_root(root, signature, chain_id=1337, contract=contract, writer=writer.address)
        opened = []
        for rec in got:
            held = vault.get(rec.key_id)
            assert held is not None
            opened.append(open_record(rec, held))
        assert opened == readings

    # a third party: the same bytes, no QKD key
    for rec in decode_batch(raw):
        with pytest.raises(RecordInvalid, match="failed authentication"):
            open_record(rec, Secret(bytes(32)))
    assert b'"t"' not in raw
