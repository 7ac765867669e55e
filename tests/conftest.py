"""Shared fixtures: a migrated database per test, cloned from a per-session template.

Migrating takes a few hundred milliseconds; `CREATE DATABASE … TEMPLATE` takes a few dozen, so the
suite migrates once per process and clones for every test. Names carry the process id and a random
part, so parallel pytest processes against the same server never collide.

`TEST_DATABASE_URL` names the server (its database is where CREATE DATABASE runs); the default is
the local socket. `TEST_DATABASE_URL=private` runs the session on a throw-away cluster (tmpfs,
fsync off), where a clone and a drop cost about a third of what they cost on a server with fsync on.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

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


def _create(server: psycopg.Connection, name: str, template: str | None = None) -> None:
    query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
    server.execute(query)
    # Marks the owner, so a later session can remove what a killed one left behind.
    server.execute(
        sql.SQL("COMMENT ON DATABASE {} IS {}").format(
            sql.Identifier(name), sql.Literal(f"{_OWNER}{os.getpid()}")
        )
    )


def _drop(server: psycopg.Connection, name: str) -> None:
    server.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _sweep_orphans(server: psycopg.Connection) -> None:
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
def pg_server(pg_server_url: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test server's maintenance database."""
    with psycopg.connect(pg_server_url, autocommit=True) as server:
        yield server


@pytest.fixture(scope="session")
def template_db(pg_server_url: str, pg_server: psycopg.Connection) -> Iterator[str]:
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
def db_url(pg_server_url: str, pg_server: psycopg.Connection, template_db: str) -> Iterator[str]:
    """libpq URL of a fresh database at the newest migration, dropped WITH (FORCE) afterwards
    (connections the test left open are terminated)."""
    name = _unique_name()
    _create(pg_server, name, template=template_db)
    try:
        yield with_database(pg_server_url, name)
    finally:
        _drop(pg_server, name)


@pytest.fixture
def empty_db_url(pg_server_url: str, pg_server: psycopg.Connection) -> Iterator[str]:
    """URL of a database that exists but has no schema at all (for migration tests)."""
    name = _unique_name()
    _create(pg_server, name)
    try:
        yield with_database(pg_server_url, name)
    finally:
        _drop(pg_server, name)


@pytest.fixture
def missing_db_url(pg_server_url: str, pg_server: psycopg.Connection) -> Iterator[str]:
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
