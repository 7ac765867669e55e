"""Dead letters: listing the deliveries that ran out of retries and putting them back to pending.

A redriven delivery starts over: attempts 0, due now, no lease. Its last status code and error
are kept, so that the deliveries list still says why it had died until the next attempt tells
otherwise. Per-subject order holds afterwards too: the relay claims only the oldest undelivered
delivery of a (consumer, subject), and a redriven delivery is undelivered again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import pq
from psycopg.rows import class_row

from admin.retention import connect

DEFAULT_BATCH_SIZE = 1_000

DEAD_LETTERS = """
SELECT consumer, event, type, subject, attempts, last_status_code, last_error, dead_since,
       event_time
FROM outbox.dead_letters
WHERE %(consumer)s::text IS NULL OR consumer = %(consumer)s::text
ORDER BY dead_since DESC, consumer, event DESC
LIMIT %(limit)s
"""

# SKIP LOCKED: a row locked by someone else is being redriven (or completed) by them already.
REDRIVE_BATCH = """
WITH chosen AS (
    SELECT consumer, event_id
    FROM outbox.deliveries
    WHERE consumer = %(consumer)s AND status = 'dead'
      AND dead_since >= coalesce(%(since)s::timestamptz, '-infinity')
    ORDER BY dead_since
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
)
UPDATE outbox.deliveries d
SET status = 'pending', attempts = 0, next_attempt_at = now(), dead_since = NULL,
    lease_token = NULL, leased_by = NULL
FROM chosen
WHERE d.consumer = chosen.consumer AND d.event_id = chosen.event_id
"""


class UnknownConsumerError(LookupError):
    def __init__(self, consumer: str) -> None:
        super().__init__(f"no consumer named {consumer!r}")
        self.consumer = consumer


@dataclass(frozen=True)
class DeadLetter:
    consumer: str
    event: str
    type: str
    subject: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    dead_since: datetime
    event_time: datetime


def dead_letters(
    conn: psycopg.Connection, consumer: str | None = None, limit: int | None = None
) -> list[DeadLetter]:
    """Newest first."""
    with conn.cursor(row_factory=class_row(DeadLetter)) as cur:
        return cur.execute(DEAD_LETTERS, {"consumer": consumer, "limit": limit}).fetchall()


def redrive_batch(
    conn: psycopg.Connection,
    consumer: str,
    since: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> int:
    """Put up to `batch_size` dead deliveries back to pending, in the caller's transaction."""
    params = {"consumer": consumer, "since": since, "batch_size": batch_size}
    return conn.execute(REDRIVE_BATCH, params).rowcount


def consumer_exists(conn: psycopg.Connection, consumer: str) -> bool:
    row = conn.execute("SELECT 1 FROM outbox.consumers WHERE name = %s", (consumer,)).fetchone()
    return row is not None


def redrive(
    conn_or_url: psycopg.Connection | str,
    consumer: str,
    since: datetime | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Put every dead delivery of `consumer` (dead since `since`, if given) back to pending.

    Commits after each batch, so a redrive of a million dead letters never becomes one long
    transaction; given a connection, it must not be inside a transaction. Returns how many.
    Raises UnknownConsumerError for a consumer that does not exist.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if isinstance(conn_or_url, str):
        with connect(conn_or_url, "outbox-redrive") as c:
            return _redrive(c, consumer, since, batch_size, progress)
    if conn_or_url.info.transaction_status != pq.TransactionStatus.IDLE:
        raise ValueError("redrive needs a connection outside any transaction")
    return _redrive(conn_or_url, consumer, since, batch_size, progress)


def _redrive(
    conn: psycopg.Connection,
    consumer: str,
    since: datetime | None,
    batch_size: int,
    progress: Callable[[int], None] | None,
) -> int:
    exists = consumer_exists(conn, consumer)
    conn.commit()
    if not exists:
        raise UnknownConsumerError(consumer)
    total = 0
    while True:
        with conn.transaction():
            n = redrive_batch(conn, consumer, since, batch_size)
        total += n
        if n and progress:
            progress(total)
        if n < batch_size:
            return total
