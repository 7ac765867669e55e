"""The delivery state machine in SQL: claim, complete and release (docs/relay.md).

    pending --claim--> pending + lease --2xx--> delivered
                                       --fail--> pending (next_attempt_at = now() + schedule)
                                       --fail, schedule exhausted--> dead
                                       --410--> pending, parked (endpoint disabled)
    dead --redrive--> pending

The lease lives in `next_attempt_at`: a claim pushes it to the end of the lease and stamps a
`lease_token`, so the claimed row is not due for anyone else until the lease runs out; a relay
that dies simply lets it run out. Completion presents the token, so a relay whose lease expired
(and whose row was claimed again) cannot complete it a second time.

A delivery is claimable when it is pending, due, the oldest pending delivery of its (consumer,
subject), and no other delivery of that (consumer, subject) is in flight (holds a live lease):
per-subject order for every consumer, while a dead delivery stops blocking, and at most one
delivery of a subject in flight even when a redrive brings an earlier one back.

Webhook deliveries are claimed and committed before the HTTP call (`claim_webhooks`), handler
deliveries are claimed inside the transaction that applies them (`claim_for_handler`).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import AsyncConnection

from outbox.envelope import Event

Outcome = Literal["delivered", "retry", "dead", "park"]

# The claimable predicate, shared by the claims. It keeps `status = 'pending'`,
# `next_attempt_at <= now()` and `next_attempt_at < 'infinity'` as plain conjuncts next to
# `consumer = ...`: together they imply ix_deliveries_claim's predicate, so that index (consumer,
# next_attempt_at) serves the claim, and only statements that say `< 'infinity'` can use it.
#
# Plans must not depend on the statistics of the pending indexes: a queue that autovacuum saw
# drained has them at zero rows, and PostgreSQL then believes any scan of them returns one row,
# whatever backlog has built up since. So every probe is shaped to leave the planner one index:
# the order check is a correlated subplan (`OFFSET 0` keeps it from becoming an anti-join that
# rescans a whole consumer per candidate) whose quals only ix_deliveries_subject_pending serves,
# and lookups by key never mention `status`, so only the primary key serves them
# (tests/test_queue_plans.py).
def _pending_in_subject(before_or_after: Literal["<", ">"]) -> str:
    """A pending delivery of d's consumer and subject earlier (`<`) or later (`>`) than d."""
    return f"""
    SELECT 1 FROM outbox.deliveries p
    WHERE p.consumer = d.consumer AND p.subject = d.subject
      AND p.status = 'pending' AND p.sequence {before_or_after} d.sequence
    OFFSET 0
"""


# Another delivery of d's consumer and subject holds a live lease: it is in flight. Only
# ix_deliveries_leased, which holds nothing but leased rows, serves its quals.
_IN_FLIGHT_IN_SUBJECT = """
    SELECT 1 FROM outbox.deliveries p
    WHERE p.consumer = d.consumer AND p.subject = d.subject
      AND p.lease_token IS NOT NULL AND p.next_attempt_at > now()
    OFFSET 0
"""

# The order check is made twice. The sub-select reads the claim's snapshot and rules out the many
# deliveries queued behind a predecessor cheaply. `outbox.is_first_pending` makes it again with a
# snapshot of its own, for the one case a snapshot cannot see: a redrive that brought an earlier
# delivery back from dead and committed after the claim began. Such a redrive rewrites the later
# pending deliveries of the subject in the same transaction, so a claim that reaches one of them
# afterwards finds it changed and PostgreSQL evaluates this predicate again on it; only a fresh
# snapshot then sees the predecessor (docs/relay.md, Ordering). The function costs the most, so
# it runs last, on the rows everything else let through.
_CLAIMABLE = f"""
      d.status = 'pending'
  AND d.next_attempt_at <= now()
  AND d.next_attempt_at < 'infinity'
  AND NOT EXISTS ({_pending_in_subject('<')})
  AND NOT EXISTS ({_IN_FLIGHT_IN_SUBJECT})
  AND outbox.is_first_pending(d.consumer, d.subject, d.sequence)
"""

