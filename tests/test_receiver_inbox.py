"""The receiver library's core against a real PostgreSQL (docs/receiver.md): signatures with
secret rotation, exactly-once application with the inbox in the handler's transaction, holding
an event that arrives ahead of a gap, catching up, and late events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from outbox.signing import new_secret
from receiver import BadEvent, BadSignature, Inbox, Outcome, ReceivedEvent, sequence_number
from receiver.event import parse_event
from receiver.migrate import migrate
from tests.receiverhelpers import (
    create_effects_table,
    effects,
    envelope,
    record_effect,
    record_late,
    scalar,
    signed,
)

SECRET = new_secret()
OLD_SECRET = new_secret()


@pytest.fixture
def receiver_db(empty_db_url: str) -> str:
    """The receiver's own database, migrated, with an `effects` table for the handler."""
    migrate(empty_db_url)
    create_effects_table(empty_db_url)
    return empty_db_url


@pytest.fixture
async def pool(receiver_db: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    async with AsyncConnectionPool(receiver_db, min_size=1, max_size=12, open=False) as p:
        yield p


@pytest.fixture
def inbox(pool: AsyncConnectionPool[Any]) -> Inbox:
    return Inbox(pool, [SECRET], record_effect, late_handler=record_late)


async def deliver(inbox: Inbox, event: dict[str, Any], secrets: list[str] | None = None) -> Outcome:
    body, headers = signed(event, secrets or [SECRET])
    return await inbox.receive(body, headers)


# --- the sequence ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "number"),
    [(1, 1), (42, 42), ("0000000000000000042", 42), ("7", 7), ("0000000000000000001", 1),
     (2**63 - 1, 2**63 - 1), ("9223372036854775807", 2**63 - 1)],
)
def test_sequence_reads_integers_and_decimal_strings(value: object, number: int) -> None:
    assert sequence_number(value) == number


@pytest.mark.parametrize(
    "value",
    [None, True, False, 0, -1, "0", "0000000000000000000", "", " 1", "1 ", "+1", "-1", "1.0",
     1.0, "1e3", "٣", "５", "0x10", 2**63, "9223372036854775808", "1" * 41, [1], {"n": 1}],
)
def test_sequence_refuses_anything_else(value: object) -> None:
    with pytest.raises(BadEvent):
        sequence_number(value)


def test_an_event_needs_an_id_a_type_and_a_subject() -> None:
    good = envelope("evt_1", "acct_1", 1)
    assert parse_event(good).subject == "acct_1"
    for name in ("id", "type", "subject"):
        for bad in (None, "", 7, "a\x00b"):
            with pytest.raises(BadEvent):
                parse_event({**good, name: bad})
    with pytest.raises(BadEvent):
        parse_event([good])


# --- signatures -----------------------------------------------------------------------------------


async def test_a_request_signed_with_any_configured_secret_is_accepted(
    pool: AsyncConnectionPool[Any], receiver_db: str
) -> None:
    rotating = Inbox(pool, [SECRET, OLD_SECRET], record_effect)
    # during the sender's overlap window: both signatures; after it: the new one only; a
    # receiver not yet moved to the new secret verifies the old signature
    assert await deliver(rotating, envelope("evt_1", "s", 1), [SECRET, OLD_SECRET]) == "applied"
    assert await deliver(rotating, envelope("evt_2", "s", 2), [SECRET]) == "applied"
    assert await deliver(rotating, envelope("evt_3", "s", 3), [OLD_SECRET]) == "applied"
    old_only = Inbox(pool, [OLD_SECRET], record_effect)
    assert await deliver(old_only, envelope("evt_4", "s", 4), [SECRET, OLD_SECRET]) == "applied"
    with pytest.raises(BadSignature):
        await deliver(old_only, envelope("evt_5", "s", 5), [SECRET])
    assert [e[0] for e in effects(receiver_db)] == ["evt_1", "evt_2", "evt_3", "evt_4"]


