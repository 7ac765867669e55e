"""Turning consumers off and on, and deleting them.

All of it runs in the caller's transaction (the API's request, the CLI, or the relay when an
endpoint answers 410) and never commits.

A disabled consumer gets no new deliveries (fan-out skips it) and its pending ones are parked
with `next_attempt_at = 'infinity'`: they keep their place in each subject's order, and
re-enabling makes them due at once. None of these operations touches a lease: a delivery in
flight while its consumer is disabled keeps its lease (so nothing else of its subject is
claimable) and its answer is recorded; if the attempt fails it is parked then
(outbox.claim.COMPLETE_WEBHOOKS).

Disabling and deleting first take the merchant's consumers lock exclusively: publishers hold it
shared until they commit (outbox/publish.py), so the statements that follow, with a fresh
snapshot, also see the deliveries those publishers fanned out.
"""

from __future__ import annotations

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
SET next_attempt_at = 'infinity', lease_token = NULL, leased_by = NULL
WHERE consumer = %(name)s AND status = 'pending'
  AND (lease_token IS NULL OR next_attempt_at <= now())
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
SET next_attempt_at = now()
WHERE consumer = %(name)s AND status = 'pending' AND next_attempt_at = 'infinity'
"""

_EXISTS = "SELECT enabled FROM outbox.consumers WHERE name = %s"

_HOLD_PUBLISHERS = f"""
SELECT enabled, pg_advisory_xact_lock({CONSUMERS_LOCK % 'merchant_id'})
FROM outbox.consumers WHERE name = %s
"""

_DELETE = """
WITH gone AS (
    DELETE FROM outbox.deliveries WHERE consumer = %(name)s
)
DELETE FROM outbox.consumers WHERE name = %(name)s
"""


async def hold_publishers(conn: AsyncConnection, name: str) -> bool:
    """Wait for the publishers in flight of consumer `name`'s merchant and keep new ones out
    until the caller's transaction ends. False when there is no such consumer.

    Take it before any row lock of the consumer's deliveries, as every operation here does, so
    that two of them cannot wait for each other."""
    cur = await conn.execute(_HOLD_PUBLISHERS, (name,))
    return await cur.fetchone() is not None


async def disable_consumer(conn: AsyncConnection, name: str, reason: str) -> bool:
    """Disable consumer `name` (for a webhook, also its endpoint, with `reason` as
    disabled_reason) and park its pending deliveries, except those in flight. False when there
    is no such consumer."""
    if not await hold_publishers(conn, name):
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


async def delete_consumer(conn: AsyncConnection, name: str) -> bool:
    """Delete consumer `name` and every delivery of it, including those fanned out by
    publishers still in flight when it was called. False when there is no such consumer."""
    if not await hold_publishers(conn, name):
        return False
    await conn.execute(_DELETE, {"name": name})
    return True
