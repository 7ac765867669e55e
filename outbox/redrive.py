"""Redrive: dead deliveries back to pending, the one implementation behind
`POST /v1/webhook_endpoints/{id}/recover` and `paymentsctl outbox redrive`.

A redriven delivery starts over: attempts 0, due now (parked, if its consumer is disabled, until
it is enabled), no lease. Its last status code and error are kept, so the deliveries list still
says why it had died until the next attempt tells otherwise. It is pending again, so it takes its
place in its subject's order: later deliveries of the subject wait for it, except one that is in
flight already, which it waits for (outbox/claim.py). Either way it reaches the consumer after
the events of its subject that were delivered while it was dead: `out_of_order_subjects` counts
those subjects, and docs/relay.md tells receivers how to notice.

`redrive` works in batches, each its own transaction, so a million dead letters never become one
long transaction holding locks on the queue table. A batch takes a consumer's dead deliveries in
(subject, sequence) order, so a subject's dead deliveries go back together and a subject is
counted once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, errors

from outbox.consumers import hold_publishers

DEFAULT_BATCH_SIZE = 1_000
_RETRIES = 5
_RETRYABLE = (errors.DeadlockDetected, errors.SerializationFailure)

# One batch, after the dead deliveries (subject, sequence) > (after_subject, after_sequence):
#  - chosen: up to batch_size of them, through ix_deliveries_subject_dead. SKIP LOCKED: a row
#    locked by someone else is being redriven by them already.
#  - later: the first pending delivery after the first chosen one of each subject gets a new row
#    version, without a change. It is the only one a claim whose snapshot still shows the chosen
#    ones dead could take (the rest wait behind it in any snapshot). If such a claim reaches it
#    after this commits, PostgreSQL evaluates the claim's predicate again on the new version,
#    and its fresh order check (outbox.is_first_pending) sees the redriven predecessor. The
#    UPDATE waits for a claim that holds the row, so that claim's lease is committed first.
#  - redriven: the chosen ones back to pending.
#  - out of order: a subject whose first chosen delivery has a later one that was delivered, or
#    is in flight, will see the redriven event after it. Delivered rows are found through the
#    subject's events (outbox.events (subject, sequence)), in-flight ones through
#    ix_deliveries_leased. Not counted again: the subject the previous batch ended with, whose
#    first redriven delivery was in that batch.
REDRIVE_BATCH = """
WITH chosen AS (
    SELECT d.consumer, d.event_id, d.subject, d.sequence
    FROM outbox.deliveries d
    WHERE d.consumer = %(consumer)s AND d.status = 'dead'
      AND (d.subject, d.sequence) > (%(after_subject)s::text, %(after_sequence)s::bigint)
      AND d.dead_since >= coalesce(%(since)s::timestamptz, '-infinity')
    ORDER BY d.subject, d.sequence
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), firsts AS (
    SELECT subject, min(sequence) AS sequence FROM chosen GROUP BY subject
), later AS (
    UPDATE outbox.deliveries p SET next_attempt_at = p.next_attempt_at
    FROM firsts f CROSS JOIN LATERAL (
        SELECT n.event_id FROM outbox.deliveries n
        WHERE n.consumer = %(consumer)s AND n.subject = f.subject AND n.status = 'pending'
          AND n.sequence > f.sequence
        ORDER BY n.sequence
        LIMIT 1
    ) head
    WHERE p.consumer = %(consumer)s AND p.event_id = head.event_id
), redriven AS (
    UPDATE outbox.deliveries d
    SET status = 'pending', attempts = 0, dead_since = NULL, lease_token = NULL,
        leased_by = NULL,
        next_attempt_at = CASE WHEN k.enabled THEN now() ELSE 'infinity'::timestamptz END
    FROM chosen c JOIN outbox.consumers k ON k.name = c.consumer
    WHERE d.consumer = c.consumer AND d.event_id = c.event_id
    RETURNING 1
), last AS (
    SELECT subject, sequence FROM chosen ORDER BY subject DESC, sequence DESC LIMIT 1
)
SELECT (SELECT count(*) FROM chosen),
       (SELECT count(*) FROM redriven),
       (SELECT count(*) FROM firsts f
        WHERE f.subject <> %(after_subject)s::text
          AND (EXISTS (SELECT 1 FROM outbox.deliveries p
                       WHERE p.consumer = %(consumer)s AND p.subject = f.subject
                         AND p.lease_token IS NOT NULL AND p.next_attempt_at > now()
                         AND p.sequence > f.sequence)
               OR EXISTS (SELECT 1 FROM outbox.events e
                          JOIN outbox.deliveries p
                            ON p.consumer = %(consumer)s AND p.event_id = e.id
                          WHERE e.subject = f.subject AND e.sequence > f.sequence
                            AND p.status = 'delivered'))),
       (SELECT subject FROM last),
       (SELECT sequence FROM last)