async def test_forged_tampered_stale_and_malformed_requests_are_refused(
    inbox: Inbox, receiver_db: str
) -> None:
    event = envelope("evt_1", "s", 1)
    body, headers = signed(event, [new_secret()])
    attempts: list[tuple[bytes, dict[str, str]]] = [(body, headers)]  # another secret
    body, headers = signed(event, [SECRET])
    attempts.append((body.replace(b'"n": 1', b'"n": 2'), headers))  # tampered body
    attempts.append(signed(event, [SECRET], timestamp=int(headers["webhook-timestamp"]) - 600))
    attempts.append((body, {**headers, "webhook-id": "evt_other"}))  # id not the signed one
    attempts.append((body, {k: v for k, v in headers.items() if k != "webhook-signature"}))
    attempts.append((body, {**headers, "webhook-signature": "v1"}))  # no comma
    attempts.append((body, {**headers, "webhook-signature": "v1,%%%not base64"}))
    attempts.append((body, {**headers, "webhook-timestamp": "soon"}))
    attempts.append((b"\xff\xfe" + body, headers))  # not UTF-8
    for raw, hdrs in attempts:
        with pytest.raises(BadSignature):
            await inbox.receive(raw, hdrs)
    assert effects(receiver_db) == []
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox") == 0


async def test_signed_bodies_that_are_not_orderable_events_are_bad_events(inbox: Inbox) -> None:
    for body in (b"not json", b"[]", json.dumps(envelope("evt_1", "", 1)).encode(),
                 json.dumps(envelope("evt_1", "s", "1.5")).encode()):
        with pytest.raises(BadEvent):
            await inbox.receive(*signed(body, [SECRET], webhook_id="evt_1"))
    # signed, but the webhook-id names another event than the body
    with pytest.raises(BadEvent):
        await inbox.receive(*signed(envelope("evt_1", "s", 1), [SECRET], webhook_id="evt_2"))


# --- exactly once, in order -----------------------------------------------------------------------


async def test_in_order_events_apply_once_and_a_duplicate_has_no_second_effect(
    inbox: Inbox, receiver_db: str
) -> None:
    assert await deliver(inbox, envelope("evt_a1", "acct_a", 1)) == "applied"
    assert await deliver(inbox, envelope("evt_b1", "acct_b", "0000000000000000001")) == "applied"
    assert await deliver(inbox, envelope("evt_a2", "acct_a", "0000000000000000002")) == "applied"
    assert await deliver(inbox, envelope("evt_a1", "acct_a", 1)) == "duplicate"
    assert await deliver(inbox, envelope("evt_a2", "acct_a", 2)) == "duplicate"
    assert effects(receiver_db) == [
        ("evt_a1", "acct_a", 1, False), ("evt_b1", "acct_b", 1, False),
        ("evt_a2", "acct_a", 2, False)]
    assert scalar(receiver_db, "SELECT last_sequence FROM receiver.subjects"
                               " WHERE subject = 'acct_a'") == 2
    statuses = scalar(receiver_db, "SELECT array_agg(DISTINCT status) FROM receiver.inbox")
    assert statuses == ["applied"]


