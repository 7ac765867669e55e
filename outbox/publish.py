"""Publishing: events and their fan-out, written inside the caller's transaction.

`publish(conn, events)` must run in the transaction that makes the change the events describe, so
both commit or neither does. It
1. takes the next sequence numbers of each subject from `outbox.subjects` (an upsert: the row lock
   serialises publishers of one subject until commit, so sequences are gap-free and in commit
   order; subjects are upserted in sorted order so two publishers cannot deadlock on them),
2. inserts the events and one delivery row per matching enabled consumer,
3. sends one NOTIFY, but only when a relay has said it is asleep (`outbox.sleepers`): NOTIFY takes
   a global lock at commit, so busy relays are not woken by every payment.
All of it is one call of the SQL function `outbox.publish`, which the payment function
(`ledger_create_payment`) calls too, so publishing costs no extra round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from ledger.ids import new_id
from outbox.envelope import NewEvent

WAKEUP_CHANNEL = "outbox_wakeup"

# Publishers of a merchant hold this lock shared until commit (the first statement of
# outbox.publish, db/migrations/versions/0003_payment_functions.py); disabling one of its
# consumers takes it exclusively (outbox/consumers.py). The fan-out runs after the lock is held,
# so it reads `enabled` afresh: a delivery never reaches a consumer that was disabled meanwhile
# without being parked with the rest.
CONSUMERS_LOCK = "hashtextextended('outbox.consumers:' || %s, 0)"

# The whole publication is the PL/pgSQL function outbox.publish: the consumers lock, each
# subject's next sequence numbers (the upsert's row lock serialises a subject's publishers until
# commit), the events numbered within their subject, the fan-out, and the NOTIFY.
PUBLISH = "SELECT outbox.publish(%s::text[], %s::text[], %s::text[], %s::text[], %s::jsonb[], %s)"


async def publish(conn: AsyncConnection, events: Sequence[NewEvent], time: datetime) -> list[str]:
    """Write `events` (in order) in the caller's transaction; returns their ids.

    `time` is the moment of the change (the caller's transaction time). The statement's result
    is not awaited, so in pipeline mode the caller's following statements (and COMMIT) go out in
    the same round trip; an error surfaces at the next synchronisation, inside the transaction."""
    if not events:
        return []
    ids = [new_id("evt") for _ in events]
    await conn.execute(
        PUBLISH,
        (
            ids,
            [e.merchant_id for e in events],
            [e.type for e in events],
            [e.subject for e in events],
            [Jsonb(e.data) for e in events],
            time,
        ),
    )
    return ids