_LEASE_AND_RETURN = """
UPDATE outbox.deliveries d
SET next_attempt_at = now() + %(lease)s * interval '1 second',
    lease_token = %(token)s,
    leased_by = %(relay)s
FROM c
JOIN outbox.events e ON e.id = c.event_id
LEFT JOIN public.webhook_endpoints w ON w.id = c.consumer
WHERE d.consumer = c.consumer AND d.event_id = c.event_id
RETURNING d.consumer, d.attempts, e.id, e.type, e.subject, e.sequence, e.time, e.data,
          e.merchant_id, w.url, w.secret,
          CASE WHEN w.previous_secret_expires_at > now() THEN w.previous_secret END
"""

_WEBHOOK_CONSUMER = """
  AND EXISTS (
        SELECT 1 FROM outbox.consumers k
        WHERE k.name = d.consumer AND k.kind = 'webhook' AND k.enabled)
"""

# Each enabled webhook consumer is claimed on its own, through ix_deliveries_claim (consumer,
# next_attempt_at), up to the room it has left in this relay (`rooms`, default `share`): a
# consumer at its share costs one index probe instead of a walk past its whole backlog, and a claim
# never takes more than the relay keeps. The overall `limit` is then dealt out in turns, not by
# age: each merchant's candidates are numbered by turn (its consumers' oldest first, then their
# second oldest, ...), a merchant's turns start after what it already holds in this relay
# (`merchants`: held, room; default none held, room `merchant_share`) and stop at its room, and
# the lowest turns win. So a merchant's backlog, however old, cannot crowd another merchant's
# fresh event out of a claim, and merchants holding little here come first (relay/fairness.py).
CLAIM_WEBHOOKS = f"""
WITH x AS (
    SELECT x.consumer, x.event_id, x.next_attempt_at, k.merchant_id,
           row_number() OVER (PARTITION BY k.name ORDER BY x.next_attempt_at) AS nth
    FROM outbox.consumers k
    LEFT JOIN unnest(%(consumers)s::text[], %(rooms)s::int[]) AS r(consumer, room)
      ON r.consumer = k.name
    CROSS JOIN LATERAL (
        SELECT d.consumer, d.event_id, d.next_attempt_at
        FROM outbox.deliveries d
        WHERE d.consumer = k.name AND {_CLAIMABLE}
        ORDER BY d.next_attempt_at
        LIMIT least(coalesce(r.room, %(share)s), %(limit)s)
        FOR UPDATE OF d SKIP LOCKED
    ) x
    WHERE k.kind = 'webhook' AND k.enabled AND coalesce(r.room, %(share)s) > 0
), t AS (
    SELECT x.consumer, x.event_id, x.next_attempt_at, x.merchant_id,
           row_number() OVER (PARTITION BY x.merchant_id ORDER BY x.nth, x.next_attempt_at)
               AS turn
    FROM x
), c AS (
    SELECT t.consumer, t.event_id
    FROM t
    LEFT JOIN unnest(%(merchants)s::text[], %(merchant_held)s::int[], %(merchant_rooms)s::int[])
        AS m(merchant_id, held, room)
      ON m.merchant_id = t.merchant_id
    WHERE t.turn <= coalesce(m.room, %(merchant_share)s)
    ORDER BY coalesce(m.held, 0) + t.turn, t.next_attempt_at
    LIMIT %(limit)s
)
{_LEASE_AND_RETURN}"""

# The next delivery of subjects whose previous one was just delivered, found through
# ix_deliveries_subject_pending instead of walking the claim index past every delivery that waits
# behind its predecessor: a long chain of one subject's events moves at the speed of its
# endpoint, not of the claim loop. The full claimable predicate is checked again under the lock,
# so this can never overtake an earlier event.
CLAIM_SUCCESSORS = f"""
WITH s AS (
    SELECT * FROM unnest(%(consumers)s::text[], %(subjects)s::text[]) AS s(consumer, subject)
), nxt AS (
    SELECT x.consumer, x.event_id
    FROM s CROSS JOIN LATERAL (
        SELECT p.consumer, p.event_id FROM outbox.deliveries p
        WHERE p.consumer = s.consumer AND p.subject = s.subject AND p.status = 'pending'
        ORDER BY p.sequence LIMIT 1
    ) x
), c AS (
    SELECT d.consumer, d.event_id
    FROM nxt CROSS JOIN LATERAL (
        SELECT d.consumer, d.event_id, d.subject, d.sequence, d.status, d.next_attempt_at
        FROM outbox.deliveries d
        WHERE d.consumer = nxt.consumer AND d.event_id = nxt.event_id
        FOR UPDATE OF d SKIP LOCKED
        OFFSET 0
    ) d
    WHERE {_CLAIMABLE}
      {_WEBHOOK_CONSUMER}
)
{_LEASE_AND_RETURN}"""

