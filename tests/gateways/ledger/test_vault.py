"""The key vault: keys kept encrypted at rest, refused when altered, never replaced."""

from __future__ import annotations

import shutil
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from gateways.ledger.vault import MASTER_LEN, KeyVault, VaultError, master_path
from qgw.secret import Secret

# Distinctive bytes, easy to find in a file if they were ever written in clear.
KEYS = {f"ks-{i:02d}:{i}": Secret(bytes([0xA5, i]) * 16) for i in range(20)}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "vault.sqlite"


def filled(path: Path, **kw: Secret) -> KeyVault:
    vault = KeyVault(path, **kw)
    for key_id, key in KEYS.items():
        vault.put(key_id, key)
    return vault


def on_disk(path: Path) -> bytes:
    """Every byte SQLite keeps for the vault: the database, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*")
                    if p != master_path(path))


def test_put_get(path: Path) -> None:
    with filled(path) as vault:
        assert vault.count() == len(KEYS)
        for key_id, key in KEYS.items():
            assert key_id in vault
            assert vault.get(key_id) == key
        assert vault.get("unknown:1") is None
        assert "unknown:1" not in vault and 17 not in vault
        assert "SECRET" in repr(vault.get("ks-00:0"))


def test_keys_survive_reopening(path: Path) -> None:
    filled(path).close()
    with KeyVault(path) as vault:
        assert vault.count() == len(KEYS)
        assert vault.get("ks-07:7") == KEYS["ks-07:7"]


def test_same_key_again_is_fine_another_is_refused(path: Path) -> None:
    with filled(path) as vault:
        vault.put("ks-03:3", Secret(KEYS["ks-03:3"].expose()))
        with pytest.raises(VaultError, match="'ks-03:3' is already in the vault with other"):
            vault.put("ks-03:3", Secret(bytes(32)))
        assert vault.get("ks-03:3") == KEYS["ks-03:3"]
        assert vault.count() == len(KEYS)


def test_files_are_owner_only(path: Path) -> None:
    filled(path).close()
    master = master_path(path)
    assert master.name == "vault.sqlite.master"
    assert stat.S_IMODE(master.stat().st_mode) == 0o600
    assert len(master.read_bytes()) == MASTER_LEN
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_encrypted_at_rest(path: Path) -> None:
    vault = filled(path)
    raw = on_disk(path)                 # while open: entries may still be in the WAL only
    vault.close()
    raw += on_disk(path)
    assert b"ks-05:5" in raw            # key IDs are not secret (they are on the ledger)
    for key in KEYS.values():
        material = key.expose()
        assert material not in raw
        assert material[:8] not in raw
    assert master_path(path).read_bytes() not in raw


def test_copied_without_master_key_reveals_nothing(path: Path, tmp_path: Path) -> None:
    filled(path).close()
    stolen = tmp_path / "thief" / "vault.sqlite"
    stolen.parent.mkdir()
    shutil.copy(path, stolen)
    with pytest.raises(VaultError, match=r"set up with a master key, but .*\.master is missing"):
        KeyVault(stolen)
    assert not master_path(stolen).exists()       # and no new master key was made for it
    with pytest.raises(VaultError, match="this master key does not open the vault"):
        KeyVault(stolen, master_key=Secret(bytes(MASTER_LEN)))


def test_master_key_passed_in(path: Path) -> None:
    master = Secret(bytes(range(32)))
    filled(path, master_key=master).close()
    assert not master_path(path).exists()
    with KeyVault(path, master_key=Secret(bytes(range(32)))) as vault:
        assert vault.get("ks-01:1") == KEYS["ks-01:1"]
    with pytest.raises(VaultError, match="does not open"):
        KeyVault(path, master_key=Secret(bytes(range(1, 33))))
    with pytest.raises(VaultError, match="master key is 32 bytes, not 16"):
        KeyVault(path, master_key=Secret(bytes(16)))


def test_master_key_file_too_open_or_wrong(path: Path) -> None:
    KeyVault(path).close()
    master = master_path(path)
    master.chmod(0o644)
    with pytest.raises(VaultError, match=r"readable by others .*run `chmod 600 "):
        KeyVault(path)
    master.chmod(0o600)
    master.write_bytes(b"short")
    with pytest.raises(VaultError, match="master key is 32 bytes, this file has 5"):
        KeyVault(path)


def _sql(path: Path, statement: str, *args: object) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute(statement, args)
    db.close()


def test_corrupt_entry_is_reported(path: Path) -> None:
    filled(path).close()
    _sql(path, "UPDATE key SET sealed = zeroblob(length(sealed)) WHERE key_id = 'ks-02:2'")
    with KeyVault(path) as vault:
        with pytest.raises(VaultError, match="entry of key 'ks-02:2' fails authentication"):
            vault.get("ks-02:2")
        with pytest.raises(VaultError, match="fails authentication"):
            vault.put("ks-02:2", KEYS["ks-02:2"])
        assert vault.get("ks-01:1") == KEYS["ks-01:1"]         # the others are fine


def test_damaged_nonce_is_reported(path: Path) -> None:
    filled(path).close()
    _sql(path, "UPDATE key SET nonce = x'00' WHERE key_id = 'ks-04:4'")
    with KeyVault(path) as vault, pytest.raises(VaultError, match="fails authentication"):
        vault.get("ks-04:4")


def test_entry_moved_to_another_id_fails(path: Path) -> None:
    """The key ID is the entry's associated data: a swapped entry does not open."""
    filled(path).close()
    _sql(path, "DELETE FROM key WHERE key_id = 'ks-09:9'")
    _sql(path, "UPDATE key SET key_id = 'ks-09:9' WHERE key_id = 'ks-08:8'")
    with KeyVault(path) as vault, pytest.raises(VaultError, match="'ks-09:9' fails"):
        vault.get("ks-09:9")


def test_not_a_vault(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is no database" * 100)
    with pytest.raises(VaultError, match="is not a key vault"):
        KeyVault(path)
    other = path.with_name("other.sqlite")
    _sql(other, "CREATE TABLE t (x)")
    with pytest.raises(VaultError, match="not a key vault of this version"):
        KeyVault(other)


def test_bad_arguments(path: Path) -> None:
    with KeyVault(path) as vault:
        with pytest.raises(VaultError, match="key ID '' must be"):
            vault.put("", Secret(b"k" * 32))
        with pytest.raises(VaultError, match="must be a string"):
            vault.get("x" * 2000)
        with pytest.raises(VaultError, match="refusing to store an empty key"):
            vault.put("k:1", Secret(b""))


def test_threads_share_a_vault(path: Path) -> None:
    with KeyVault(path) as vault:
        def worker(t: int) -> None:
            for i in range(25):
                vault.put(f"t{t}:{i}", Secret(bytes([t, i]) * 16))
                vault.put(f"shared:{i}", Secret(bytes([0, i]) * 16))     # same bytes: fine
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(1, 5)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert vault.count() == 4 * 25 + 25
        assert vault.get("t3:7") == Secret(bytes([3, 7]) * 16)
