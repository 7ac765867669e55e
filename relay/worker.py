"""The relay: claims due deliveries, delivers them, completes them; sleeps when there is nothing.

One main loop per process does the claiming (so it is the loop the systemd watchdog watches):
each turn it claims webhook deliveries for the places it has free (docs/relay.md) and, unless one
is still running, starts a batch of the handler consumers beside it as a task of its own (one
transaction per handler consumer: claim + apply + complete), so neither waits for the other. Each
webhook delivery then runs as its own task, bounded by `concurrency`; which one starts when a slot
is free is relay/fairness.py's choice (merchants first, then their endpoints, slow ones shrunk),
so a slow or failing endpoint never holds up another merchant's. Results are written by a
completer task in batches of whatever finished meanwhile, so a batch never waits for its slowest
member.

Waking: the loop polls with a backoff (50 ms growing to 1 s) and wakes early on NOTIFY (see
listener.py), when a delivery finishes, and when the next retry or lease comes due. Before it
sleeps it registers in outbox.sleepers and looks once more, because publishers only notify while
some relay is registered there.

Stopping (`stop()`): no more claims; in-flight deliveries get `shutdown_grace` seconds to finish;
whatever is still running is cancelled and its leases given back. A dead side task (listener,
completer, monitor, purger) stops the relay with exit status 1. Database errors never stop it:
the loop logs, backs off and tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections.abc import Coroutine, Mapping
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo
from psycopg_pool import PoolTimeout

from admin.retention import PurgeCounts, purge, purge_idempotency_keys
from db.pool import MAX_RETRY_DELAY, ConnectionPool
from outbox import claim
from outbox.claim import Claimed, Completion
from outbox.consumers import disable_consumer, hold_publishers
from outbox.envelope import Event
from outbox.handlers import HANDLERS, Handler
from relay import sdnotify
from relay.fairness import FairShare
from relay.listener import Listener
from relay.metrics import Metrics
from relay.retry import Attempt, decide
from relay.settings import QUEUE_WAIT_LIMIT, Settings
from relay.webhook import WebhookSender

log = logging.getLogger("relay")

MIN_WAIT = 0.05
READY_DEPTH = 4
CHECK_IDLE_AFTER = 1.0
MAX_WAIT = 1.0
MONITOR_INTERVAL = 5.0
SLEEPER_REFRESH = 60.0
SLEEPER_STALE = 300.0
GONE_REASON = "the endpoint answered 410 Gone"
_DB_ERRORS = (psycopg.Error, PoolTimeout)
PURGE_LOCK_TIMEOUT = 2  # seconds
_GETCONN_TIMEOUT = 5.0
_FINAL_WRITE_TIMEOUT = 4.0


class _PurgeStopped(Exception):
    """Raised between purge batches once the relay is stopping."""


def relay_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def conninfo_for(url: str) -> str:
    return make_conninfo(
        url,
        application_name="outbox-relay",
        # The relay's own transactions last milliseconds; one left open by a bug must not hold
        # back vacuum on the queue table.
        options="-c idle_in_transaction_session_timeout=30000",
        connect_timeout=10,
        keepalives=1,
        keepalives_idle=30,
        keepalives_interval=10,
        keepalives_count=3,
    )


class Relay:
    def __init__(
        self,
        settings: Settings,
        *,
        handlers: Mapping[str, Handler] = HANDLERS,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.name = relay_name()
        self.metrics = metrics or Metrics()
        self._handlers = dict(handlers)
        self._conninfo = conninfo_for(settings.database_url)
        self._stop = asyncio.Event()
        self._kick = asyncio.Event()
        self._inflight: dict[asyncio.Task[None], Claimed] = {}
        # Claimed deliveries wait here for a slot, queued per endpoint, and this decides which
        # starts next: a finished delivery starts the next one without a database round trip,
        # and the claims that refill the queues come in batches. It holds READY_DEPTH times the
        # slots (in flight plus waiting); a delivery that waited QUEUE_WAIT_LIMIT for a slot
        # goes back (released), so an endpoint disabled meanwhile gets at most a few seconds'
        # worth of buffered attempts, and the lease (relay/settings.py) covers wait and attempt.
        self._share = FairShare(settings.concurrency, depth=READY_DEPTH,
                                queue_wait=QUEUE_WAIT_LIMIT)
        # Claims wait until this many places are free, so each claim (a transaction, a WAL
        # flush) brings a batch.
        self._min_claim = max(1, settings.concurrency // 4)
        self._to_release: list[Claimed] = []
        self._handlers_polled = 0.0
        self._handlers_busy = True
        self._handler_turn: asyncio.Task[tuple[int, bool]] | None = None
        self._handlers_applied = 0  # by batches that finished since the loop last looked
        self._handlers_retry_at = 0.0
        self._handlers_backoff = 0.1
        self._results: list[Completion] = []
        self._results_ready = asyncio.Event()
        self._draining = False
        self._failure: BaseException | None = None
        self._sleeping = False
        self._slept_at = 0.0
        self._last_ping = 0.0
        self._watchdog = sdnotify.watchdog_interval()
        self._rng = random.Random()
        self._pool: ConnectionPool | None = None
        self._sender: WebhookSender | None = None
        self.listener = Listener(self._conninfo, self._kick.set)

    # --- control --------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the relay to stop (signal handlers call this). Idempotent."""
        self._stop.set()
        self._kick.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> int:
        """Run until stopped; returns the exit status (0, or 1 when a side task died)."""
        self._pool = ConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=6,  # the loop (handlers and claims side by side), completer, monitor, spare
            kwargs={"autocommit": True},
            open=False,
            # A round trip only for a connection that sat unused for a while (besides one whose
            # server closed it): the loops check one out several times per delivery batch.
            check_idle_after=CHECK_IDLE_AFTER,
            name="outbox-relay",
        )
        await self._pool.open(wait=False)
        side: list[asyncio.Task[None]] = []
        try:
            async with WebhookSender(self.settings) as sender:
                self._sender = sender
                side.append(self._spawn(self.listener.run(), "listener"))
                side.append(self._spawn(self._completer(), "completer"))
                side.append(self._spawn(self._monitor(), "monitor"))
                if self.settings.purge_interval.total_seconds() > 0:
                    side.append(self._spawn(self._purger(), "purger"))
                if await self._started():
                    sdnotify.ready()
                    log.info("relay ready", extra={"relay": self.name})
                    await self._main_loop()
                sdnotify.stopping()
                log.info("relay stopping", extra={"relay": self.name})
                await self._shutdown(side)
        finally:
            for task in side:
                task.cancel()
            await asyncio.gather(*side, return_exceptions=True)
            await self._pool.close()
        if self._failure is not None:
            return 1
        log.info("relay stopped", extra={"relay": self.name})
        return 0

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is None and name == "completer" and self._draining:
                return
            if self._failure is None:
                self._failure = exc or RuntimeError(f"{name} ended")
            log.error("%s task died, stopping: %r", name, exc or "returned", exc_info=exc)
            self.stop()

        task.add_done_callback(done)
        return task

    async def _started(self) -> bool:
        """Wait until LISTEN is in place (READY=1 means that). False when asked to stop first."""
        while not self._stop.is_set():
            self._ping_watchdog()
            try:
                await asyncio.wait_for(self.listener.connected.wait(), self._wait_cap(1.0))
                return True
            except TimeoutError:
                continue
        return False

    # --- the main loop --------------------------------------------------------------------------

    async def _main_loop(self) -> None:
        idle_wait = MIN_WAIT
        db_backoff = 0.1
        while not self._stop.is_set():
            self._ping_watchdog()
            self._kick.clear()
            try:
                progressed, more, blocked = await self._step()
                if progressed and self._sleeping:
                    await self._set_sleeping(False)
                elif not progressed and not blocked:
                    if not self._sleeping:
                        # Registered: look once more, since a publisher that committed just
                        # before the row existed did not notify.
                        await self._set_sleeping(True)
                        continue
                    if time.monotonic() - self._slept_at > SLEEPER_REFRESH:
                        await self._set_sleeping(True)
                    due = await self._seconds_to_next_due()
                    if due is not None:
                        idle_wait = min(idle_wait, max(due, 0.01))
                db_backoff = 0.1
            except _DB_ERRORS as exc:
                log.warning("database unavailable, retrying in %.1f s: %s", db_backoff, _one(exc))
                await self._wait(db_backoff)
                db_backoff = min(db_backoff * 2, MAX_RETRY_DELAY)
                continue
            if more:
                idle_wait = MIN_WAIT
                continue
            if progressed or blocked:
                idle_wait = MIN_WAIT
                await self._wait(MIN_WAIT)
                continue
            await self._wait(idle_wait)
            idle_wait = min(idle_wait * 2, MAX_WAIT)

    async def _step(self) -> tuple[bool, bool, bool]:
        """One turn: (did work, may have more right now, waiting on busy slots or on a handler
        batch).

        A batch of the handler consumers runs as a task of its own beside the loop, on its own
        connection, and the loop starts the next when it has finished: a slow handler batch holds
        up neither the webhook claims nor the deliveries."""
        self._start_handlers_turn()
        progressed, more, blocked = await self._webhooks_turn()
        applied, self._handlers_applied = self._handlers_applied, 0
        running = self._handler_turn is not None
        return progressed or applied > 0, more, blocked or running

    def _start_handlers_turn(self) -> None:
        """Start a batch of the handler consumers unless one runs: at once while they have work,
        else at most every MIN_WAIT (finished webhook deliveries turn the loop far more often
        than that), and not before a database error's backoff has passed."""
        if not self._handlers or self._handler_turn is not None or self._stop.is_set():
            return
        now = time.monotonic()
        if now < self._handlers_retry_at:
            return
        if not self._handlers_busy and now - self._handlers_polled < MIN_WAIT:
            return
        self._handlers_polled = now
        task = asyncio.create_task(self._handlers_turn(), name="handlers")
        task.add_done_callback(self._handlers_turn_done)
        self._handler_turn = task

    def _handlers_turn_done(self, task: asyncio.Task[tuple[int, bool]]) -> None:
        self._handler_turn = None
        self._kick.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            applied, self._handlers_busy = task.result()
            self._handlers_applied += applied
            self._handlers_backoff = 0.1
        elif isinstance(exc, _DB_ERRORS):
            log.warning("database unavailable for the handler consumers, retrying in %.1f s: %s",
                        self._handlers_backoff, _one(exc))
            self._handlers_retry_at = time.monotonic() + self._handlers_backoff
            self._handlers_backoff = min(self._handlers_backoff * 2, MAX_RETRY_DELAY)
            self._handlers_busy = True
        else:
            if self._failure is None:
                self._failure = exc
            log.error("handler consumers failed, stopping: %r", exc, exc_info=exc)
            self.stop()

    async def _handlers_turn(self) -> tuple[int, bool]:
        """One batch of each handler consumer: (events applied, some consumer had a full batch
        and may have more)."""
        applied = 0
        busy = False
        for name, handler in self._handlers.items():
            n = await self._run_handler(name, handler)
            applied += n
            busy = busy or n >= self.settings.batch_size
        return applied, busy

    async def _webhooks_turn(self) -> tuple[bool, bool, bool]:
        held = self._share.held
        free = self._share.hold_cap - held
        if free < self._min_claim and held:
            return False, False, True
        limit = min(free, self.settings.batch_size)
        claimed = await self._claim(limit)
        if claimed:
            return True, len(claimed) >= limit, False
        return False, False, held > 0

    async def _claim(self, limit: int) -> list[Claimed]:
        assert self._pool is not None
        rooms = self._share.rooms()
        async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
            claimed = await claim.claim_webhooks(
                conn,
                limit=limit,
                lease_seconds=self.settings.lease_seconds,
                relay=self.name,
                share=rooms.consumer_default,
                rooms=rooms.consumers,
                merchant_share=rooms.merchant_default,
                merchants=rooms.merchants,
            )
        self._hold(claimed)
        return claimed

    def _hold(self, claimed: list[Claimed]) -> None:
        """Queue claimed deliveries for a slot and start what may start."""
        self._share.hold(claimed, time.monotonic())
        self._start_ready()

    def _start_ready(self) -> None:
        """Start waiting deliveries while the share-out allows; deliveries that waited too long
        go back to the queue."""
        if self._stop.is_set():
            return
        start, stale = self._share.take(time.monotonic())
        for item in start:
            self._dispatch(item)
        if stale:
            self._give_back(stale)

    def _drop_ready(self, consumer: str) -> None:
        """Give back the deliveries of `consumer` waiting here (it was disabled)."""
        waiting = self._share.drop(consumer)
        if waiting:
            self._give_back(waiting)

    def _give_back(self, items: list[Claimed]) -> None:
        self._to_release.extend(items)
        self._results_ready.set()

    # --- handler consumers ----------------------------------------------------------------------

    async def _run_handler(self, name: str, handler: Handler) -> int:
        """Claim, apply and complete one batch in one transaction. Returns how many."""
        assert self._pool is not None
        async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
            async with conn.transaction():
                rows = await claim.claim_for_handler(conn, name, self.settings.batch_size)
                if not rows:
                    return 0
                events = [event for _, event in rows]
                try:
                    async with conn.transaction():
                        await handler(conn, events)
                    applied = events
                except psycopg.OperationalError:
                    raise
                except Exception as exc:
                    log.warning(
                        "handler batch failed, applying one by one: %s", _one(exc),
                        extra={"consumer": name},
                    )
                    applied = await self._isolate(conn, name, handler, rows)
                await claim.complete_for_handler(conn, name, [e.id for e in applied])
        now = time.time()
        self.metrics.deliveries.labels("applied").inc(len(applied))
        for event in applied:
            self.metrics.end_to_end.observe(max(now - event.time.timestamp(), 0.0))
        return len(rows)

    async def _isolate(
        self,
        conn: psycopg.AsyncConnection[Any],
        name: str,
        handler: Handler,
        rows: list[tuple[int, Event]],
    ) -> list[Event]:
        """Apply events one at a time (savepoints) so one bad event does not block the rest."""
        applied: list[Event] = []
        for attempts, event in rows:
            try:
                async with conn.transaction():
                    await handler(conn, [event])
            except psycopg.OperationalError:
                raise
            except Exception as exc:
                error = f"{type(exc).__name__}: {_one(exc)}"[:500]
                outcome, delay = decide(
                    Attempt(None, error, 0), attempts, self.settings.retry_schedule, self._rng
                )
                await claim.fail_for_handler(
                    conn, name, event.id, delay=delay, dead=outcome == "dead", error=error
                )
                self.metrics.deliveries.labels(outcome).inc()
                log.error(
                    "handler failed",
                    extra={"event": event.id, "consumer": name, "attempt": attempts + 1,
                           "outcome": outcome, "error": error},
                )
            else:
                applied.append(event)
        return applied

    # --- webhook deliveries ---------------------------------------------------------------------

    def _dispatch(self, item: Claimed) -> None:
        task = asyncio.create_task(self._deliver(item))
        self._inflight[task] = item
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        item = self._inflight.pop(task)
        self._share.done(item)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception(),
                      extra={"event": item.event.id, "consumer": item.consumer})
        self._start_ready()
        self._kick.set()

    async def _deliver(self, item: Claimed) -> None:
        assert self._sender is not None
        try:
            attempt = await self._sender.send(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug in the sender must cost one attempt, not the relay
            log.exception("sender failed", extra={"event": item.event.id})
            attempt = Attempt(None, f"internal error: {type(exc).__name__}", 0)
        self._share.observe(item.consumer, attempt)
        outcome, delay = decide(attempt, item.attempts, self.settings.retry_schedule, self._rng)
        self.metrics.attempt_duration.observe(attempt.latency_ms / 1000)
        self.metrics.deliveries.labels(outcome).inc()
        if outcome == "delivered":
            self.metrics.end_to_end.observe(max(time.time() - item.event.time.timestamp(), 0.0))
        def fields() -> dict[str, Any]:
            return {
                "event": item.event.id,
                "consumer": item.consumer,
                "attempt": item.attempts + 1,
                "outcome": outcome,
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
            }

        if outcome == "delivered":
            if log.isEnabledFor(logging.DEBUG):
                log.debug("delivered", extra=fields())
        elif outcome == "retry":
            log.info("attempt failed, retrying in %.1f s", delay, extra=fields())
        elif outcome == "dead":
            log.warning("attempt failed, retries exhausted: dead", extra=fields())
        else:
            log.warning("endpoint gone (410): disabling it", extra=fields())
            self._drop_ready(item.consumer)
        self._results.append(
            Completion(item, outcome, delay, attempt.status_code, attempt.error,
                       attempt.latency_ms)
        )
        self._results_ready.set()

    async def _completer(self) -> None:
        """Write finished attempts in batches: everything that finished since the last write."""
        assert self._pool is not None
        backoff = 0.1
        while True:
            if self._to_release:
                await self._release_given_back()
            if not self._results:
                if self._draining:
                    return
                self._results_ready.clear()
                if not self._to_release:
                    await self._results_ready.wait()
                continue
            batch = self._results[:1000]
            try:
                async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
                    async with conn.transaction():
                        done = await self._complete_and_disable_gone(conn, batch)
            except _DB_ERRORS as exc:
                if self._draining:
                    log.warning("cannot write results while stopping: %s", _one(exc))
                    return
                log.warning("cannot write results, retrying in %.1f s: %s", backoff, _one(exc))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_RETRY_DELAY)
                continue
            backoff = 0.1
            del self._results[: len(batch)]
            if len(done) < len(batch):
                self.metrics.deliveries.labels("stale").inc(len(batch) - len(done))
                log.info("lease lost before completion", extra={"count": len(batch) - len(done)})
            # Completing an event can make the next one of its subject claimable.
            await self._claim_successors(batch, done)
            self._kick.set()

    @staticmethod
    async def _complete_and_disable_gone(
        conn: psycopg.AsyncConnection[Any], batch: list[Completion]
    ) -> dict[tuple[str, str], bool]:
        """Write a batch of results; a 410 disables its endpoint only when its lease was still
        held: a relay whose lease ran out (and was perhaps taken over) changes nothing."""
        parked = sorted({r.claimed.consumer for r in batch if r.outcome == "park"})
        for consumer in parked:  # before the completion's row locks, as disabling does
            await hold_publishers(conn, consumer)
        done = await claim.complete_webhooks(conn, batch)
        for consumer in sorted({r.claimed.consumer for r in batch if r.outcome == "park"
                                and (r.claimed.consumer, r.claimed.event.id) in done}):
            await disable_consumer(conn, consumer, GONE_REASON)
        return done

    async def _release_given_back(self) -> None:
        """Release deliveries that went back from the waiting queue; on failure their leases
        simply run out."""
        assert self._pool is not None
        items, self._to_release = self._to_release, []
        try:
            async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
                await claim.release(conn, items)
        except _DB_ERRORS as exc:
            log.warning("cannot release %d leases (they expire on their own): %s",
                        len(items), _one(exc))
        self._kick.set()

    async def _claim_successors(
        self, batch: list[Completion], done: dict[tuple[str, str], bool]
    ) -> None:
        if self._stop.is_set():
            return
        assert self._pool is not None
        rooms = self._share.rooms()
        free = self._share.hold_cap - self._share.held
        wanted: list[tuple[str, str]] = []
        for r in batch:
            consumer, merchant = r.claimed.consumer, r.claimed.event.merchant_id or ""
            if r.outcome not in ("delivered", "dead") or not done.get((consumer,
                                                                        r.claimed.event.id)):
                continue
            room = rooms.consumers.get(consumer, rooms.consumer_default)
            held, merchant_room = rooms.merchants.get(merchant, (0, rooms.merchant_default))
            if len(wanted) >= free or room <= 0 or merchant_room <= 0:
                continue
            rooms.consumers[consumer] = room - 1
            rooms.merchants[merchant] = (held + 1, merchant_room - 1)
            wanted.append((consumer, r.claimed.event.subject))
        if not wanted:
            return
        try:
            async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
                claimed = await claim.claim_successors(
                    conn, wanted, lease_seconds=self.settings.lease_seconds, relay=self.name
                )
        except _DB_ERRORS as exc:
            log.warning("cannot claim successors: %s", _one(exc))
            return
        self._hold(claimed)

    # --- waking and sleeping --------------------------------------------------------------------

    async def _set_sleeping(self, sleeping: bool) -> None:
        assert self._pool is not None
        async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
            if sleeping:
                await claim.register_sleeper(conn, self.name, SLEEPER_STALE)
                self._slept_at = time.monotonic()
            else:
                await claim.unregister_sleeper(conn, self.name)
        self._sleeping = sleeping

    async def _seconds_to_next_due(self) -> float | None:
        assert self._pool is not None
        async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
            return await claim.seconds_to_next_due(conn)

    def _wait_cap(self, timeout: float) -> float:
        if self._watchdog is not None:
            return max(min(timeout, self._watchdog - (time.monotonic() - self._last_ping)), 0.0)
        return timeout

    async def _wait(self, seconds: float) -> None:
        """Until kicked (NOTIFY, a finished delivery, stop) or `seconds` pass."""
        try:
            await asyncio.wait_for(self._kick.wait(), self._wait_cap(seconds))
        except TimeoutError:
            pass

    def _ping_watchdog(self) -> None:
        if self._watchdog is None:
            return
        now = time.monotonic()
        if self._handler_turn is not None and now - self._handlers_polled > 2 * self._watchdog:
            return  # a handler batch stuck as long as the watchdog allows: let systemd see it
        if now - self._last_ping >= self._watchdog * 0.9:
            sdnotify.watchdog()
            self._last_ping = now

    # --- side tasks -----------------------------------------------------------------------------

    async def _monitor(self) -> None:
        """Backlog gauges and the systemd STATUS line, every few seconds."""
        assert self._pool is not None
        while True:
            try:
                async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
                    rows = await claim.backlog(conn)
            except _DB_ERRORS as exc:
                sdnotify.status(f"database unavailable: {_one(exc)}"[:200])
            else:
                self.metrics.set_backlog(rows)
                oldest = max((r.oldest_pending_age for r in rows), default=0.0)
                sdnotify.status(
                    f"in flight here {len(self._inflight)}; "
                    f"pending {sum(r.pending for r in rows)}, "
                    f"leased {sum(r.in_flight for r in rows)}, "
                    f"dead {sum(r.dead for r in rows)}, oldest pending {oldest:.0f} s"
                )
            await asyncio.sleep(MONITOR_INTERVAL)

    async def _purger(self) -> None:
        """Retention on a timer (admin.retention.purge, in a thread with its own connection)."""
        interval = self.settings.purge_interval.total_seconds()
        while True:
            await asyncio.sleep(interval * self._rng.uniform(0.9, 1.1))
            try:
                counts, keys = await asyncio.to_thread(self._purge_once)
            except _PurgeStopped:
                return
            except _DB_ERRORS as exc:
                log.warning("purge failed: %s", _one(exc))
                continue
            if counts.total or keys:
                log.info(
                    "purged %d deliveries, %d events, %d attempts, %d idempotency keys",
                    counts.deliveries, counts.events, counts.attempts, keys,
                )

    def _purge_once(self) -> tuple[PurgeCounts, int]:
        """One purge, in a worker thread. It must never hold up a shutdown (the contract's 30 s):
        it stops between batches once the relay is stopping, and a batch waits at most
        PURGE_LOCK_TIMEOUT for a lock (LOCK TABLE by an operator, a long transaction)."""

        def stop_between_batches(_: object = None) -> None:
            if self._stop.is_set():
                raise _PurgeStopped

        with psycopg.connect(self._conninfo, autocommit=True) as conn:
            conn.execute(f"SET lock_timeout = '{PURGE_LOCK_TIMEOUT}s'")
            counts = purge(conn, self.settings.retention, progress=stop_between_batches)
            stop_between_batches()
            keys = purge_idempotency_keys(conn)
        return counts, keys

    # --- shutdown -------------------------------------------------------------------------------

    async def _shutdown(self, side: list[asyncio.Task[None]]) -> None:
        """Let in-flight deliveries finish within the grace period, write their results, give
        back the leases of the rest (and of the deliveries still waiting for a slot), and leave
        outbox.sleepers."""
        waiting = self._share.drain()
        tasks: list[asyncio.Task[Any]] = list(self._inflight)
        if tasks:
            log.info("waiting for %d deliveries in flight", len(tasks))
        if self._handler_turn is not None:
            # A handler batch is one transaction: cancelled, it rolls back and is claimed again.
            tasks.append(self._handler_turn)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace)
            unfinished = [self._inflight[t] for t in pending if t in self._inflight]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        else:
            unfinished = []
        self._draining = True
        self._results_ready.set()
        completer = next((t for t in side if t.get_name() == "completer"), None)
        if completer is not None and not completer.done():
            try:
                await asyncio.wait_for(asyncio.shield(completer), _FINAL_WRITE_TIMEOUT)
            except TimeoutError:
                log.warning("could not write all results before exiting")
                # Stopped, not left running: its write would race the release below for the
                # same rows (each waiting for the other's row locks).
                completer.cancel()
                await asyncio.gather(completer, return_exceptions=True)
        # Results never written go back too: their attempt is repeated by whoever claims next.
        unfinished += [r.claimed for r in self._results]
        unfinished += waiting + self._to_release
        assert self._pool is not None
        try:
            async with asyncio.timeout(_FINAL_WRITE_TIMEOUT):
                async with self._pool.connection(timeout=_GETCONN_TIMEOUT) as conn:
                    released = await claim.release(conn, unfinished)
                    await claim.unregister_sleeper(conn, self.name)
            if released:
                log.info("released %d leases", released, extra={"count": released})
        except (*_DB_ERRORS, TimeoutError) as exc:
            log.warning("could not release leases (they expire on their own): %s", _one(exc))


def _one(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