CLAIM_FOR_HANDLER = f"""
WITH c AS (
    SELECT d.consumer, d.event_id, d.attempts
    FROM outbox.deliveries d
    WHERE {_CLAIMABLE}
      AND d.consumer = %(consumer)s
    ORDER BY d.next_attempt_at
    LIMIT %(limit)s
    FOR UPDATE OF d SKIP LOCKED
)
SELECT c.attempts, e.id, e.type, e.subject, e.sequence, e.time, e.data, e.merchant_id
FROM c JOIN outbox.events e ON e.id = c.event_id
ORDER BY e.subject, e.sequence
"""

# Handler deliveries are locked by the claim in the same transaction: no token needed, and they
# are still pending (no `status` in the WHERE: see _CLAIMABLE on plans).
COMPLETE_FOR_HANDLER = """
UPDATE outbox.deliveries
SET status = 'delivered', delivered_at = now(), attempts = attempts + 1,
    last_attempt_at = now(), last_status_code = NULL, last_error = NULL,
    lease_token = NULL, leased_by = NULL
WHERE consumer = %(consumer)s AND event_id = ANY(%(event_ids)s::text[])
"""

FAIL_FOR_HANDLER = """
UPDATE outbox.deliveries
SET attempts = attempts + 1,
    status = CASE WHEN %(dead)s THEN 'dead' ELSE 'pending' END,
    dead_since = CASE WHEN %(dead)s THEN now() END,
    next_attempt_at = now() + %(delay)s * interval '1 second',
    last_attempt_at = now(), last_status_code = NULL, last_error = %(error)s
WHERE consumer = %(consumer)s AND event_id = %(event_id)s
"""

# One statement for a batch of webhook results: the attempt log for every result, and the state
# change for those whose lease is still ours, each with whether a later delivery of its subject
# waits (in the statement's snapshot), which the relay then claims at once. A retry of a consumer
# that was disabled meanwhile stays parked ('infinity') instead of being scheduled.
COMPLETE_WEBHOOKS = f"""
WITH r AS (
    SELECT * FROM unnest(%(consumers)s::text[], %(event_ids)s::text[], %(tokens)s::uuid[],
                         %(outcomes)s::text[], %(delays)s::float8[], %(codes)s::int[],
                         %(errors)s::text[], %(latencies)s::int[])
        AS r(consumer, event_id, token, outcome, delay, code, error, latency_ms)
), log AS (
    INSERT INTO outbox.attempts (consumer, event_id, status_code, latency_ms, error)
    SELECT consumer, event_id, code, latency_ms, error FROM r
)
UPDATE outbox.deliveries d
SET attempts = d.attempts + 1,
    status = CASE r.outcome WHEN 'delivered' THEN 'delivered'
                            WHEN 'dead' THEN 'dead'
                            ELSE 'pending' END,
    delivered_at = CASE WHEN r.outcome = 'delivered' THEN now() END,
    dead_since = CASE WHEN r.outcome = 'dead' THEN now() END,
    next_attempt_at = CASE
        WHEN r.outcome = 'retry'
             AND (SELECT k.enabled FROM outbox.consumers k WHERE k.name = d.consumer)
            THEN now() + r.delay * interval '1 second'
        WHEN r.outcome IN ('retry', 'park') THEN 'infinity'
        ELSE d.next_attempt_at END,
    lease_token = NULL,
    leased_by = NULL,
    last_attempt_at = now(),
    last_status_code = r.code,
    last_error = r.error
FROM r
WHERE d.consumer = r.consumer AND d.event_id = r.event_id AND d.lease_token = r.token
RETURNING d.consumer, d.event_id, EXISTS ({_pending_in_subject('>')})
"""

# Gives back leases without an attempt: due again at once (unless parked meanwhile). A token
# that still matches means the row is pending: completion clears it.
RELEASE = """
UPDATE outbox.deliveries d
SET next_attempt_at = CASE WHEN d.next_attempt_at = 'infinity' THEN d.next_attempt_at
                           ELSE now() END,
    lease_token = NULL,
    leased_by = NULL
FROM unnest(%(consumers)s::text[], %(event_ids)s::text[], %(tokens)s::uuid[])
    AS r(consumer, event_id, token)
WHERE d.consumer = r.consumer AND d.event_id = r.event_id AND d.lease_token = r.token
"""

