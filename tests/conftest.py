"""Shared fixtures: a migrated database per test, cloned from a per-session template.

Migrating takes a few hundred milliseconds; `CREATE DATABASE … TEMPLATE` takes a few dozen, so the
suite migrates once per process and clones for every test. Names carry the process id and a random
part, so parallel pytest processes against the same server never collide.

`TEST_DATABASE_URL` names the server (its database is where CREATE DATABASE runs); the default is
the local socket. `TEST_DATABASE_URL=private` runs the session on a throw-away cluster (tmpfs,
fsync off), where a clone and a drop cost about a third of what they cost on a server with fsync on.

Nothing is left behind. The session's connection to the server is checked before each use and
replaced when the server closed it, so one blip (a restart, a terminated session) costs no test.
SIGTERM stops the run as Ctrl-C does (pytest then tears every fixture down, dropping their
databases), and whatever a teardown could not drop is dropped at exit. A run that dies without
either (SIGKILL, a crash) leaves its databases marked with its pid, and the next session drops
the databases of pids that no longer run.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings
from psycopg import sql

# `tests.support` must import the same way under `pytest` and `python -m pytest`.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from db.migrate import upgrade  # noqa: E402
from ledger.merchants import NewKey, create_merchant  # noqa: E402
from tests.support import with_database  # noqa: E402
from tests.support.pgcluster import PgCluster  # noqa: E402
from tests.support.receiver import Receiver  # noqa: E402
from tests.support.tcpproxy import TcpProxy  # noqa: E402

# In CI every run has the same property-test examples (a fresh clone has no example database),
# so a red run reproduces exactly; locally they vary from run to run and find new cases.
hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

DB_PREFIX = "payments_test_"
_OWNER = f"pytest {socket.gethostname()} "
RECONNECT_FOR = 30.0  # seconds the admin connection keeps trying while the server is away


class AdminConnection:
    """The session's autocommit connection to the server's maintenance database. Checked with a
    round trip before each use and replaced when the server closed it; a statement is never sent
    twice (one that failed may have committed)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: psycopg.Connection | None = None

    def execute(self, query: Any, params: Any = None) -> psycopg.Cursor[Any]:
        return self._connection().execute(query, params)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> psycopg.Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            try:
                conn.execute("SELECT 1")
                return conn
            except psycopg.OperationalError:
                pass
        self.close()
        deadline = time.monotonic() + RECONNECT_FOR
        while True:
            try:
                self._conn = psycopg.connect(self.url, autocommit=True)
                return self._conn
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


# Databases this process created and has not dropped yet: what an exit must still drop.
_created: dict[str, AdminConnection] = {}


def _create(server: AdminConnection, name: str, template: str | None = None) -> None:
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
    _created[name] = server
    server.execute(query)
    # Marks the owner, so a later session can remove what a killed one left behind.
    server.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name), sql.Literal(f"{_OWNER}{os.getpid()}")
        )
    )


def _drop(server: AdminConnection, name: str) -> None:
    server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    _created.pop(name, None)


@atexit.register
def _drop_leftovers() -> None:
    """What a teardown did not drop (it failed, or never ran): dropped as the process exits."""
    for name, server in list(_created.items()):
        try:
            _drop(server, name)
        except psycopg.Error as exc:
            sys.stderr.write(f"could not drop test database {name}: {exc}\n")


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # As Ctrl-C: pytest stops, tears the fixtures down (dropping their databases) and exits.
    raise KeyboardInterrupt


def pytest_configure(config: pytest.Config) -> None:
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


def _sweep_orphans(server: AdminConnection) -> None:
    """Drop test databases of dead pytest processes on this host (a killed run skips teardown)."""
    rows = server.execute(
        "SELECT d.datname, shobj_description(d.oid, 'pg_database') FROM pg_database d "
        "WHERE d.datname LIKE %s",
        (DB_PREFIX.replace("_", r"\_") + "%",),
    ).fetchall()
    for name, comment in rows:
        if not comment or not comment.startswith(_OWNER):
            continue
        try:
            pid = int(comment.removeprefix(_OWNER))
            os.kill(pid, 0)
        except ValueError:
            continue
        except ProcessLookupError:
            _drop(server, name)
        except PermissionError:
            continue


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of the test server's maintenance database."""
    url = os.environ.get("TEST_DATABASE_URL") or "postgresql:///postgres"
    if url != "private":
        yield url
        return
    with PgCluster() as cluster:
        yield cluster.server_url


