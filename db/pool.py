"""The connection pool of the API and the relay: psycopg_pool's, whole again as soon as the
database is.

After PostgreSQL restarts, every pooled connection is dead, and psycopg_pool on its own would hand
each one out once (a failed request per connection), then reconnect with a backoff that doubles up
to minutes. Two changes keep a restart from reaching a client once the server accepts connections:

- A connection is checked as it leaves the pool, at the cost of one `poll()` when nothing
  happened: a server that ends a session (shutdown, crash, `pg_terminate_backend`) says so and
  closes the socket, so the socket of a dead idle connection has become readable. Only then, or
  when the connection sat idle longer than `check_idle_after` (if given), does the check make a
  round trip. A connection that fails it is closed and the next one taken at once, without the
  pause psycopg_pool's own `check` makes after each failure (a second, doubling each time).
- Reconnecting follows demand: a failed connection attempt is tried once more and then given up
  after RECONNECT_TIMEOUT instead of backing off further, and a client waiting for a connection
  asks the pool again every WAIT_SLICE, which starts a new attempt at once when none is running.
  While anyone waits, the pool tries to connect every half second or so, and the first
  connection comes within about that long of the server accepting them.

A statement is never retried here: a connection is replaced before anything runs on it.
"""

from __future__ import annotations

import select
import time
import weakref
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

# The longest any process waits before trying the database again (the pool here, and the relay's
# loops and listener), so that it is whole again well within a second of a restart.
MAX_RETRY_DELAY = 0.5
RECONNECT_TIMEOUT = MAX_RETRY_DELAY
WAIT_SLICE = 0.5
_READABLE = select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP


def socket_readable(conn: AsyncConnection[Any]) -> bool:
    """Whether the server sent something (or closed the socket) since the last exchange: true for
    the connections a restart killed, false for a healthy idle one. No round trip."""
    try:
        fd = conn.pgconn.socket
    except psycopg.OperationalError:
        return True
    poller = select.poll()
    poller.register(fd, _READABLE)
    return bool(poller.poll(0))


class ConnectionPool(AsyncConnectionPool[AsyncConnection[Any]]):
    """psycopg_pool's AsyncConnectionPool that never hands out a connection the server closed
    while it was idle, and reconnects promptly when asked for a connection (module docstring).
    Takes AsyncConnectionPool's arguments, plus `check_idle_after`: seconds of idleness after
    which a connection is checked with a round trip before use (None: only when its socket says
    it is dead)."""

    def __init__(
        self, conninfo: str, *, check_idle_after: float | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("reconnect_timeout", RECONNECT_TIMEOUT)
        super().__init__(conninfo, **kwargs)
        self._check_idle_after = check_idle_after
        self._returned_at: weakref.WeakKeyDictionary[AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary()
        )

    # The signature is AsyncConnectionPool.getconn's.
    async def getconn(self, timeout: float | None = None) -> AsyncConnection[Any]:  # noqa: ASYNC109
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PoolTimeout(f"couldn't get a connection after {total:.2f} sec")
            try:
                conn = await super().getconn(min(remaining, WAIT_SLICE))
            except PoolTimeout:
                continue
            if await self._usable(conn):
                return conn
            await conn.close()
            await super().putconn(conn)  # closed: the pool drops it and connects a new one

    async def putconn(self, conn: AsyncConnection[Any]) -> None:
        if self._check_idle_after is not None:
            self._returned_at[conn] = time.monotonic()
        await super().putconn(conn)

    async def _usable(self, conn: AsyncConnection[Any]) -> bool:
        if conn.closed or conn.broken:
            return False
        if not socket_readable(conn) and not self._idle_too_long(conn):
            return True
        try:
            await self.check_connection(conn)
        except psycopg.Error:
            return False
        return True

    def _idle_too_long(self, conn: AsyncConnection[Any]) -> bool:
        if self._check_idle_after is None:
            return False
        returned = self._returned_at.get(conn)
        return returned is None or time.monotonic() - returned > self._check_idle_after