# One index probe per consumer (ix_deliveries_claim leads with the consumer).
NEXT_DUE = """
SELECT extract(epoch FROM min(x.at) - now())::float8
FROM outbox.consumers k CROSS JOIN LATERAL (
    SELECT d.next_attempt_at AS at FROM outbox.deliveries d
    WHERE d.consumer = k.name AND d.status = 'pending'
      AND d.next_attempt_at > now() AND d.next_attempt_at < 'infinity'
    ORDER BY d.next_attempt_at LIMIT 1
) x
"""

# A relay about to sleep says so; publishers send NOTIFY only while such a row exists. Rows of
# relays that died asleep stop counting after a while: a sleeping relay refreshes its own.
REGISTER_SLEEPER = """
WITH stale AS (
    DELETE FROM outbox.sleepers
    WHERE since < now() - %(stale)s * interval '1 second' AND relay <> %(relay)s
)
INSERT INTO outbox.sleepers (relay) VALUES (%(relay)s)
ON CONFLICT (relay) DO UPDATE SET since = now()
"""

UNREGISTER_SLEEPER = "DELETE FROM outbox.sleepers WHERE relay = %(relay)s"

# outbox.backlog without its delivered_5m column: that column makes the view read every
# delivered row, while these counts stay on the pending and dead partial indexes.
BACKLOG = """
SELECT k.name, coalesce(p.pending, 0), coalesce(p.in_flight, 0), coalesce(x.dead, 0),
       coalesce(extract(epoch FROM now() - p.oldest), 0)::float8
FROM outbox.consumers k
LEFT JOIN (
    SELECT consumer,
           count(*) FILTER (WHERE lease_token IS NULL) AS pending,
           count(*) FILTER (WHERE lease_token IS NOT NULL) AS in_flight,
           min(created_at) AS oldest
    FROM outbox.deliveries WHERE status = 'pending' GROUP BY consumer
) p ON p.consumer = k.name
LEFT JOIN (
    SELECT consumer, count(*) AS dead
    FROM outbox.deliveries WHERE status = 'dead' GROUP BY consumer
) x ON x.consumer = k.name
ORDER BY k.name
"""


@dataclass(frozen=True, slots=True)
class Claimed:
    """A webhook delivery this relay holds a lease on."""

    consumer: str
    token: uuid.UUID
    attempts: int
    event: Event
    url: str | None
    secret: str | None
    previous_secret: str | None = None
    """The secret before a rotation, while its overlap window lasts (signed with as well)."""


@dataclass(frozen=True, slots=True)
class Completion:
    """The result of one webhook attempt, ready to be written."""

    claimed: Claimed
    outcome: Outcome
    delay: float
    status_code: int | None
    error: str | None
    latency_ms: int


@dataclass(frozen=True, slots=True)
class Backlog:
    consumer: str
    pending: int
    in_flight: int
    dead: int
    oldest_pending_age: float


def _event(row: Sequence[Any]) -> Event:
    id_, type_, subject, sequence, time, data, merchant_id = row
    return Event(id_, type_, subject, sequence, time, data, merchant_id)


async def claim_webhooks(
    conn: AsyncConnection,
    *,
    limit: int,
    lease_seconds: float,
    relay: str,
    share: int | None = None,
    rooms: Mapping[str, int] | None = None,
    merchant_share: int | None = None,
    merchants: Mapping[str, tuple[int, int]] | None = None,
) -> list[Claimed]:
    """Claim up to `limit` due webhook deliveries and commit: at most `rooms[consumer]` of a
    consumer listed there, at most `share` (default `limit`) of any other; of a merchant listed
    in `merchants` (held here, room) at most its room, of any other `merchant_share` (default
    `limit`); dealt out in turns across merchants (CLAIM_WEBHOOKS).

    `conn` must be in autocommit mode: the claim is its own transaction."""
    token = uuid.uuid4()
    rooms = rooms or {}
    merchants = merchants or {}
    cur = await conn.execute(
        CLAIM_WEBHOOKS,
        {"consumers": list(rooms), "rooms": list(rooms.values()),
         "share": limit if share is None else share,
         "merchants": list(merchants), "merchant_held": [h for h, _ in merchants.values()],
         "merchant_rooms": [r for _, r in merchants.values()],
         "merchant_share": limit if merchant_share is None else merchant_share,
         "limit": limit, "lease": lease_seconds, "token": token, "relay": relay},
    )
    rows = await cur.fetchall()
    return [
        Claimed(row[0], token, row[1], _event(row[2:9]), row[9], row[10], row[11])
        for row in rows
    ]


