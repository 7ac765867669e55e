"""Publishing: events and their fan-out, written inside the caller's transaction.

`publish(conn, events)` must run in the transaction that makes the change the events describe, so
both commit or neither does. It
1. takes the next sequence numbers of each subject from `outbox.subjects` (an upsert: the row lock
   serialises publishers of one subject until commit, so sequences are gap-free and in commit
   order),
2. inserts the events and, in the same statement, one delivery row per matching enabled consumer,
3. sends one NOTIFY, but only when a relay has said it is asleep (`outbox.sleepers`): NOTIFY takes
   a global lock at commit, so busy relays are not woken by every payment.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from ledger.ids import new_id
from outbox.envelope import Event, NewEvent

WAKEUP_CHANNEL = "outbox_wakeup"

_NEXT_SEQUENCES = """
INSERT INTO outbox.subjects AS s (subject, last_sequence)
SELECT * FROM unnest(%s::text[], %s::bigint[])
ON CONFLICT (subject) DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
RETURNING subject, last_sequence
"""

_INSERT_AND_FAN_OUT = f"""
WITH ev AS (
    INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)
    SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[],
                         %s::timestamptz[], %s::jsonb[])
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


async def publish(
    conn: AsyncConnection, events: Sequence[NewEvent], time: datetime
) -> list[Event]:
    """Write `events` (in order) in the caller's transaction; returns them with ids and sequences.

    `time` is the moment of the change (the caller's transaction time)."""
    if not events:
        return []
    counts = Counter(e.subject for e in events)
    subjects = sorted(counts)  # a fixed order, so two publishers cannot deadlock on subject rows
    cur = await conn.execute(_NEXT_SEQUENCES, (subjects, [counts[s] for s in subjects]))
    last = {subject: seq for subject, seq in await cur.fetchall()}
    nxt = {s: last[s] - counts[s] + 1 for s in subjects}
    out: list[Event] = []
    for e in events:
        seq = nxt[e.subject]
        nxt[e.subject] = seq + 1
        out.append(Event(new_id("evt"), e.type, e.subject, seq, time, e.data, e.merchant_id))
    await conn.execute(
        _INSERT_AND_FAN_OUT,
        (
            [e.id for e in out],
            [e.merchant_id for e in out],
            [e.type for e in out],
            [e.subject for e in out],
            [e.sequence for e in out],
            [e.time for e in out],
            [Jsonb(e.data) for e in out],
        ),
    )
    return out
