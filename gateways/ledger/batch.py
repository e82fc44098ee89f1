"""A batch of sealed records as anchored on the ledger, and its Merkle root.

Wire format (version 1), big-endian:

    4    magic "QKDL"
    u8   version = 1
    u32  record count (at least 1)
    count times:
        u32  record length, record (SealedRecord.encode())

The batch bytes travel in the anchoring transaction; the root is the RFC 6962 Merkle
root over the records' encodings, in batch order, so a record's inclusion proof
(merkle.verify_inclusion) ties it to the root the writer signed and anchored. One
(device, seq) appears at most once in a batch: a second one would be a replay.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from gateways.ledger import merkle
from gateways.ledger.records import RecordInvalid, SealedRecord
from qgw.errors import QgwError

MAGIC = b"QKDL"
VERSION = 1
MAX_RECORDS = 100_000
_HEAD = struct.Struct("!4sBI")
_LEN = struct.Struct("!I")


class BatchInvalid(QgwError):
    """Bytes that are not a well-formed batch; the message says where and why."""


def _check_unique(records: Sequence[SealedRecord]) -> None:
    seen: set[tuple[str, int]] = set()
    for rec in records:
        key = (rec.device, rec.seq)
        if key in seen:
            raise BatchInvalid(f"record {rec.name} appears twice in the batch")
        seen.add(key)


def encode_batch(records: Sequence[SealedRecord]) -> bytes:
    if not records:
        raise BatchInvalid("a batch holds at least one record")
    if len(records) > MAX_RECORDS:
        raise BatchInvalid(f"{len(records)} records, over the {MAX_RECORDS} a batch may hold")
    _check_unique(records)
    return encode_leaves([rec.encode() for rec in records])


def encode_leaves(encoded_records: Sequence[bytes]) -> bytes:
    """The batch of records given by their encodings, as a store keeps them.

    Unchecked: for callers whose bytes came from `SealedRecord.encode()` and whose
    (device, seq) pairs are known to be unique (the outbox). Others use encode_batch.
    """
    parts = [_HEAD.pack(MAGIC, VERSION, len(encoded_records))]
    for raw in encoded_records:
        parts.append(_LEN.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def decode_batch(data: bytes, *, max_records: int = MAX_RECORDS) -> list[SealedRecord]:
    """Every record of the batch `data`, in order; BatchInvalid unless `data` is exactly one."""
    if len(data) < _HEAD.size:
        raise BatchInvalid(f"batch truncated: {len(data)} bytes, shorter than its header")
    magic, version, count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise BatchInvalid("not a qkdgw ledger batch (bad magic)")
    if version != VERSION:
        raise BatchInvalid(f"batch version {version} is not supported (this is {VERSION})")
    if count == 0:
        raise BatchInvalid("batch holds no records")
    if count > max_records:
        raise BatchInvalid(f"batch claims {count} records, over the limit of {max_records}")
    view = memoryview(data)
    pos = _HEAD.size
    records = []
    for i in range(count):
        if pos + _LEN.size > len(view):
            raise BatchInvalid(f"batch truncated at record {i} of {count}")
        (length,) = _LEN.unpack_from(view, pos)
        pos += _LEN.size
        if pos + length > len(view):
            raise BatchInvalid(f"batch truncated in record {i} of {count}")
        try:
            records.append(SealedRecord.decode(view[pos:pos + length]))
        except RecordInvalid as exc:
            raise BatchInvalid(f"record {i} of the batch: {exc}") from None
        pos += length
    if pos != len(view):
        raise BatchInvalid(f"{len(view) - pos} bytes after the last record of the batch")
    _check_unique(records)
    return records


def batch_root(records: Sequence[SealedRecord]) -> bytes:
    """The Merkle root the writer signs and anchors: over each record's leaf, in order."""
    return merkle.root([rec.leaf() for rec in records])


def content_hash(batch: bytes) -> bytes:
    """SHA-256 of the batch bytes: names a batch independently of its root."""
    return hashlib.sha256(batch).digest()