async def claim_successors(
    conn: AsyncConnection,
    subjects: Sequence[tuple[str, str]],
    *,
    lease_seconds: float,
    relay: str,
) -> list[Claimed]:
    """Claim the next due delivery of each (consumer, subject), where it is claimable."""
    if not subjects:
        return []
    token = uuid.uuid4()
    cur = await conn.execute(
        CLAIM_SUCCESSORS,
        {"consumers": [c for c, _ in subjects], "subjects": [s for _, s in subjects],
         "lease": lease_seconds, "token": token, "relay": relay},
    )
    return [
        Claimed(row[0], token, row[1], _event(row[2:9]), row[9], row[10], row[11])
        for row in await cur.fetchall()
    ]


async def complete_webhooks(
    conn: AsyncConnection, results: Sequence[Completion]
) -> dict[tuple[str, str], bool]:
    """Write a batch of attempt results in the caller's transaction.

    Returns the (consumer, event_id) pairs whose lease was still ours (the rest were only logged),
    each mapped to whether a later delivery of its subject is pending.
    """
    if not results:
        return {}
    cur = await conn.execute(
        COMPLETE_WEBHOOKS,
        {
            "consumers": [r.claimed.consumer for r in results],
            "event_ids": [r.claimed.event.id for r in results],
            "tokens": [r.claimed.token for r in results],
            "outcomes": [r.outcome for r in results],
            "delays": [r.delay for r in results],
            "codes": [r.status_code for r in results],
            "errors": [r.error for r in results],
            "latencies": [r.latency_ms for r in results],
        },
    )
    return {(c, e): later for c, e, later in await cur.fetchall()}


async def release(conn: AsyncConnection, claimed: Sequence[Claimed]) -> int:
    """Give leases back without an attempt (shutdown, or more than a consumer may take)."""
    if not claimed:
        return 0
    cur = await conn.execute(
        RELEASE,
        {
            "consumers": [c.consumer for c in claimed],
            "event_ids": [c.event.id for c in claimed],
            "tokens": [c.token for c in claimed],
        },
    )
    return cur.rowcount


async def claim_for_handler(
    conn: AsyncConnection, consumer: str, limit: int
) -> list[tuple[int, Event]]:
    """Lock up to `limit` claimable deliveries of a handler consumer in the caller's transaction;
    returns (attempts so far, event) in subject order."""
    cur = await conn.execute(CLAIM_FOR_HANDLER, {"consumer": consumer, "limit": limit})
    return [(row[0], _event(row[1:])) for row in await cur.fetchall()]


async def complete_for_handler(
    conn: AsyncConnection, consumer: str, event_ids: Sequence[str]
) -> None:
    await conn.execute(COMPLETE_FOR_HANDLER, {"consumer": consumer, "event_ids": list(event_ids)})


async def fail_for_handler(
    conn: AsyncConnection, consumer: str, event_id: str, *, delay: float, dead: bool, error: str
) -> None:
    await conn.execute(
        FAIL_FOR_HANDLER,
        {"consumer": consumer, "event_id": event_id, "delay": delay, "dead": dead,
         "error": error},
    )


async def seconds_to_next_due(conn: AsyncConnection) -> float | None:
    """Seconds until the next pending delivery (or lease) comes due, if one is in the future."""
    cur = await conn.execute(NEXT_DUE)
    row = await cur.fetchone()
    return row[0] if row else None


async def register_sleeper(conn: AsyncConnection, relay: str, stale_after: float) -> None:
    await conn.execute(REGISTER_SLEEPER, {"relay": relay, "stale": stale_after})


async def unregister_sleeper(conn: AsyncConnection, relay: str) -> None:
    await conn.execute(UNREGISTER_SLEEPER, {"relay": relay})


async def backlog(conn: AsyncConnection) -> list[Backlog]:
    cur = await conn.execute(BACKLOG)
    return [Backlog(*row) for row in await cur.fetchall()]
