"""What each consumer is waiting for: the rows of `outbox.backlog`, as Python objects."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import psycopg
from psycopg.rows import class_row

BACKLOG = """
SELECT consumer, kind, merchant_id, enabled, pending, in_flight, dead, delivered_5m,
       oldest_pending_age
FROM outbox.backlog
ORDER BY consumer
"""


@dataclass(frozen=True)
class ConsumerBacklog:
    consumer: str
    kind: str
    merchant_id: str | None
    enabled: bool
    pending: int
    in_flight: int
    dead: int
    delivered_5m: int
    oldest_pending_age: timedelta | None


def backlog(conn: psycopg.Connection) -> list[ConsumerBacklog]:
    with conn.cursor(row_factory=class_row(ConsumerBacklog)) as cur:
        return cur.execute(BACKLOG).fetchall()
