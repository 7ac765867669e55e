"""Publishing: events and their fan-out, written inside the caller's transaction.

`publish(conn, events)` must run in the transaction that makes the change the events describe, so
both commit or neither does. It
1. takes the next sequence numbers of each subject from `outbox.subjects` (an upsert: the row lock
   serialises publishers of one subject until commit, so sequences are gap-free and in commit
   order; subjects are upserted in sorted order so two publishers cannot deadlock on them),
2. inserts the events and one delivery row per matching enabled consumer,
3. sends one NOTIFY, but only when a relay has said it is asleep (`outbox.sleepers`): NOTIFY takes
   a global lock at commit, so busy relays are not woken by every payment.
All of it is one statement, so publishing costs no extra round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from ledger.ids import new_id
from outbox.envelope import NewEvent

WAKEUP_CHANNEL = "outbox_wakeup"

# Publishers of a merchant hold this lock shared until commit; disabling one of its consumers
# takes it exclusively (outbox/consumers.py). The fan-out statement runs after the lock is held, so
# it reads `enabled` afresh: a delivery never reaches a consumer that was disabled meanwhile
# without being parked with the rest.
CONSUMERS_LOCK = "hashtextextended('outbox.consumers:' || %s, 0)"
_HOLD_CONSUMERS = f"""
SELECT pg_advisory_xact_lock_shared({CONSUMERS_LOCK % 'm'})
FROM unnest(%s::text[]) AS m ORDER BY m
"""

# One statement: take each subject's next sequence numbers (the upsert's row lock serialises a
# subject's publishers until commit), insert the events numbered within their subject, fan out.
_PUBLISH = f"""
WITH input AS (
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[],
                         %s::int[])
        AS i(id, merchant_id, type, subject, data, ord)
), counts AS (
    SELECT subject, count(*) AS n FROM input GROUP BY subject ORDER BY subject
), seq AS (
    INSERT INTO outbox.subjects AS s (subject, last_sequence)
    SELECT subject, n FROM counts
    ON CONFLICT (subject) DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
    RETURNING subject, last_sequence
), ev AS (
    INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)
    SELECT i.id, i.merchant_id, i.type, i.subject,
           seq.last_sequence - c.n
             + row_number() OVER (PARTITION BY i.subject ORDER BY i.ord),
           %s, i.data
    FROM input i JOIN seq USING (subject) JOIN counts c USING (subject)
    RETURNING id, merchant_id, type, subject, sequence, time
), fan AS (
    INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, next_attempt_at,
                                   created_at)
    SELECT c.name, ev.id, ev.subject, ev.sequence, ev.time, ev.time
    FROM ev
    JOIN outbox.consumers c
      ON c.enabled
     AND (c.merchant_id IS NULL OR c.merchant_id = ev.merchant_id)
     AND outbox.type_matches(c.event_types, ev.type)
    RETURNING 1
)
SELECT (SELECT count(*) FROM fan),
       (SELECT pg_notify('{WAKEUP_CHANNEL}', '') FROM outbox.sleepers LIMIT 1) IS NULL
"""


async def publish(conn: AsyncConnection, events: Sequence[NewEvent], time: datetime) -> list[str]:
    """Write `events` (in order) in the caller's transaction; returns their ids.

    `time` is the moment of the change (the caller's transaction time). The statements' results
    are not awaited, so in pipeline mode the caller's following statements (and COMMIT) go out in
    the same round trip; an error surfaces at the next synchronisation, inside the transaction."""
    if not events:
        return []
    ids = [new_id("evt") for _ in events]
    merchants = sorted({e.merchant_id for e in events if e.merchant_id is not None})
    if merchants:
        await conn.execute(_HOLD_CONSUMERS, (merchants,))
    await conn.execute(
        _PUBLISH,
        (
            ids,
            [e.merchant_id for e in events],
            [e.type for e in events],
            [e.subject for e in events],
            [Jsonb(e.data) for e in events],
            list(range(len(events))),
            time,
        ),
    )
    return ids
