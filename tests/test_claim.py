"""The claim/complete SQL (outbox.claim): claimability, leases and tokens, and the plan."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg import AsyncConnection

from outbox import claim
from outbox.claim import Claimed, Completion
from outbox.consumers import disable_consumer, enable_consumer
from outbox.redrive import REDRIVE_BATCH, Redriven, redrive

WEBHOOK = "we_test"


def _seed(db_url: str, events: list[tuple[str, str, int]], consumers: tuple[str, ...] = (WEBHOOK,),
          merchant: str = "mer_x") -> None:
    """Events (id, subject, sequence), each fanned out to every consumer in `consumers`."""
    with psycopg.connect(db_url) as conn:
        conn.execute("INSERT INTO merchants (id, name) VALUES (%s, 'x') ON CONFLICT DO NOTHING",
                     (merchant,))
        for name in consumers:
            conn.execute(
                "INSERT INTO webhook_endpoints (id, merchant_id, url, event_types, secret)"
                " VALUES (%s, %s, 'https://example.com/', '{*}', 'whsec_AAAA')"
                " ON CONFLICT DO NOTHING",
                (name, merchant),
            )
            conn.execute(
                "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
                " VALUES (%s, 'webhook', %s, '{*}') ON CONFLICT DO NOTHING",
                (name, merchant),
            )
        for event_id, subject, sequence in events:
            conn.execute(
                "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)"
                " VALUES (%s, %s, 't.x', %s, %s, now(), '{}')",
                (event_id, merchant, subject, sequence),
            )
            for name in consumers:
                conn.execute(
                    "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence)"
                    " VALUES (%s, %s, %s, %s)",
                    (name, event_id, subject, sequence),
                )


async def _claim(conn: AsyncConnection, limit: int = 100, lease: float = 60) -> list[Claimed]:
    return await claim.claim_webhooks(conn, limit=limit, lease_seconds=lease, relay="test:1")


def _result(item: Claimed, outcome: claim.Outcome, delay: float = 0, code: int = 500) -> Completion:
    return Completion(item, outcome, delay, code, None if outcome == "delivered" else "x", 5)


@pytest.fixture
async def auto(db_url: str) -> AsyncIterator[AsyncConnection]:
    conn = await AsyncConnection.connect(db_url, autocommit=True)
    yield conn
    await conn.close()


async def test_only_the_oldest_pending_of_a_subject_is_claimable(
    db_url: str, auto: AsyncConnection
) -> None:
    _seed(db_url, [("evt_a1", "a", 1), ("evt_a2", "a", 2), ("evt_b1", "b", 1)])
    first = await _claim(auto)
    assert sorted(c.event.id for c in first) == ["evt_a1", "evt_b1"]
    assert await _claim(auto) == []  # leased: not due for anyone else

    async with auto.transaction():
        done = await claim.complete_webhooks(
            auto, [_result(c, "delivered", code=204) for c in first if c.event.id == "evt_a1"]
        )
    assert done == {(WEBHOOK, "evt_a1"): True}  # evt_a2 waits behind it
    assert [c.event.id for c in await _claim(auto)] == ["evt_a2"]


async def test_a_dead_delivery_stops_blocking_and_a_retry_keeps_blocking(
    db_url: str, auto: AsyncConnection
) -> None:
    _seed(db_url, [("evt_a1", "a", 1), ("evt_a2", "a", 2)])
    [a1] = await _claim(auto)
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(a1, "retry", delay=0)])
    [again] = await _claim(auto)
    assert again.event.id == "evt_a1" and again.attempts == 1
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(again, "dead")])
    [a2] = await _claim(auto)
    assert a2.event.id == "evt_a2"


async def test_an_expired_lease_is_claimed_again_and_the_old_token_is_refused(
    db_url: str, auto: AsyncConnection
) -> None:
    _seed(db_url, [("evt_a1", "a", 1)])
    [old] = await _claim(auto, lease=60)
    await auto.execute("UPDATE outbox.deliveries SET next_attempt_at = now() - interval '1 s'")
    [new] = await _claim(auto)
    assert new.token != old.token
    async with auto.transaction():
        assert await claim.complete_webhooks(auto, [_result(old, "delivered", code=204)]) == {}
    async with auto.transaction():
        assert await claim.complete_webhooks(auto, [_result(new, "delivered", code=204)]) == {
            (WEBHOOK, "evt_a1"): False
        }
    cur = await auto.execute("SELECT count(*) FROM outbox.attempts")
    assert await cur.fetchone() == (2,)  # both attempts are in the log


async def test_retry_schedules_and_release_gives_back(db_url: str, auto: AsyncConnection) -> None:
    _seed(db_url, [("evt_a1", "a", 1), ("evt_b1", "b", 1)])
    a1, b1 = sorted(await _claim(auto), key=lambda c: c.event.id)
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(a1, "retry", delay=300)])
    assert await claim.release(auto, [b1]) == 1
    cur = await auto.execute(
        "SELECT event_id, attempts, lease_token IS NULL,"
        " round(extract(epoch FROM next_attempt_at - now()))"
        " FROM outbox.deliveries ORDER BY event_id"
    )
    assert await cur.fetchall() == [("evt_a1", 1, True, 300), ("evt_b1", 0, True, 0)]
    due = await claim.seconds_to_next_due(auto)
    assert due is not None and 290 < due <= 300


async def test_disable_parks_and_enable_resumes(db_url: str, auto: AsyncConnection) -> None:
    _seed(db_url, [("evt_a1", "a", 1), ("evt_b1", "b", 1)])
    [*claimed] = await _claim(auto, limit=1)
    async with auto.transaction():
        assert await disable_consumer(auto, WEBHOOK, "testing")
    assert await _claim(auto) == []
    # The attempt in flight fails after the disable: it stays parked.
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(claimed[0], "retry", delay=0)])
    cur = await auto.execute(
        "SELECT count(*) FROM outbox.deliveries WHERE next_attempt_at = 'infinity'"
    )
    assert await cur.fetchone() == (2,)
    cur = await auto.execute("SELECT status, disabled_reason FROM webhook_endpoints")
    assert await cur.fetchone() == ("disabled", "testing")

    async with auto.transaction():
        assert await enable_consumer(auto, WEBHOOK)
    assert len(await _claim(auto)) == 2
    async with auto.transaction():
        assert not await disable_consumer(auto, "we_nobody", "x")


async def test_redrive_puts_dead_back_with_a_fresh_schedule(
    db_url: str, auto: AsyncConnection
) -> None:
    _seed(db_url, [("evt_a1", "a", 1), ("evt_b1", "b", 1)])
    claimed = await _claim(auto)
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(c, "dead") for c in claimed])
    assert await redrive(auto, WEBHOOK, since=datetime(2100, 1, 1, tzinfo=UTC)) == Redriven(0, 0)
    assert await redrive(auto, WEBHOOK) == Redriven(2, 0)
    again = await _claim(auto)
    assert len(again) == 2 and all(c.attempts == 0 for c in again)


async def test_busy_consumers_are_skipped(db_url: str, auto: AsyncConnection) -> None:
    _seed(db_url, [("evt_a1", "a", 1)], consumers=(WEBHOOK, "we_other"))
    claimed = await claim.claim_webhooks(
        auto, limit=10, lease_seconds=60, relay="t", rooms={WEBHOOK: 0}
    )
    assert [c.consumer for c in claimed] == ["we_other"]


async def test_a_claim_takes_no_more_than_each_consumer_has_room_for(
    db_url: str, auto: AsyncConnection
) -> None:
    """Per consumer: its room when listed, else the share; overall: the limit, oldest first."""
    _seed(db_url, [(f"evt_{s}1", s, 1) for s in "abcdefgh"], consumers=(WEBHOOK, "we_other"))
    claimed = await claim.claim_webhooks(
        auto, limit=5, lease_seconds=60, relay="t", share=3, rooms={WEBHOOK: 1}
    )
    assert Counter(c.consumer for c in claimed) == {WEBHOOK: 1, "we_other": 3}
    claimed = await claim.claim_webhooks(auto, limit=4, lease_seconds=60, relay="t", share=8)
    assert len(claimed) == 4
    leased = await auto.execute(
        "SELECT count(*) FROM outbox.deliveries WHERE lease_token IS NOT NULL"
    )
    assert await leased.fetchone() == (8,)  # nothing beyond the limits was leased


async def test_one_merchants_backlog_does_not_crowd_another_out_of_a_claim(
    db_url: str, auto: AsyncConnection
) -> None:
    """A claim deals its limit out in turns across merchants, then across a merchant's
    endpoints, not by age: merchant A's old backlog on two endpoints takes half of a claim of
    ten and merchant B's fresh event is in it."""
    _seed(db_url, [(f"evt_a{i:02}", f"a{i}", 1) for i in range(40)],
          consumers=("we_a1", "we_a2"), merchant="mer_a")
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE outbox.deliveries SET next_attempt_at = now() - interval '1 hour'")
    _seed(db_url, [("evt_b1", "b", 1)], consumers=("we_b",), merchant="mer_b")
    claimed = await claim.claim_webhooks(auto, limit=10, lease_seconds=60, relay="t")
    taken = Counter(c.consumer for c in claimed)
    assert taken["we_b"] == 1 and sorted([taken["we_a1"], taken["we_a2"]]) == [4, 5], taken
    # What a merchant already holds in the relay counts against its turns, and its room caps it.
    _seed(db_url, [(f"evt_c{i}", f"c{i}", 1) for i in range(5)], consumers=("we_c",),
          merchant="mer_c")
    claimed = await claim.claim_webhooks(
        auto, limit=6, lease_seconds=60, relay="t",
        merchants={"mer_a": (3, 100), "mer_c": (0, 2)},
    )
    assert Counter(c.event.merchant_id for c in claimed) == {"mer_a": 4, "mer_c": 2}


