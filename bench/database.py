"""The benchmark's own databases on the local PostgreSQL: created fresh, always dropped.

Names carry the benchmark's pid (`bench_<pid>_<role>`), so two runs never share one, and a run
that was killed with SIGKILL leaves names that `drop_stale()` can recognise by their dead pid.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from db.settings import maintenance_url

_NAME = re.compile(r"^bench_(\d+)_\w+$")
_created: list[str] = []
_DROP = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")


@dataclass(frozen=True, slots=True)
class Database:
    name: str
    url: str


def url_for(base_url: str, name: str) -> str:
    """`base_url` with its database replaced by `name` (keeps host, user and query)."""
    parts = urlsplit(base_url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{name}{query}"


def create(base_url: str, role: str) -> Database:
    name = f"bench_{os.getpid()}_{role}"
    with psycopg.connect(maintenance_url(base_url), autocommit=True) as conn:
        conn.execute(_DROP.format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    _created.append(name)
    return Database(name, url_for(base_url, name))


def drop_all(base_url: str) -> None:
    """Drop every database this run created (WITH FORCE: children may still hold connections)."""
    if not _created:
        return
    try:
        with psycopg.connect(maintenance_url(base_url), autocommit=True) as conn:
            for name in list(_created):
                conn.execute(_DROP.format(sql.Identifier(name)))
                _created.remove(name)
    except psycopg.Error as exc:
        print(f"bench: could not drop {', '.join(_created)}: {exc}", file=sys.stderr)


def drop_stale(base_url: str) -> list[str]:
    """Drop bench_<pid>_* databases whose pid is no longer running (a run killed with -9)."""
    dropped = []
    with psycopg.connect(maintenance_url(base_url), autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_%'")
        for (name,) in rows.fetchall():
            match = _NAME.match(name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            conn.execute(_DROP.format(sql.Identifier(name)))
            dropped.append(name)
    return dropped


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def migrate(db: Database) -> None:
    """`paymentsctl migrate`, as an operator would run it."""
    _paymentsctl(db, "migrate")


def create_merchant(db: Database, name: str) -> tuple[str, str]:
    """`paymentsctl merchant create NAME`; returns (merchant id, API key)."""
    out = _paymentsctl(db, "merchant", "create", name)
    data = json.loads(out)
    return data["id"], data["api_key"]


def _paymentsctl(db: Database, *args: str) -> str:
    env = dict(os.environ, DATABASE_URL=db.url)
    proc = subprocess.run(
        [sys.executable, "-c", "from admin.cli import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"paymentsctl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def server_facts(base_url: str) -> dict[str, str]:
    """Version and the durability settings every published figure must have on."""
    names = ("server_version", "fsync", "synchronous_commit", "full_page_writes",
             "shared_buffers", "max_connections", "wal_level")
    with psycopg.connect(maintenance_url(base_url), autocommit=True) as conn:
        facts = {}
        for n in names:
            shown = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(n))).fetchone()
            facts[n] = str(shown[0]) if shown else ""
        row = conn.execute("SELECT version()").fetchone()
        facts["version"] = str(row[0]) if row else ""
    return facts
