"""Durable KME state in SQLite (WAL): the link key streams, reserved keys, in-flight requests.

Model. A QKD link delivers the same byte stream into the stores of both KMEs,
in blocks. A key is a range [offset, offset+length) of that stream; both KMEs
carve the same range, so they hold the same key without ever sending it.

- `block`    stream blocks not yet fully handed out, with a count of carved
             bytes; the bytes themselves are in `block_data` (kept apart so
             counting a carve does not rewrite the blob). A block is deleted,
             and its bytes overwritten on disk, once every byte was carved.
- `link`     per peer: `cursor` (first stream byte not yet allocated; the
             emitter's is authoritative, a receiver keeps the last one it was
             told), `end` (stream bytes held) and `confirmed_end` (emitter only:
             bytes the peer has acknowledged; only those may be allocated).
- `key`      keys reserved for slave SAEs that have not fetched them yet, with
             `holder` rows: each listed SAE may take the key once (`taken`
             remembers who did while others have yet to; the key is deleted
             when the last holder took it).
- `pending`  key IDs this KME has promised to its own master but not yet
             delivered; after a failure or a crash they are released at the peer.
- `released` key IDs released at a peer's request, with the stream range a
             reserved key had: a late reservation of the same ID is refused,
             and a release sent again (its answer was lost) gets the same
             answer instead of discarding bytes twice.

Every commit is one transaction; with WAL and synchronous=NORMAL a commit
survives SIGKILL of the process (only an OS crash could lose the last ones).
`secure_delete` makes SQLite overwrite deleted key material on disk.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kme.errors import ApiError
from qgw.errors import QgwError
from qgw.sqlite_schema import ensure_schema

SCHEMA = """
CREATE TABLE IF NOT EXISTS link (
    peer TEXT PRIMARY KEY,
    cursor INTEGER NOT NULL DEFAULT 0,
    end INTEGER NOT NULL DEFAULT 0,
    confirmed_end INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS block (
    peer TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    consumed INTEGER NOT NULL DEFAULT 0,
    confirmed INTEGER NOT NULL,
    PRIMARY KEY (peer, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS block_data (
    peer TEXT NOT NULL,
    offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (peer, offset)
);
CREATE TABLE IF NOT EXISTS key (
    key_id TEXT PRIMARY KEY,
    peer TEXT NOT NULL,
    master TEXT NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    material BLOB NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS holder (
    key_id TEXT NOT NULL,
    sae TEXT NOT NULL,
    taken INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, sae)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS released (
    key_id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    offset INTEGER,
    length INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    key_id TEXT PRIMARY KEY,
    peer TEXT NOT NULL,
    offset INTEGER,
    length INTEGER NOT NULL,
    created REAL NOT NULL
) WITHOUT ROWID;
"""


SCHEMA_VERSION = 1


class StoreError(QgwError):
    """The store file cannot be used (another schema version, not a KME store)."""


class StreamGap(Exception):
    """A stream range that should be held is missing (store damaged or out of sync)."""


@dataclass(frozen=True)
class LinkState:
    cursor: int
    end: int
    confirmed_end: int


@dataclass(frozen=True)
class Pending:
    key_id: str
    offset: int | None
    length: int


@dataclass(frozen=True)
class Released:
    """A released key ID and the stream range its reserved key had here (None: none)."""

    range: tuple[int, int] | None


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The store holds key material: owner-only from creation (SQLite gives its
        # -wal and -shm files the database file's mode).
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._check_schema()
        self._in_tx = False

    def _check_schema(self) -> None:
        version = ensure_schema(self._db, SCHEMA, SCHEMA_VERSION)
        if version is not None:
            self._db.close()
            raise StoreError(
                f"{self.path} holds a key store of another format (schema {version}, this KME "
                f"uses {SCHEMA_VERSION}); move it away to start with an empty store")

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def tx(self) -> Iterator[None]:
        """One atomic unit of work; nested use joins the outer transaction."""
        if self._in_tx:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_tx = True
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._in_tx = False

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """All or nothing inside an outer `tx` (undone alone on error); else a `tx`.

        Lets one transaction (one commit) carry a batch of independent units,
        such as the groups of one reservation call.
        """
        if not self._in_tx:
            with self.tx():
                yield
            return
        self._db.execute("SAVEPOINT unit")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO unit")
            self._db.execute("RELEASE unit")
            raise
        else:
            self._db.execute("RELEASE unit")

    # -- link stream ---------------------------------------------------------

    def ensure_link(self, peer: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO link(peer) VALUES (?)", (peer,))

    def link_state(self, peer: str) -> LinkState:
        row = self._db.execute(
            "SELECT cursor, end, confirmed_end FROM link WHERE peer=?", (peer,)
        ).fetchone()
        return LinkState(*row) if row else LinkState(0, 0, 0)

    def append_blocks(self, peer: str, blocks: Sequence[tuple[int, bytes]], *,
                      confirmed: bool) -> None:
        """Add stream blocks; a block already held (a re-push) is ignored."""
        with self.tx():
            self.ensure_link(peer)
            self._db.executemany(
                "INSERT OR IGNORE INTO block(peer, offset, length, confirmed) VALUES (?, ?, ?, ?)",
                [(peer, off, len(data), int(confirmed)) for off, data in blocks],
            )
            self._db.executemany(
                "INSERT OR IGNORE INTO block_data(peer, offset, data) VALUES (?, ?, ?)",
                [(peer, off, data) for off, data in blocks],
            )
            end = max(off + len(data) for off, data in blocks) if blocks else 0
            self._db.execute("UPDATE link SET end=max(end, ?) WHERE peer=?", (end, peer))

    def unconfirmed_blocks(self, peer: str) -> list[tuple[int, bytes]]:
        return self._db.execute(
            "SELECT b.offset, d.data FROM block b JOIN block_data d "
            "ON d.peer=b.peer AND d.offset=b.offset "
            "WHERE b.peer=? AND b.confirmed=0 ORDER BY b.offset", (peer,)
        ).fetchall()

    def confirm_blocks(self, peer: str, upto: int) -> None:
        upto = min(upto, self.link_state(peer).end)  # never confirm bytes not held
        with self.tx():
            self._db.execute(
                "UPDATE block SET confirmed=1 WHERE peer=? AND confirmed=0 AND offset < ?",
                (peer, upto),
            )
            self._db.execute(
                "UPDATE link SET confirmed_end=max(confirmed_end, ?) WHERE peer=?", (upto, peer)
            )

    def note_cursor(self, peer: str, cursor: int) -> None:
        """Receiver side: remember the emitter's allocation cursor (monotonic)."""
        self._db.execute("UPDATE link SET cursor=max(cursor, ?) WHERE peer=?", (cursor, peer))

    def allocate(self, peer: str, lengths: Sequence[int]) -> list[int]:
        """Emitter side: give each length a fresh range of the confirmed stream."""
        state = self.link_state(peer)
        total = sum(lengths)
        if state.cursor + total > state.confirmed_end:
            raise ApiError.no_key(state.confirmed_end - state.cursor, total)
        offsets = []
        pos = state.cursor
        for n in lengths:
            offsets.append(pos)
            pos += n
        self._db.execute("UPDATE link SET cursor=? WHERE peer=?", (pos, peer))
        return offsets

    def carve(self, peer: str, offset: int, length: int) -> bytes:
        """Take stream bytes [offset, offset+length); drop blocks all of whose bytes are taken."""
        end = offset + length
        rows = self._db.execute(
            "SELECT offset, length, consumed FROM block WHERE peer=? AND offset < ? "
            "ORDER BY offset DESC",
            (peer, end),
        )
        spans: list[tuple[int, int, int]] = []  # (block offset, start in block, stop in block)
        spent: list[tuple[str, int]] = []
        counted: list[tuple[int, str, int]] = []
        for boff, blen, consumed in rows:
            if boff + blen <= offset:
                break
            lo, hi = max(offset, boff) - boff, min(end, boff + blen) - boff
            spans.append((boff, lo, hi))
            if consumed + (hi - lo) >= blen:
                spent.append((peer, boff))
            else:
                counted.append((hi - lo, peer, boff))
        if sum(hi - lo for _, lo, hi in spans) != length:
            raise StreamGap(f"stream range [{offset}, {end}) from {peer} is not held")
        pieces = []
        for boff, lo, hi in sorted(spans):
            (piece,) = self._db.execute(
                "SELECT substr(data, ?, ?) FROM block_data WHERE peer=? AND offset=?",
                (lo + 1, hi - lo, peer, boff),
            ).fetchone()
            pieces.append(piece)
        if counted:
            self._db.executemany(
                "UPDATE block SET consumed=consumed+? WHERE peer=? AND offset=?", counted
            )
        if spent:
            self._db.executemany("DELETE FROM block WHERE peer=? AND offset=?", spent)
            self._db.executemany("DELETE FROM block_data WHERE peer=? AND offset=?", spent)
        return b"".join(pieces)

    def available_bytes(self, peer: str, *, emitter: bool) -> int:
        s = self.link_state(peer)
        return max(0, (s.confirmed_end if emitter else s.end) - s.cursor)

    def held_bytes(self, peer: str) -> int:
        """Stream bytes held but not yet generated into keys (for the capacity limit)."""
        s = self.link_state(peer)
        return max(0, s.end - s.cursor)

    # -- keys reserved for slaves -------------------------------------------

    def add_key(self, key_id: str, peer: str, master: str, offset: int, length: int,
                material: bytes, holders: Sequence[str]) -> None:
        self._db.execute(
            "INSERT INTO key(key_id, peer, master, offset, length, material, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key_id, peer, master, offset, length, material, time.time()),
        )
        self._db.executemany(
            "INSERT INTO holder(key_id, sae) VALUES (?, ?)", [(key_id, h) for h in holders]
        )

    def take_keys(self, sae: str, master: str, key_ids: Sequence[str]) -> list[bytes]:
        """Hand keys to one of their slaves, once; all or nothing (call inside `tx`)."""
        out = []
        db = self._db
        for key_id in key_ids:
            row = db.execute(
                "SELECT k.master, k.material, h.taken FROM key k LEFT JOIN holder h "
                "ON h.key_id=k.key_id AND h.sae=? WHERE k.key_id=?", (sae, key_id)
            ).fetchone()
            if row is None:
                raise ApiError.bad_request(f"unknown key_ID {key_id}")
            if row[0] != master or row[2] is None:
                raise ApiError.unauthorized(
                    f"key_ID {key_id} is not a key from master SAE {master} for SAE {sae}"
                )
            if row[2]:
                raise ApiError.bad_request(f"key_ID {key_id} was already delivered to {sae}")
            db.execute("UPDATE holder SET taken=1 WHERE key_id=? AND sae=?", (key_id, sae))
            if db.execute("SELECT 1 FROM holder WHERE key_id=? AND taken=0 LIMIT 1",
                          (key_id,)).fetchone() is None:
                db.execute("DELETE FROM holder WHERE key_id=?", (key_id,))
                db.execute("DELETE FROM key WHERE key_id=?", (key_id,))
            out.append(row[1])
        return out

    def drop_key(self, key_id: str, peer: str) -> tuple[int, int] | None:
        """Forget a key reserved over the link to `peer` that nobody will fetch.

        Returns its stream range. Keys that did not come from that link's
        stream (relayed, or this KME's own copies) are left alone.
        """
        row = self._db.execute(
            "SELECT offset, length FROM key WHERE key_id=? AND peer=? AND offset >= 0",
            (key_id, peer),
        ).fetchone()
        if row is None:
            return None
        self._db.execute("DELETE FROM holder WHERE key_id=?", (key_id,))
        self._db.execute("DELETE FROM key WHERE key_id=?", (key_id,))
        return row[0], row[1]

    def key_record(self, key_id: str) -> tuple[str, bytes] | None:
        """(master, material) of a stored key, to recognise a repeated delivery."""
        row = self._db.execute(
            "SELECT master, material FROM key WHERE key_id=?", (key_id,)
        ).fetchone()
        return None if row is None else (row[0], bytes(row[1]))

    def reserved_key_count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM key").fetchone()[0])

    # -- in-flight promises to our own masters ------------------------------

    def add_pending(self, peer: str, entries: Sequence[Pending]) -> None:
        now = time.time()
        self._db.executemany(
            "INSERT INTO pending(key_id, peer, offset, length, created) VALUES (?, ?, ?, ?, ?)",
            [(p.key_id, peer, p.offset, p.length, now) for p in entries],
        )

    def drop_pending(self, key_ids: Sequence[str]) -> None:
        self._db.executemany("DELETE FROM pending WHERE key_id=?", [(k,) for k in key_ids])

    def pending(self, peer: str) -> list[Pending]:
        rows = self._db.execute(
            "SELECT key_id, offset, length FROM pending WHERE peer=? ORDER BY created", (peer,)
        ).fetchall()
        return [Pending(*r) for r in rows]

    # -- released key IDs ------------------------------------------------------

    def add_released(self, key_id: str, rng: tuple[int, int] | None) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO released(key_id, at, offset, length) VALUES (?, ?, ?, ?)",
            (key_id, time.time(), *(rng or (None, None))),
        )

    def released(self, key_id: str) -> Released | None:
        """How a key ID was released here, or None if it never was."""
        row = self._db.execute(
            "SELECT offset, length FROM released WHERE key_id=?", (key_id,)
        ).fetchone()
        if row is None:
            return None
        return Released((row[0], row[1]) if row[0] is not None else None)

    def any_released(self, key_ids: Sequence[str]) -> bool:
        for k in key_ids:
            if self._db.execute("SELECT 1 FROM released WHERE key_id=?", (k,)).fetchone():
                return True
        return False

    def prune_released(self, older_than_s: float) -> None:
        self._db.execute("DELETE FROM released WHERE at < ?", (time.time() - older_than_s,))