async def test_handler_deliveries_are_not_claimed_as_webhooks(
    db_url: str, auto: AsyncConnection
) -> None:
    _seed(db_url, [("evt_a1", "a", 1)], consumers=())
    await auto.execute(
        "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence)"
        " VALUES ('reports', 'evt_a1', 'a', 1)"
    )
    assert await _claim(auto) == []
    async with auto.transaction():
        rows = await claim.claim_for_handler(auto, "reports", 10)
        assert [e.id for _, e in rows] == ["evt_a1"]
        await claim.complete_for_handler(auto, "reports", ["evt_a1"])
    cur = await auto.execute("SELECT status, attempts FROM outbox.deliveries")
    assert await cur.fetchone() == ("delivered", 1)


async def test_claim_query_uses_the_partial_claim_index(db_url: str) -> None:
    """With a realistic table (mostly delivered rows, a few pending), the claim reads each
    consumer's due deliveries from ix_deliveries_claim in next_attempt_at order instead of scanning
    the table."""
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO merchants (id, name) VALUES ('mer_x', 'x');"
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
            " VALUES ('we_a', 'webhook', 'mer_x', '{*}'), ('we_b', 'webhook', 'mer_x', '{*}');"
            "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)"
            " SELECT 'evt_' || i, 'mer_x', 't.x', 'sub_' || (i % 5000), i / 5000 + 1, now(), '{}'"
            " FROM generate_series(0, 49999) i;"
            "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, status,"
            "                               next_attempt_at)"
            " SELECT c, e.id, e.subject, e.sequence,"
            "        CASE WHEN e.sequence < 10 THEN 'delivered' ELSE 'pending' END,"
            "        now() - interval '1 hour' + e.sequence * interval '1 s'"
            " FROM outbox.events e, unnest(ARRAY['we_a', 'we_b']) c;"
        )
        conn.commit()
        conn.autocommit = True
        conn.execute("ANALYZE outbox.deliveries")
        conn.execute("ANALYZE outbox.consumers")
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN " + claim.CLAIM_WEBHOOKS,
                {"consumers": ["we_b"], "rooms": [3], "share": 16, "merchants": ["mer_x"],
                 "merchant_held": [2], "merchant_rooms": [40], "merchant_share": 64,
                 "limit": 100, "lease": 60,
                 "token": uuid.uuid4(), "relay": "t"},
            )
        )
    assert "Index Scan using ix_deliveries_claim" in plan, plan
    assert "ix_deliveries_subject_pending" in plan, plan  # the per-subject order check
    assert "ix_deliveries_leased" in plan, plan  # the in-flight check
    assert "Seq Scan on deliveries" not in plan, plan


