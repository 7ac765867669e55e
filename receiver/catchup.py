"""Catching a subject up: its held events applied in order, the gaps before them filled.

An event that arrives ahead of a gap is stored (held) and acknowledged. This worker then, for
each subject with held events, one step per transaction under the subject's lock:
- applies the first held event when it is next;
- otherwise applies the next sequence read back from the events API (`backfill`), fetching the
  gap's events first when they are not at hand;
- or, when the events API answered that the next sequence no longer exists (purged after the
  sender's retention), records it as skipped and moves on: an event that turns up for it later is
  late (receiver/admit.py).
Without an events source, held events wait for the missing ones to arrive as webhooks (e.g. once
the sender's operator recovers a dead letter).

A subject that fails (the API unreachable, a handler that raises) is tried again with a backoff
of up to a minute; the others go on. The worker wakes when told (`wake`) and polls anyway, so
held events left by a crashed process are picked up by the next.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from psycopg_pool import AsyncConnectionPool

from receiver import store
from receiver.admit import Handlers, admit
from receiver.backfill import EventsSource
from receiver.event import ReceivedEvent

log = logging.getLogger("receiver")

_BATCH = 100
_FIRST_BACKOFF = 1.0


class CatchUp:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        handlers: Handlers,
        events: EventsSource | None,
        *,
        poll_interval: float = 1.0,
        max_backoff: float = 60.0,
    ) -> None:
        self._pool = pool
        self._handlers = handlers
        self._events = events
        self._poll_interval = poll_interval
        self._max_backoff = max_backoff
        self._woken = asyncio.Event()
        self._backoff: dict[str, tuple[float, float]] = {}  # subject -> (retry at, last delay)

    def wake(self) -> None:
        self._woken.set()

    async def run(self) -> None:
        """Catches every subject with held events up, then waits to be woken; until cancelled."""
        while True:
            self._woken.clear()
            try:
                await self.pass_once()
            except Exception as exc:  # the database is away: try again at the next poll
                log.warning("catching up failed: %s: %s", type(exc).__name__, exc)
            try:
                await asyncio.wait_for(self._woken.wait(), self._poll_interval)
            except TimeoutError:
                pass

    async def pass_once(self) -> None:
        """One pass over the subjects with held events (those in backoff wait for their turn)."""
        now = time.monotonic()
        waiting = [subject for subject, (at, _) in self._backoff.items() if at > now]
        async with self._pool.connection() as conn, conn.transaction():
            subjects = await store.held_subjects(conn, _BATCH, waiting)
        for gone in self._backoff.keys() - set(waiting) - set(subjects):
            del self._backoff[gone]  # caught up by another process meanwhile
        for subject in subjects:
            _, delay = self._backoff.get(subject, (0.0, 0.0))
            try:
                await self.subject(subject)
            except Exception as exc:
                delay = min(max(delay * 2, _FIRST_BACKOFF), self._max_backoff)
                self._backoff[subject] = (time.monotonic() + delay, delay)
                log.warning(
                    "catching up %s failed, next try in %.0f s: %s: %s",
                    subject, delay, type(exc).__name__, exc,
                )
            else:
                self._backoff.pop(subject, None)

    async def subject(self, subject: str) -> None:
        """Applies the subject's held events in order, filling gaps, until none is held or the
        next one must wait. Raises what stopped it (BackfillError, the handler's error)."""
        found: dict[int, ReceivedEvent] = {}
        gone: set[int] = set()
        while True:
            async with self._pool.connection() as conn, conn.transaction():
                last = await store.lock_subject(conn, subject)
                held = await store.first_held(conn, subject)
                if held is None:
                    return
                following = last + 1
                if held.sequence <= following:
                    await admit(conn, held, "webhook", self._handlers)
                    continue
                if following in found:
                    await admit(conn, found.pop(following), "backfill", self._handlers)
                    continue
                if following in gone:
                    log.warning("%s: sequence %d no longer exists, skipped", subject, following)
                    await store.skip(conn, subject, following)
                    continue
            if self._events is None:
                return
            wanted = set(range(following, held.sequence))
            found = await self._events.find(subject, wanted, must_see=held.id)
            gone = wanted - found.keys()
