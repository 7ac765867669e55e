"""Retention: deleting what the outbox no longer needs, without ever touching undelivered work.

What goes:
- deliveries with status 'delivered' whose `delivered_at` is older than the cutoff, with their
  `outbox.attempts` rows;
- events older than the cutoff (`events.time`) that have no delivery row left at all. An event
  with a pending or dead delivery stays; so does one whose delivery was acknowledged after the
  cutoff, until that delivery ages out too, so that no delivery row ever outlives its event;
- attempts older than the cutoff whose delivery no longer exists.

`outbox.subjects` is never touched: its counters keep sequences gap-free after a purge.

Work is done in batches, each its own short transaction: a long DELETE would hold back vacuum on
the very table the relays claim from, and the dead tuples it keeps slow every claim. Rows are
taken with SKIP LOCKED so a purge never waits on, or blocks, a relay.

The relay calls `purge` on a timer; `paymentsctl outbox purge` calls it by hand. It is blocking
(psycopg sync): from asyncio, run it in a thread with its own connection,
`await asyncio.to_thread(purge, url, older_than)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg
from psycopg import conninfo, pq

DEFAULT_BATCH_SIZE = 5_000

PURGE_DELIVERIES = """
WITH doomed AS (
    SELECT consumer, event_id
    FROM outbox.deliveries
    WHERE status = 'delivered' AND delivered_at < %(cutoff)s
    ORDER BY delivered_at
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox.deliveries d
USING doomed
WHERE d.consumer = doomed.consumer AND d.event_id = doomed.event_id
  AND d.status = 'delivered'
RETURNING d.consumer, d.event_id
"""

PURGE_DELIVERY_ATTEMPTS = """
DELETE FROM outbox.attempts a
USING unnest(%(consumers)s::text[], %(event_ids)s::text[]) AS gone(consumer, event_id)
WHERE a.consumer = gone.consumer AND a.event_id = gone.event_id
"""

PURGE_EVENTS = """
WITH doomed AS (
    SELECT e.id
    FROM outbox.events e
    WHERE e.time < %(cutoff)s
      AND NOT EXISTS (SELECT 1 FROM outbox.deliveries d WHERE d.event_id = e.id)
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox.events e
USING doomed
WHERE e.id = doomed.id
RETURNING e.id
"""

# Attempts whose delivery is gone by some other way than this module (an endpoint deleted with
# its deliveries, say). Walks the attempted_at index: `attempts` has no index on event_id alone.
PURGE_ORPHAN_ATTEMPTS = """
WITH doomed AS (
    SELECT a.id
    FROM outbox.attempts a
    WHERE a.attempted_at < %(cutoff)s
      AND NOT EXISTS (
          SELECT 1 FROM outbox.deliveries d
          WHERE d.consumer = a.consumer AND d.event_id = a.event_id
      )
    ORDER BY a.attempted_at
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM outbox.attempts a
USING doomed
WHERE a.id = doomed.id
RETURNING a.id
"""


@dataclass
class PurgeCounts:
    deliveries: int = 0
    events: int = 0
    attempts: int = 0

    @property
    def total(self) -> int:
        return self.deliveries + self.events + self.attempts


ProgressCallback = Callable[[PurgeCounts], None]

_DURATION = re.compile(r"(\d+)([wdhms])")
_UNIT_SECONDS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


def parse_duration(text: str) -> timedelta:
    """'7d', '12h', '30m', '45s', or a sum such as '1d12h'. Raises ValueError otherwise."""
    value = text.strip().lower()
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(
            f"invalid duration {text!r}: expected a number and a unit (w, d, h, m, s), e.g. 7d"
        )
    return timedelta(seconds=sum(int(n) * _UNIT_SECONDS[u] for n, u in parts))


def connect(url: str, application_name: str) -> psycopg.Connection:
    """An autocommit connection; `application_name` only if the URL or conninfo names none, so
    the relay's purge shows up in pg_stat_activity as the relay."""
    if "application_name" in conninfo.conninfo_to_dict(url):
        return psycopg.connect(url, autocommit=True)
    return psycopg.connect(url, autocommit=True, application_name=application_name)


def purge(
    conn_or_url: psycopg.Connection | str,
    older_than: timedelta,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressCallback | None = None,
) -> PurgeCounts:
    """Delete delivered deliveries and fully delivered events older than `older_than`.

    Given a URL, opens and closes its own connection. Given a connection, it must not be inside
    a transaction: every batch commits on its own.
    The cutoff is taken once, from the database clock, so a long purge has a fixed target.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    if isinstance(conn_or_url, str):
        with connect(conn_or_url, "outbox-purge") as conn:
            return _purge(conn, older_than, batch_size, progress)
    if conn_or_url.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError("purge needs a connection outside any transaction")
    return _purge(conn_or_url, older_than, batch_size, progress)


IDEMPOTENCY_KEY_RETENTION = timedelta(hours=24)

_PURGE_IDEMPOTENCY_KEYS = """
WITH gone AS (
    SELECT merchant_id, key FROM idempotency_keys
    WHERE created_at < now() - %(older_than)s::interval
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM idempotency_keys k USING gone
WHERE k.merchant_id = gone.merchant_id AND k.key = gone.key
RETURNING 1
"""


def purge_idempotency_keys(
    conn_or_url: psycopg.Connection | str,
    older_than: timedelta = IDEMPOTENCY_KEY_RETENTION,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> int:
    """Delete idempotency keys older than `older_than` (never less than 24 hours: the API
    promises to keep them that long), in batches; returns how many."""
    older_than = max(older_than, IDEMPOTENCY_KEY_RETENTION)
    if isinstance(conn_or_url, str):
        with connect(conn_or_url, "outbox-purge") as conn:
            return _purge_keys(conn, older_than, batch_size)
    return _purge_keys(conn_or_url, older_than, batch_size)


def _purge_keys(conn: psycopg.Connection, older_than: timedelta, batch_size: int) -> int:
    total = 0
    params = {"older_than": older_than, "batch_size": batch_size}
    while True:
        with conn.transaction():
            n = len(conn.execute(_PURGE_IDEMPOTENCY_KEYS, params).fetchall())
        total += n
        if n < batch_size:
            return total


def _purge(
    conn: psycopg.Connection,
    older_than: timedelta,
    batch_size: int,
    progress: ProgressCallback | None,
) -> PurgeCounts:
    counts = PurgeCounts()
    row = conn.execute("SELECT now() - %s::interval", (older_than,)).fetchone()
    conn.commit()
    assert row is not None
    cutoff: datetime = row[0]
    params: dict[str, object] = {"cutoff": cutoff, "batch_size": batch_size}

    while True:
        with conn.transaction():
            gone = conn.execute(PURGE_DELIVERIES, params).fetchall()
            if gone:
                cur = conn.execute(
                    PURGE_DELIVERY_ATTEMPTS,
                    {"consumers": [c for c, _ in gone], "event_ids": [e for _, e in gone]},
                )
                counts.attempts += max(cur.rowcount, 0)
        counts.deliveries += len(gone)
        if gone and progress:
            progress(counts)
        if len(gone) < batch_size:
            break

    while True:
        with conn.transaction():
            n = len(conn.execute(PURGE_EVENTS, params).fetchall())
        counts.events += n
        if n and progress:
            progress(counts)
        if n < batch_size:
            break

    while True:
        with conn.transaction():
            n = len(conn.execute(PURGE_ORPHAN_ATTEMPTS, params).fetchall())
        counts.attempts += n
        if n and progress:
            progress(counts)
        if n < batch_size:
            break

    return counts
