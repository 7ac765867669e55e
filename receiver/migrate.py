"""The receiver's schema, `receiver`, in the receiver's own database: numbered SQL files in
`receiver/migrations/`, each applied once, in order, in one transaction, recorded in
`receiver.migrations`. Concurrent runs (several replicas starting at once) wait for each other on
an advisory lock, so each file still runs once.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg

_FILE = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('receiver.migrate', 0))"
_BOOKKEEPING = """
CREATE SCHEMA IF NOT EXISTS receiver;
CREATE TABLE IF NOT EXISTS receiver.migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE receiver.migrations
    IS 'The receiver''s schema files applied (python -m receiver migrate).'
"""


def migration_files() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration shipped with the package, in order."""
    found = []
    for entry in resources.files("receiver").joinpath("migrations").iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text()))
    return sorted(found)


def migrate(url: str) -> list[str]:
    """Brings the receiver's schema up to date; returns the names of the files it applied."""
    applied: list[str] = []
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute(_LOCK)
        conn.execute(_BOOKKEEPING)
        done = {row[0] for row in conn.execute("SELECT version FROM receiver.migrations")}
        for version, name, text in migration_files():
            if version in done:
                continue
            conn.execute(text)  # several statements: allowed without parameters
            conn.execute(
                "INSERT INTO receiver.migrations (version, name) VALUES (%s, %s)", (version, name)
            )
            applied.append(name)
    return applied
