"""LISTEN outbox_wakeup on a dedicated connection, outside the pool.

A notification is only a hint that work may be waiting (the relay polls anyway), so a lost
connection costs latency, never correctness: the listener logs, backs off, reconnects, and fires
the wake-up once reconnected in case something was published while it was away.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import psycopg
from psycopg import AsyncConnection

from db.pool import MAX_RETRY_DELAY
from outbox.publish import WAKEUP_CHANNEL

log = logging.getLogger(__name__)

# How long to wait for a notification before checking that the connection still answers: a
# silently dropped TCP connection would otherwise leave the listener deaf forever.
_HEALTH_CHECK_INTERVAL = 10.0


class Listener:
    def __init__(self, conninfo: str, wake: Callable[[], None]) -> None:
        self._conninfo = conninfo
        self._wake = wake
        self.connected = asyncio.Event()

    async def run(self) -> None:
        """Runs until cancelled."""
        delay = 0.1
        while True:
            try:
                conn = await AsyncConnection.connect(self._conninfo, autocommit=True)
            except psycopg.Error as exc:
                log.warning("listener cannot connect, retrying in %.1f s: %s", delay, _one(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            try:
                await conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
                if delay > 0.1:
                    log.info("listener reconnected")
                delay = 0.1
                self.connected.set()
                self._wake()
                while True:
                    async for _ in conn.notifies(timeout=_HEALTH_CHECK_INTERVAL):
                        self._wake()
                    await conn.execute("SELECT 1")
            except psycopg.Error as exc:
                self.connected.clear()
                log.warning("listener connection lost, reconnecting: %s", _one(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
            finally:
                self.connected.clear()
                await conn.close()


def _one(exc: BaseException) -> str:
    return " ".join(str(exc).split())
