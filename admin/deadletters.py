"""Dead letters: listing the deliveries that ran out of retries. Putting them back to pending is
outbox.redrive's, which the API's recover and `paymentsctl outbox redrive` share."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg.rows import class_row

from outbox.redrive import UnknownConsumerError

__all__ = ["DeadLetter", "UnknownConsumerError", "consumer_exists", "dead_letters"]

DEAD_LETTERS = """
SELECT consumer, event, type, subject, attempts, last_status_code, last_error, dead_since,
       event_time
FROM outbox.dead_letters
WHERE %(consumer)s::text IS NULL OR consumer = %(consumer)s::text
ORDER BY dead_since DESC, consumer, event DESC
LIMIT %(limit)s
"""


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


def consumer_exists(conn: psycopg.Connection, consumer: str) -> bool:
    row = conn.execute("SELECT 1 FROM outbox.consumers WHERE name = %s", (consumer,)).fetchone()
    return row is not None