@pytest.fixture(scope="session")
def pg_server(pg_server_url: str) -> Iterator[AdminConnection]:
    """An autocommit connection to the test server's maintenance database that outlives a blip
    of the server."""
    server = AdminConnection(pg_server_url)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def template_db(pg_server_url: str, pg_server: AdminConnection) -> Iterator[str]:
    """Name of a database migrated to head, cloned by `db_url`. Never connect to it in a test:
    CREATE DATABASE … TEMPLATE fails while the template has sessions."""
    _sweep_orphans(pg_server)
    name = f"{DB_PREFIX}tpl_{os.getpid()}_{secrets.token_hex(4)}"
    _create(pg_server, name)
    try:
        upgrade(with_database(pg_server_url, name))
        yield name
    finally:
        _drop(pg_server, name)


_counter = 0


def _unique_name() -> str:
    global _counter
    _counter += 1
    return f"{DB_PREFIX}{os.getpid()}_{_counter}_{secrets.token_hex(3)}"


@pytest.fixture
def db_url(pg_server_url: str, pg_server: AdminConnection, template_db: str) -> Iterator[str]:
    """libpq URL of a fresh database at the newest migration, dropped WITH (FORCE) afterwards
    (connections the test left open are terminated)."""
    name = _unique_name()
    _create(pg_server, name, template=template_db)
    try:
        yield with_database(pg_server_url, name)
    finally:
        _drop(pg_server, name)


@pytest.fixture
def empty_db_url(pg_server_url: str, pg_server: AdminConnection) -> Iterator[str]:
    """URL of a database that exists but has no schema at all (for migration tests)."""
    name = _unique_name()
    _create(pg_server, name)
    try:
        yield with_database(pg_server_url, name)
    finally:
        _drop(pg_server, name)


@pytest.fixture
def missing_db_url(pg_server_url: str, pg_server: AdminConnection) -> Iterator[str]:
    """URL of a database that does not exist (yet); dropped afterwards if the test created it.
    For `paymentsctl migrate`, which must create it."""
    name = _unique_name()
    try:
        yield with_database(pg_server_url, name)
    finally:
        _drop(pg_server, name)


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection]:
    """A connection to `db_url` (autocommit off); closed after the test."""
    connection = psycopg.connect(db_url, autocommit=False)
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture
async def aconn(db_url: str) -> AsyncIterator[psycopg.AsyncConnection]:
    """An async connection to `db_url` (autocommit off); closed after the test."""
    connection = await psycopg.AsyncConnection.connect(db_url, autocommit=False)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def merchant(db_url: str) -> NewKey:
    """A committed merchant with an API key (on its own connection, so `conn` stays untouched)."""
    with psycopg.connect(db_url) as connection:
        return create_merchant(connection, "Test merchant")


@pytest.fixture
def pg_cluster() -> Iterator[PgCluster]:
    """A private, started PostgreSQL server that the test may stop, crash or restart. Its
    database `payments` does not exist yet: `pg_cluster.migrate()` creates and migrates it."""
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A started webhook receiver; register endpoints with `receiver.add_endpoint(path, secret)`."""
    with Receiver() as running:
        yield running


@pytest.fixture
def make_proxy() -> Iterator[Callable[[str], TcpProxy]]:
    """`make_proxy(url)` starts a TcpProxy to the server of `url` (TCP or unix socket); use
    `proxy.url_for(url)` to connect through it. All are stopped after the test."""
    proxies: list[TcpProxy] = []

    def make(url: str) -> TcpProxy:
        proxy = TcpProxy.for_url(url).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()
