"""The one schema check of the project's SQLite files (KME store, ledger outbox, vault, journal).

An empty file gets `schema` and `version` (in PRAGMA user_version); a file of that
version is used as it is; anything else is the caller's to refuse, in its own words.
"""

from __future__ import annotations

import sqlite3


def ensure_schema(db: sqlite3.Connection, schema: str, version: int) -> int | None:
    """Create the schema in an empty database; return the version found if it is not ours."""
    found = db.execute("PRAGMA user_version").fetchone()[0]
    tables = db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]
    if found == 0 and tables == 0:
        db.executescript(schema)
        db.execute(f"PRAGMA user_version={version}")
        return None
    return None if found == version else int(found)
