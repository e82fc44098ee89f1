"""The gateway's local key vault: QKD keys kept after the KME has handed them out.

A KME deletes a key once delivered, but a ledger record stays readable only as long
as someone holds its key: the reader (and the writer, to re-open what it wrote) keeps
every key it was given here, for as long as the records matter.

At rest. The vault is a SQLite file (WAL, synchronous=FULL: a key acknowledged as
stored survives a crash; losing one would lose its records for good). Each key is
sealed with AES-256-GCM under a key derived from the vault's master key, with the
key ID as associated data, so an entry moved to another ID fails to open. The master
key is 32 random bytes in a sibling file `<vault>.master`, created 0600 on first use,
or is passed in (from an HSM, a TPM-sealed blob, a container secret). A copy of the
vault file without its master key shows key IDs (they are on the ledger anyway) and
no key bytes. A check value in the file tells a wrong master key from a damaged entry.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path
from types import TracebackType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyclient.kdf import hkdf
from qgw.errors import QgwError
from qgw.secret import Secret
from qgw.sqlite_schema import ensure_schema

MASTER_LEN = 32
MAX_KEY_ID = 1024
SCHEMA_VERSION = 1
_NONCE_LEN = 12
_CHECK_AAD = b"qkdgw/vault/v1/check"
_ENTRY_AAD = b"qkdgw/vault/v1/key|"

SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE key (key_id TEXT PRIMARY KEY, nonce BLOB NOT NULL, sealed BLOB NOT NULL)
    WITHOUT ROWID;
"""


class VaultError(QgwError):
    """The vault cannot be opened or used; the message names the file and the reason."""


def master_path(path: Path) -> Path:
    """Where the vault at `path` keeps its master key unless one is passed in."""
    return path.with_name(path.name + ".master")


def _read_master(file: Path) -> Secret:
    mode = file.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise VaultError(f"{file}: master key readable by others (mode {mode & 0o777:o}); "
                         f"run `chmod 600 {file}`")
    data = file.read_bytes()
    if len(data) != MASTER_LEN:
        raise VaultError(f"{file}: a master key is {MASTER_LEN} bytes, this file has "
                         f"{len(data)}")
    return Secret(data)


def _create_master(file: Path) -> Secret | None:
    """A new master key in `file`, or None if another process just created one."""
    try:
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    key = Secret(os.urandom(MASTER_LEN))
    try:
        os.write(fd, key.expose())
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)            # the new name must survive a crash as well
    finally:
        os.close(dir_fd)
    return key


class KeyVault:
    def __init__(self, path: Path, master_key: Secret | None = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # SQLite gives the -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA secure_delete=ON")
                self._check_schema()
            except sqlite3.DatabaseError as exc:
                raise VaultError(f"{path} is not a key vault: {exc}") from None
            master = master_key if master_key is not None else self._master_from_file()
            if len(master) != MASTER_LEN:
                raise VaultError(f"a vault master key is {MASTER_LEN} bytes, not {len(master)}")
            sub = hkdf(master.expose(), salt=None, label="ledger/vault/v1")
            if master_key is None:
                master.wipe()           # ours, read from the file: not needed any more
            self._aead = AESGCM(sub.expose())
            sub.wipe()
            self._check_master()
        except BaseException:
            self._db.close()
            raise

    def _check_schema(self) -> None:
        version = ensure_schema(self._db, SCHEMA, SCHEMA_VERSION)
        if version is not None:
            raise VaultError(f"{self.path} is not a key vault of this version "
                             f"(schema {version}, expected {SCHEMA_VERSION})")

    def _check_value(self) -> bytes | None:
        row = self._db.execute("SELECT value FROM meta WHERE name='check'").fetchone()
        return None if row is None else bytes(row[0])

    def _master_from_file(self) -> Secret:
        file = master_path(self.path)
        if file.exists():
            return _read_master(file)
        if self._check_value() is not None:
            # A fresh master key would make every stored key unreadable: refuse.
            raise VaultError(f"{self.path} was set up with a master key, but {file} is "
                             "missing; restore it (or pass the master key in)")
        return _create_master(file) or _read_master(file)

    def _check_master(self) -> None:
        check = self._check_value()
        if check is None:
            nonce = os.urandom(_NONCE_LEN)
            self._db.execute("INSERT OR IGNORE INTO meta(name, value) VALUES ('check', ?)",
                             (nonce + self._aead.encrypt(nonce, b"", _CHECK_AAD),))
            check = self._check_value() or b""
        try:
            if len(check) != _NONCE_LEN + 16:
                raise InvalidTag
            self._aead.decrypt(check[:_NONCE_LEN], check[_NONCE_LEN:], _CHECK_AAD)
        except InvalidTag:
            raise VaultError(f"this master key does not open the vault {self.path}") from None

    @staticmethod
    def _aad(key_id: str) -> bytes:
        if not isinstance(key_id, str) or not key_id or len(key_id.encode()) > MAX_KEY_ID:
            raise VaultError(f"key ID {key_id!r} must be a string of 1..{MAX_KEY_ID} bytes")
        return _ENTRY_AAD + key_id.encode()

    def _open(self, key_id: str, nonce: bytes, sealed: bytes) -> Secret:
        aad = self._aad(key_id)
        try:
            return Secret(self._aead.decrypt(nonce, sealed, aad))
        except (InvalidTag, ValueError, TypeError):     # a damaged nonce is a ValueError
            raise VaultError(f"{self.path}: the entry of key {key_id!r} fails authentication "
                             "(the file was altered or damaged)") from None

    def put(self, key_id: str, key: Secret) -> None:
        """Keep `key` as `key_id`; storing the same key again is fine, another one is not."""
        aad = self._aad(key_id)
        if len(key) == 0:
            raise VaultError(f"refusing to store an empty key as {key_id!r}")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT nonce, sealed FROM key WHERE key_id=?",
                                       (key_id,)).fetchone()
                if row is None:
                    nonce = os.urandom(_NONCE_LEN)
                    self._db.execute("INSERT INTO key(key_id, nonce, sealed) VALUES (?, ?, ?)",
                                     (key_id, nonce, self._aead.encrypt(nonce, key.expose(),
                                                                        aad)))
                elif self._open(key_id, row[0], row[1]) != key:
                    raise VaultError(f"key {key_id!r} is already in the vault with other "
                                     "bytes; refusing to replace it")
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:     # also when COMMIT itself failed
                    self._db.execute("ROLLBACK")
                raise

    def get(self, key_id: str) -> Secret | None:
        self._aad(key_id)
        with self._lock:
            row = self._db.execute("SELECT nonce, sealed FROM key WHERE key_id=?",
                                   (key_id,)).fetchone()
        return None if row is None else self._open(key_id, row[0], row[1])

    def __contains__(self, key_id: object) -> bool:
        if not isinstance(key_id, str):
            return False
        with self._lock:
            return self._db.execute("SELECT 1 FROM key WHERE key_id=?",
                                    (key_id,)).fetchone() is not None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM key").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> KeyVault:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
