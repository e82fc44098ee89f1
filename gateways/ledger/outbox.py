"""The writer's durable outbox: every sealed record is on disk before it is anchored.

Life of a record:

    add / add_many     queued: persisted, refused if its (device, seq) was seen before
    take_batch         batched: the oldest queued records form a new batch; its exact
                       bytes, Merkle root and every tree node are stored in one
                       transaction (a batch is a run of record ids: batches take queued
                       records in arrival order, so no record row is rewritten)
    mark_anchored      anchored: the transaction that carried the batch, and its block

A writer that crashes between take_batch and mark_anchored finds the batch in
`pending()` on restart, with the very bytes and root it may already have sent. It
sends those again: if the first transaction made it, the ledger contract refuses
the root as already anchored (and the writer confirms the batch from the chain)
instead of anchoring the records twice under a new root. Nothing is lost either:
every commit is one SQLite transaction in WAL mode with synchronous=FULL, so a
record `add` returned for survives SIGKILL and power loss.

Records stay after anchoring (nothing is ever deleted), so `proof(device, seq)` can
always show where a record is: its batch root, index, tree size, audit path (from
the stored tree nodes) and the anchoring transaction.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import TracebackType

from gateways.ledger import merkle
from gateways.ledger.batch import MAX_RECORDS, decode_batch, encode_leaves
from gateways.ledger.records import SealedRecord
from qgw.errors import QgwError
from qgw.sqlite_schema import ensure_schema

SCHEMA_VERSION = 1
_BATCH_OVERHEAD = 9         # batch header: magic, version, count
_RECORD_OVERHEAD = 4        # each record's length prefix
_CACHED_TREES = 4
_TX_HASH = re.compile(r"0x[0-9a-f]{64}")

SCHEMA = """
CREATE TABLE record (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order; never reused
    device TEXT NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,                     -- SealedRecord.encode(): also its Merkle leaf
    UNIQUE (device, seq)
);
CREATE TABLE batch (
    batch_id INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,              -- the batch is the records first_id..last_id:
    last_id INTEGER NOT NULL UNIQUE,        -- batches take queued records in arrival order
    size INTEGER NOT NULL,
    root BLOB NOT NULL,
    encoded BLOB NOT NULL,                  -- the exact bytes to anchor, again on a retry
    nodes BLOB NOT NULL,                    -- MerkleTree.nodes(): every audit path
    created_ms INTEGER NOT NULL,
    tx_hash TEXT,                           -- NULL until anchored
    block INTEGER
);
CREATE INDEX batch_pending ON batch(batch_id) WHERE tx_hash IS NULL;
"""


class OutboxError(QgwError):
    """The outbox cannot do what was asked; the message says why."""


@dataclass(frozen=True)
class PendingBatch:
    """A batch taken for anchoring and not yet confirmed anchored."""

    batch_id: int
    root: bytes
    encoded: bytes          # the batch bytes, as stored at take_batch
    size: int

    @cached_property
    def records(self) -> tuple[SealedRecord, ...]:
        """The records, decoded from `encoded` on first use (anchoring needs only bytes)."""
        return tuple(decode_batch(self.encoded, max_records=MAX_RECORDS))


@dataclass(frozen=True)
class InclusionProof:
    """Where a record is: leaf `index` of `size` in the batch with `batch_root`."""

    batch_id: int
    batch_root: bytes
    index: int
    size: int
    path: tuple[bytes, ...]
    tx_hash: str | None     # the anchoring transaction; None while pending
    block: int | None

    def verify(self, leaf_data: bytes) -> bool:
        """Whether `leaf_data` (a record's encoding) is the leaf this proof is about."""
        return merkle.verify_inclusion(leaf_data, self.index, self.size, self.path,
                                       self.batch_root)


def _tx_hash(value: str | bytes) -> str:
    text = "0x" + bytes(value).hex() if isinstance(value, bytes | bytearray) else value
    text = text.lower() if isinstance(text, str) else ""
    if not _TX_HASH.fullmatch(text):
        raise OutboxError(f"{value!r} is not a transaction hash (32 bytes)")
    return text


class Outbox:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._nodes_cache: dict[int, bytes] = {}     # batch_id -> tree nodes, oldest first
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk (WAL fsynced) when it returns, power loss included.
            self._db.execute("PRAGMA synchronous=FULL")
            self._check_schema()
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise OutboxError(f"{path} is not a ledger outbox: {exc}") from None
            raise

    def _check_schema(self) -> None:
        version = ensure_schema(self._db, SCHEMA, SCHEMA_VERSION)
        if version is not None:
            raise OutboxError(f"{self.path} is not a ledger outbox of this version "
                              f"(schema {version}, expected {SCHEMA_VERSION})")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:     # also when COMMIT itself failed
                    self._db.execute("ROLLBACK")
                raise

    # -- queueing --------------------------------------------------------------

    def add(self, rec: SealedRecord) -> bool:
        """Persist `rec`; False (and nothing stored) if its (device, seq) is known already."""
        return self.add_many([rec])[0]

    def add_many(self, recs: Iterable[SealedRecord]) -> list[bool]:
        """`add` for each record, in one transaction (one fsync for all of them)."""
        rows = [(rec.device, rec.seq, rec.encode()) for rec in recs]
        added = []
        with self._tx() as db:
            for row in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO record(device, seq, data) VALUES (?, ?, ?)", row)
                added.append(cur.rowcount == 1)
        return added

    # -- batching --------------------------------------------------------------

    def _batched_upto(self, db: sqlite3.Connection) -> int:
        """The last record id in a batch (0: none); every later record is queued."""
        return int(db.execute("SELECT coalesce(max(last_id), 0) FROM batch").fetchone()[0])

    def take_batch(self, max_records: int, *, max_bytes: int | None = None
                   ) -> PendingBatch | None:
        """The oldest queued records (at most `max_records`, and batch bytes at most
        `max_bytes`) as a new batch, stored before it is returned; None if none is queued."""
        if not 1 <= max_records <= MAX_RECORDS:
            raise ValueError(f"max_records must be in 1..{MAX_RECORDS}")
        with self._tx() as db:
            rows = db.execute("SELECT id, data FROM record WHERE id > ? ORDER BY id LIMIT ?",
                              (self._batched_upto(db), max_records)).fetchall()
            if not rows:
                return None
            if max_bytes is not None:
                rows = self._fit(rows, max_bytes)
            leaves = [bytes(data) for _, data in rows]
            encoded = encode_leaves(leaves)       # stored encodings: no need to re-encode
            tree = merkle.MerkleTree(leaves)
            cur = db.execute(
                "INSERT INTO batch(first_id, last_id, size, root, encoded, nodes, created_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rows[0][0], rows[-1][0], len(rows), tree.root, encoded, tree.nodes(),
                 int(time.time() * 1000)))
            batch_id = cur.lastrowid
        assert batch_id is not None
        return PendingBatch(batch_id, tree.root, encoded, len(rows))

    @staticmethod
    def _fit(rows: list[tuple[int, bytes]], max_bytes: int) -> list[tuple[int, bytes]]:
        total = _BATCH_OVERHEAD
        for n, (_, data) in enumerate(rows):
            total += _RECORD_OVERHEAD + len(data)
            if total > max_bytes:
                if n == 0:
                    raise OutboxError(f"the oldest queued record alone makes a batch of "
                                      f"{total} bytes, over max_bytes={max_bytes}")
                return rows[:n]
        return rows

    def pending(self) -> list[PendingBatch]:
        """Batches taken but not confirmed anchored, oldest first, with their stored bytes."""
        with self._lock:
            rows = self._db.execute("SELECT batch_id, root, encoded, size FROM batch "
                                    "WHERE tx_hash IS NULL ORDER BY batch_id").fetchall()
        return [PendingBatch(batch_id, bytes(root), bytes(encoded), size)
                for batch_id, root, encoded, size in rows]

    def mark_anchored(self, batch_id: int, tx_hash: str | bytes, block: int) -> None:
        """Record that `tx_hash` (in `block`) anchored the batch; saying so twice is fine.

        The same transaction in another block (a reorganisation mined it again) updates
        the block; another transaction for an anchored batch is an error.
        """
        tx = _tx_hash(tx_hash)
        if not isinstance(block, int) or block < 0:
            raise OutboxError(f"block {block!r} is not a block number")
        with self._tx() as db:
            row = db.execute("SELECT tx_hash, block FROM batch WHERE batch_id=?",
                             (batch_id,)).fetchone()
            if row is None:
                raise OutboxError(f"no batch {batch_id} in {self.path}")
            if row[0] is not None and row[0] != tx:
                raise OutboxError(f"batch {batch_id} is anchored already, by {row[0]} in "
                                  f"block {row[1]}; not by {tx}")
            db.execute("UPDATE batch SET tx_hash=?, block=? WHERE batch_id=?",
                       (tx, block, batch_id))

    # -- looking up ------------------------------------------------------------

    def record(self, device: str, seq: int) -> SealedRecord | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM record WHERE device=? AND seq=?",
                                   (device, seq)).fetchone()
        return None if row is None else SealedRecord.decode(bytes(row[0]))

    def proof(self, device: str, seq: int) -> InclusionProof | None:
        """Where record (device, seq) was batched; None while it is queued.

        OutboxError if the outbox never held that record.
        """
        with self._lock:
            db = self._db
            row = db.execute("SELECT id FROM record WHERE device=? AND seq=?",
                             (device, seq)).fetchone()
            if row is None:
                raise OutboxError(f"no record {device}#{seq} in {self.path}")
            record_id = row[0]
            batch = db.execute(
                "SELECT batch_id, first_id, size, root, tx_hash, block FROM batch "
                "WHERE last_id >= ? ORDER BY last_id LIMIT 1", (record_id,)).fetchone()
            if batch is None or batch[1] > record_id:
                return None
            batch_id, first_id, size, root, tx_hash, block = batch
            index = db.execute("SELECT count(*) FROM record WHERE id >= ? AND id < ?",
                               (first_id, record_id)).fetchone()[0]
            nodes = self._nodes(batch_id)
        h = merkle.HASH_LEN
        path = tuple(nodes[pos * h:(pos + 1) * h] for pos in merkle.path_positions(index, size))
        return InclusionProof(batch_id, bytes(root), index, size, path, tx_hash, block)

    def _nodes(self, batch_id: int) -> bytes:
        # A batch's tree never changes once taken, so the last few stay in memory: proofs
        # are asked for batch by batch, and a large blob is slow to read in pieces.
        nodes = self._nodes_cache.pop(batch_id, None)
        if nodes is None:
            nodes = bytes(self._db.execute("SELECT nodes FROM batch WHERE batch_id=?",
                                           (batch_id,)).fetchone()[0])
        self._nodes_cache[batch_id] = nodes
        while len(self._nodes_cache) > _CACHED_TREES:
            self._nodes_cache.pop(next(iter(self._nodes_cache)))
        return nodes

    def stats(self) -> dict[str, int]:
        """Records queued, batched (waiting for anchoring) and anchored; batches pending."""
        with self._lock:
            queued = self._db.execute("SELECT count(*) FROM record WHERE id > ?",
                                      (self._batched_upto(self._db),)).fetchone()[0]
            batched, pending, anchored, done = self._db.execute(
                "SELECT coalesce(sum(size) FILTER (WHERE tx_hash IS NULL), 0), "
                "count(*) FILTER (WHERE tx_hash IS NULL), "
                "coalesce(sum(size) FILTER (WHERE tx_hash IS NOT NULL), 0), "
                "count(*) FILTER (WHERE tx_hash IS NOT NULL) FROM batch").fetchone()
        return {"queued": queued, "batched": batched, "anchored": anchored,
                "pending_batches": pending, "anchored_batches": done}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