async def test_a_failing_handler_leaves_no_trace_and_the_retry_applies(
    pool: AsyncConnectionPool[Any], receiver_db: str
) -> None:
    failures = [RuntimeError("the handler's database write failed")]

    async def flaky(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
        await record_effect(conn, event)  # written, then rolled back with everything else
        if failures:
            raise failures.pop()

    flaky_inbox = Inbox(pool, [SECRET], flaky)
    with pytest.raises(RuntimeError):
        await deliver(flaky_inbox, envelope("evt_1", "s", 1))
    assert effects(receiver_db) == []
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox") == 0
    assert scalar(receiver_db, "SELECT coalesce(max(last_sequence), 0) FROM receiver.subjects") \
        == 0
    assert await deliver(flaky_inbox, envelope("evt_1", "s", 1)) == "applied"
    assert [e[0] for e in effects(receiver_db)] == ["evt_1"]



async def test_when_the_inbox_row_cannot_be_written_the_handlers_effects_roll_back(
    inbox: Inbox, receiver_db: str
) -> None:
    with psycopg.connect(receiver_db, autocommit=True) as conn:
        conn.execute("""
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.webhook_id = 'evt_poison' THEN RAISE EXCEPTION 'inbox refused'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON receiver.inbox
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
        """)
    with pytest.raises(psycopg.errors.RaiseException):
        await deliver(inbox, envelope("evt_poison", "s", 1))
    assert effects(receiver_db) == []  # the handler ran, and its effect went with the inbox row
    assert scalar(receiver_db, "SELECT coalesce(max(last_sequence), 0) FROM receiver.subjects") \
        == 0
    assert await deliver(inbox, envelope("evt_1", "s", 1)) == "applied"
    assert [e[0] for e in effects(receiver_db)] == ["evt_1"]

async def test_concurrent_deliveries_of_one_event_apply_it_once(
    pool: AsyncConnectionPool[Any], receiver_db: str
) -> None:
    async def slow(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
        await record_effect(conn, event)
        await asyncio.sleep(0.2)  # the other deliveries arrive while this one is in the handler

    slow_inbox = Inbox(pool, [SECRET], slow)
    outcomes = await asyncio.gather(
        *(deliver(slow_inbox, envelope("evt_1", "s", 1)) for _ in range(8))
    )
    assert sorted(outcomes) == ["applied"] + ["duplicate"] * 7
    assert [e[0] for e in effects(receiver_db)] == ["evt_1"]


# --- gaps -----------------------------------------------------------------------------------------


async def test_an_event_ahead_of_a_gap_is_held_until_the_gap_is_delivered(
    inbox: Inbox, receiver_db: str
) -> None:
    assert await deliver(inbox, envelope("evt_1", "s", 1)) == "applied"
    assert await deliver(inbox, envelope("evt_4", "s", 4)) == "held"
    assert await deliver(inbox, envelope("evt_3", "s", 3)) == "held"
    assert await deliver(inbox, envelope("evt_4", "s", 4)) == "held"  # stored once
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox WHERE status = 'held'") == 2
    assert [e[0] for e in effects(receiver_db)] == ["evt_1"]
    # no events API: the held events wait for the missing one to arrive (a recovered dead letter)
    await inbox.catch_up.subject("s")
    assert [e[0] for e in effects(receiver_db)] == ["evt_1"]
    assert await deliver(inbox, envelope("evt_2", "s", 2)) == "applied"
    await inbox.catch_up.subject("s")
    assert [e[2] for e in effects(receiver_db)] == [1, 2, 3, 4]
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox WHERE status = 'held'") == 0
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox WHERE event IS NOT NULL") == 0
    assert await deliver(inbox, envelope("evt_3", "s", 3)) == "duplicate"
    assert len(effects(receiver_db)) == 4


async def test_the_running_inbox_catches_up_by_itself(
    inbox: Inbox, receiver_db: str
) -> None:
    async with inbox.running():
        assert await deliver(inbox, envelope("evt_2", "s", 2)) == "held"
        assert await deliver(inbox, envelope("evt_3", "s", 3)) == "held"
        assert await deliver(inbox, envelope("evt_1", "s", 1)) == "applied"
        for _ in range(500):
            if len(effects(receiver_db)) == 3:
                break
            await asyncio.sleep(0.01)
    assert [e[2] for e in effects(receiver_db)] == [1, 2, 3]


async def test_a_held_event_survives_a_restart_and_is_caught_up_by_the_next_process(
    receiver_db: str,
) -> None:
    async with AsyncConnectionPool(receiver_db, min_size=1, open=False) as first_pool:
        first = Inbox(first_pool, [SECRET], record_effect)
        assert await deliver(first, envelope("evt_1", "s", 1)) == "applied"
        assert await deliver(first, envelope("evt_3", "s", 3)) == "held"
        assert await deliver(first, envelope("evt_2", "s", 2)) == "applied"
        # the process dies before catching up
    async with AsyncConnectionPool(receiver_db, min_size=1, open=False) as second_pool:
        second = Inbox(second_pool, [SECRET], record_effect)
        await second.catch_up.pass_once()
    assert [e[2] for e in effects(receiver_db)] == [1, 2, 3]



async def test_a_subject_that_fails_to_catch_up_backs_off_and_holds_up_no_other(
    pool: AsyncConnectionPool[Any], receiver_db: str
) -> None:
    calls: list[str] = []

    async def refuses_a2(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
        calls.append(event.id)
        if event.id == "evt_a2":
            raise RuntimeError("cannot apply a2 yet")
        await record_effect(conn, event)

    picky = Inbox(pool, [SECRET], refuses_a2)
    for subject in ("a", "b"):
        assert await deliver(picky, envelope(f"evt_{subject}2", subject, 2)) == "held"
    for subject in ("a", "b"):
        assert await deliver(picky, envelope(f"evt_{subject}1", subject, 1)) == "applied"
    await picky.catch_up.pass_once()  # a2 raises: logged, "a" waits a second; b2 is applied
    await picky.catch_up.pass_once()  # "a" is still waiting: not tried again
    assert calls.count("evt_a2") == 1
    assert [e[0] for e in effects(receiver_db)] == ["evt_a1", "evt_b1", "evt_b2"]
    assert scalar(receiver_db, "SELECT subject FROM receiver.inbox WHERE status = 'held'") == "a"