"""

_KIND = "SELECT kind FROM outbox.consumers WHERE name = %s"


class UnknownConsumerError(LookupError):
    def __init__(self, consumer: str) -> None:
        super().__init__(f"no consumer named {consumer!r}")
        self.consumer = consumer


@dataclass(frozen=True, slots=True)
class Redriven:
    """What a redrive did."""

    requeued: int
    """Dead deliveries put back to pending."""
    out_of_order_subjects: int
    """Subjects whose consumer will receive a redriven event after a later event of the same
    subject (delivered, or in flight, when the redrive ran)."""


@dataclass(slots=True)
class _Cursor:
    subject: str = ""
    sequence: int = 0


async def redrive(
    conn: AsyncConnection[Any],
    consumer: str,
    since: datetime | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int], None] | None = None,
) -> Redriven:
    """Put every dead delivery of `consumer` (dead since `since`, if given) back to pending, in
    batches of `batch_size`, each committed on its own; `conn` must be in autocommit mode.

    Raises UnknownConsumerError for a consumer that does not exist. `progress` is called with
    the number requeued so far after each batch that requeued some."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if not conn.autocommit:
        raise ValueError("redrive needs a connection in autocommit mode")
    cur = await conn.execute(_KIND, (consumer,))
    row = await cur.fetchone()
    if row is None:
        raise UnknownConsumerError(consumer)
    webhook = row[0] == "webhook"
    cursor = _Cursor()
    requeued = out_of_order = 0
    while True:
        chosen, n, late = await _batch_retrying(conn, consumer, since, batch_size, cursor, webhook)
        requeued += n
        out_of_order += late
        if n and progress:
            progress(requeued)
        if chosen < batch_size:
            return Redriven(requeued, out_of_order)


async def _batch_retrying(
    conn: AsyncConnection[Any],
    consumer: str,
    since: datetime | None,
    batch_size: int,
    cursor: _Cursor,
    webhook: bool,
) -> tuple[int, int, int]:
    for attempt in range(_RETRIES):
        try:
            async with conn.transaction():
                if webhook:
                    # Publishers of the merchant committing now fan out to this consumer: wait
                    # for them, so the batch's snapshot sees (and rewrites) their deliveries too.
                    await hold_publishers(conn, consumer)
                cur = await conn.execute(
                    REDRIVE_BATCH,
                    {"consumer": consumer, "since": since, "batch_size": batch_size,
                     "after_subject": cursor.subject, "after_sequence": cursor.sequence},
                )
                row = await cur.fetchone()
        except _RETRYABLE:
            # The rewrite of later deliveries waits for row locks, as completions do.
            if attempt == _RETRIES - 1:
                raise
            continue
        assert row is not None
        chosen, n, late, last_subject, last_sequence = row
        if last_subject is not None:
            cursor.subject, cursor.sequence = last_subject, last_sequence
        return chosen, n, late
    raise AssertionError("unreachable")
