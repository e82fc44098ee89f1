"""The reader's durable progress: where it is on the chain, what it delivered, and its output.

    reader.sqlite   meta: cursor (last block fully read), out_length (bytes of the output
                    file that belong to committed batches); batch: every batch handled
                    (by transaction hash) and its outcome; seen: every (device, seq)
                    delivered, and the batch that delivered it
    out             the decrypted readings, one JSON object per line (JSONL)

Exactly once across crashes: a batch's lines are appended to `out` and fsynced, then
one SQLite transaction (WAL, synchronous=FULL) records the batch, its (device, seq)
pairs and the new length of `out`. A crash between the two leaves lines past the
committed length: opening the journal cuts them off, and the batch is read again.
A restart resumes after `cursor`; batches of a block read only in part are
recognised by their transaction hash and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgw.errors import QgwError
from qgw.sqlite_schema import ensure_schema

log = logging.getLogger("qgw.gateway.ledger")

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE batch (tx_hash TEXT PRIMARY KEY, block INTEGER NOT NULL, outcome TEXT NOT NULL)
    WITHOUT ROWID;
CREATE TABLE seen (device TEXT NOT NULL, seq INTEGER NOT NULL, tx_hash TEXT NOT NULL,
                   PRIMARY KEY (device, seq)) WITHOUT ROWID;
"""


class JournalError(QgwError):
    """The reader's state cannot be opened or written; the message names the file."""


@dataclass(frozen=True)
class Delivered:
    """One decrypted reading and where it came from, as written to the output file."""

    device: str
    seq: int
    ts_ms: int
    values: dict[str, Any]
    key_id: str
    writer: str
    tx_hash: str
    block: int

    def line(self) -> bytes:
        return json.dumps({"device": self.device, "seq": self.seq, "ts_ms": self.ts_ms,
                           "values": self.values, "key_id": self.key_id,
                           "writer": self.writer, "tx": self.tx_hash, "block": self.block},
                          sort_keys=True, separators=(",", ":")).encode() + b"\n"


class ReaderJournal:
    def __init__(self, path: Path, out: Path) -> None:
        self.path = path
        self.out_path = out
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._check_schema()
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"{path} is not a ledger reader journal: {exc}") from None
        # Decrypted readings: private to the gateway's user until an operator decides.
        fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self._out = os.fdopen(fd, "ab")
        self._trim_uncommitted()

    def _check_schema(self) -> None:
        version = ensure_schema(self._db, SCHEMA, SCHEMA_VERSION)
        if version is not None:
            raise JournalError(f"{self.path} is not a reader journal of this version "
                               f"(schema {version}, expected {SCHEMA_VERSION})")

    def _meta(self, name: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return None if row is None else int(row[0])

    def _trim_uncommitted(self) -> None:
        committed = self._meta("out_length") or 0
        size = os.fstat(self._out.fileno()).st_size
        if size > committed:
            log.warning("%s: dropping %d bytes a crash left after the last committed batch "
                        "(that batch is read again)", self.out_path, size - committed)
            os.ftruncate(self._out.fileno(), committed)
            os.fsync(self._out.fileno())
        elif size < committed:
            # Someone truncated or replaced the file: carry on from what is there.
            log.warning("%s is shorter than the journal says (%d < %d bytes): appending to it",
                        self.out_path, size, committed)
            self._set_length(size)

    def _set_length(self, length: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('out_length', ?)",
                             (length,))

    # -- reading state --------------------------------------------------------------

    @property
    def cursor(self) -> int | None:
        """The last block read completely; None before the first."""
        with self._lock:
            return self._meta("cursor")

    def batch_outcome(self, tx_hash: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT outcome FROM batch WHERE tx_hash=?",
                                   (tx_hash,)).fetchone()
        return None if row is None else str(row[0])

    def delivered_by(self, device: str, seq: int) -> str | None:
        """The transaction of the batch that delivered (device, seq), if one did."""
        with self._lock:
            row = self._db.execute("SELECT tx_hash FROM seen WHERE device=? AND seq=?",
                                   (device, seq)).fetchone()
        return None if row is None else str(row[0])

    # -- progress -------------------------------------------------------------------

    def commit(self, tx_hash: str, block: int, outcome: str,
               delivered: Sequence[Delivered]) -> None:
        """Append `delivered` to the output, then record the batch as handled."""
        data = b"".join(d.line() for d in delivered)
        with self._lock:
            if data:
                self._out.write(data)
                self._out.flush()
                os.fsync(self._out.fileno())
            length = self._out.tell()
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("INSERT INTO batch(tx_hash, block, outcome) VALUES (?, ?, ?)",
                           (tx_hash, block, outcome))
                db.executemany("INSERT INTO seen(device, seq, tx_hash) VALUES (?, ?, ?)",
                               _seen_rows(delivered, tx_hash))
                db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('out_length', ?)",
                           (length,))
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def advance(self, block: int) -> None:
        """Every batch up to `block` is handled (the cursor never moves back)."""
        with self._lock:
            current = self._meta("cursor")
            if current is None or block > current:
                self._db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('cursor', ?)",
                                 (block,))

    def counts(self) -> dict[str, int]:
        """Batches handled by outcome, all runs."""
        with self._lock:
            rows = self._db.execute("SELECT outcome, count(*) FROM batch GROUP BY outcome")
            return {str(k): int(v) for k, v in rows}

    def close(self) -> None:
        with self._lock:
            self._out.close()
            self._db.close()


def _seen_rows(delivered: Iterable[Delivered], tx_hash: str) -> list[tuple[str, int, str]]:
    return [(d.device, d.seq, tx_hash) for d in delivered]