async def test_successors_are_claimed_only_when_claimable(
    db_url: str, auto: AsyncConnection
) -> None:
    _seed(db_url, [("evt_a1", "a", 1), ("evt_a2", "a", 2), ("evt_a3", "a", 3)])
    [a1] = await _claim(auto)

    async def successors() -> list[str]:
        claimed = await claim.claim_successors(
            auto, [(WEBHOOK, "a"), (WEBHOOK, "nothing")], lease_seconds=60, relay="t"
        )
        return [c.event.id for c in claimed]

    assert await successors() == []  # a1 is leased: a2 must wait
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(a1, "retry", delay=0)])
    assert await successors() == ["evt_a1"]  # the oldest pending is a1 again, not a2
    await auto.execute(  # as a completion does: delivered, and the lease ends with it
        "UPDATE outbox.deliveries SET status = 'delivered', lease_token = NULL"
        " WHERE event_id = 'evt_a1'"
    )
    assert await successors() == ["evt_a2"]
    assert await successors() == []


async def test_disable_and_enable_leave_a_lease_in_flight_alone(
    db_url: str, auto: AsyncConnection
) -> None:
    """Disabling and enabling an endpoint while one of its attempts is in flight: the lease runs
    on, neither a second copy nor the subject's next event becomes claimable, and the attempt's
    answer is still recorded."""
    _seed(db_url, [("evt_a1", "a", 1), ("evt_a2", "a", 2)])
    [a1] = await _claim(auto)
    async with auto.transaction():
        assert await disable_consumer(auto, WEBHOOK, "testing")
    async with auto.transaction():
        assert await enable_consumer(auto, WEBHOOK)
    assert await _claim(auto) == []
    async with auto.transaction():
        done = await claim.complete_webhooks(auto, [_result(a1, "delivered", code=204)])
    assert done == {(WEBHOOK, "evt_a1"): True}
    assert [c.event.id for c in await _claim(auto)] == ["evt_a2"]


