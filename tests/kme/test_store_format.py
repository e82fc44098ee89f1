"""A store file of another format is refused with a clear message, not half-used."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kme.store import SCHEMA_VERSION, Store, StoreError


def test_new_store_is_stamped_and_reopens(tmp_path: Path) -> None:
    Store(tmp_path / "k.sqlite").close()
    db = sqlite3.connect(tmp_path / "k.sqlite")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()
    Store(tmp_path / "k.sqlite").close()


@pytest.mark.parametrize("version", [0, SCHEMA_VERSION + 1])
def test_other_format_is_refused(tmp_path: Path, version: int) -> None:
    db = sqlite3.connect(tmp_path / "k.sqlite")
    db.execute("CREATE TABLE block (peer TEXT, offset INTEGER, data BLOB)")
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match=r"another format.*move it away"):
        Store(tmp_path / "k.sqlite")


def test_store_files_are_owner_only(tmp_path: Path) -> None:
    s = Store(tmp_path / "kme" / "k.sqlite")
    with s.tx():
        s.ensure_link("KME_B")
    for f in (tmp_path / "kme").iterdir():  # the database and its -wal/-shm files
        assert f.stat().st_mode & 0o077 == 0, f
    s.close()
