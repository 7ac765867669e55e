"""Turning consumers off and on, and giving dead deliveries another chance.

All three run in the caller's transaction (the API's request, the CLI, or the relay when an
endpoint answers 410) and never commit.

A disabled consumer gets no new deliveries (fan-out skips it) and its pending ones are parked
with `next_attempt_at = 'infinity'`: they keep their place in each subject's order, and
re-enabling makes them due at once. A delivery in flight while its consumer is disabled keeps its
lease; if the attempt fails it stays parked (outbox.claim.COMPLETE_WEBHOOKS).
"""

from __future__ import annotations

from datetime import datetime

from psycopg import AsyncConnection

from outbox.publish import CONSUMERS_LOCK

_DISABLE = """
WITH k AS (
    UPDATE outbox.consumers SET enabled = false WHERE name = %(name)s RETURNING name
), w AS (
    UPDATE public.webhook_endpoints
    SET status = 'disabled', disabled_reason = %(reason)s
    WHERE id = %(name)s
)
UPDATE outbox.deliveries
SET next_attempt_at = 'infinity'
WHERE consumer = %(name)s AND status = 'pending'
"""

_ENABLE = """
WITH k AS (
    UPDATE outbox.consumers SET enabled = true WHERE name = %(name)s RETURNING name
), w AS (
    UPDATE public.webhook_endpoints
    SET status = 'enabled', disabled_reason = NULL
    WHERE id = %(name)s
)
UPDATE outbox.deliveries
SET next_attempt_at = now(), lease_token = NULL, leased_by = NULL
WHERE consumer = %(name)s AND status = 'pending' AND next_attempt_at = 'infinity'
"""

_EXISTS = "SELECT enabled FROM outbox.consumers WHERE name = %s"

# Waits for the merchant's publishers in flight (they hold the lock shared, outbox/publish.py), so
# the next statement, with a fresh snapshot, also parks the deliveries they fanned out.
_HOLD_PUBLISHERS = f"""
SELECT enabled, pg_advisory_xact_lock({CONSUMERS_LOCK % 'merchant_id'})
FROM outbox.consumers WHERE name = %s
"""

_REDRIVE = """
WITH r AS (
UPDATE outbox.deliveries d
SET status = 'pending', attempts = 0, dead_since = NULL,
    next_attempt_at = CASE WHEN k.enabled THEN now() ELSE 'infinity'::timestamptz END,
    lease_token = NULL, leased_by = NULL
FROM outbox.consumers k
WHERE k.name = d.consumer
  AND d.consumer = %(name)s AND d.status = 'dead'
  AND (%(since)s::timestamptz IS NULL OR d.dead_since >= %(since)s::timestamptz)
RETURNING 1
)
SELECT count(*) FROM r
"""


async def disable_consumer(conn: AsyncConnection, name: str, reason: str) -> bool:
    """Disable consumer `name` (for a webhook, also its endpoint, with `reason` as
    disabled_reason) and park its pending deliveries. False when there is no such consumer."""
    cur = await conn.execute(_HOLD_PUBLISHERS, (name,))
    if await cur.fetchone() is None:
        return False
    await conn.execute(_DISABLE, {"name": name, "reason": reason})
    return True


async def enable_consumer(conn: AsyncConnection, name: str) -> bool:
    """Enable consumer `name` (and its endpoint) and make its parked deliveries due now.
    False when there is no such consumer."""
    cur = await conn.execute(_EXISTS, (name,))
    if await cur.fetchone() is None:
        return False
    await conn.execute(_ENABLE, {"name": name})
    return True


async def redrive_dead(conn: AsyncConnection, name: str, since: datetime | None = None) -> int:
    """Put consumer `name`'s dead deliveries (dead since `since`, or all) back to pending with a
    fresh retry schedule; the attempt log keeps the history. Returns how many."""
    # A count from a result row, not cur.rowcount: in pipeline mode rowcount is unknown until the
    # pipeline syncs.
    cur = await conn.execute(_REDRIVE, {"name": name, "since": since})
    row = await cur.fetchone()
    return int(row[0]) if row else 0