async def test_a_redriven_delivery_waits_for_a_later_one_in_flight(
    db_url: str, auto: AsyncConnection
) -> None:
    """a1 is dead, so a2 went out; redriving a1 while a2 is in flight must not send a1 beside it:
    a1 waits until a2's attempt is answered, then goes (after a2: the documented case of an
    event out of order)."""
    _seed(db_url, [("evt_a1", "a", 1), ("evt_a2", "a", 2), ("evt_b1", "b", 1)])
    first = await _claim(auto)
    a1 = next(c for c in first if c.event.id == "evt_a1")
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(a1, "dead")])
    [a2] = await _claim(auto)
    assert a2.event.id == "evt_a2"
    # a2, in flight, was sent before a1: one subject out of order.
    assert await redrive(auto, WEBHOOK) == Redriven(1, 1)
    assert await _claim(auto) == []  # a2 is in flight: a1 waits
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(a2, "delivered", code=204)])
    assert [c.event.id for c in await _claim(auto)] == ["evt_a1"]


async def test_a_claim_that_began_before_a_redrive_committed_does_not_overtake_it(
    db_url: str, auto: AsyncConnection
) -> None:
    """The race a snapshot cannot see: a claim whose snapshot was taken while a1 was still dead
    reaches a2 after the redrive of a1 committed. The redrive rewrote a2, so PostgreSQL evaluates
    the claimable predicate again on it (as for any row changed after a claim's snapshot), and
    its fresh order check sees a1 pending: a2 is not taken. (The claims skip locked rows; this
    claim waits for the lock instead, to meet the redrive's commit at a known moment.)"""
    _seed(db_url, [("evt_a1", "a", 1), ("evt_a2", "a", 2)])
    [a1] = await _claim(auto)
    async with auto.transaction():
        await claim.complete_webhooks(auto, [_result(a1, "dead")])

    async with await AsyncConnection.connect(db_url) as redriving, \
            await AsyncConnection.connect(db_url, autocommit=True) as claiming:

        async def claim_waiting_for_locks() -> list[str]:
            cur = await claiming.execute(
                f"SELECT d.event_id FROM outbox.deliveries d"
                f" WHERE d.consumer = %s AND {claim._CLAIMABLE} FOR UPDATE OF d",
                (WEBHOOK,),
            )
            return [row[0] for row in await cur.fetchall()]

        async with redriving.transaction():
            cur = await redriving.execute(
                REDRIVE_BATCH,
                {"consumer": WEBHOOK, "since": None, "batch_size": 10, "after_subject": "",
                 "after_sequence": 0},
            )
            assert (await cur.fetchone())[:3] == (1, 1, 0)  # type: ignore[index]
            task = asyncio.create_task(claim_waiting_for_locks())
            for _ in range(400):
                waits = await auto.execute(
                    "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                    (claiming.info.backend_pid,),
                )
                if await waits.fetchone() == ("Lock",):
                    break
                await asyncio.sleep(0.025)
            else:
                raise AssertionError("the claim did not wait for the row the redrive rewrote")
        assert await asyncio.wait_for(task, 30) == []
    assert [c.event.id for c in await _claim(auto)] == ["evt_a1"]
