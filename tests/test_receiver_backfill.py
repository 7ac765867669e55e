"""Filling a gap from our own API: the receiver library reading `GET /v1/events?subject=` of a
live `payments-api` (uvicorn on a real socket) when an event arrives ahead of a gap, skipping
only what the API no longer has, and handing an event that turns up after its subject moved on
to the late handler (docs/receiver.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from psycopg_pool import AsyncConnectionPool

from ledger.merchants import NewKey
from outbox.signing import new_secret
from receiver import BackfillError, EventsApi, Inbox, sequence_number
from receiver.migrate import migrate
from tests.apihelpers import execute, live_server, new_merchant, query
from tests.receiverhelpers import (
    create_effects_table,
    effects,
    record_effect,
    record_late,
    scalar,
    signed,
)
from tests.support import free_port

SECRET = new_secret()
Json = dict[str, Any]


@pytest.fixture
def api_url(db_url: str) -> Iterator[str]:
    with live_server(db_url) as base:
        yield base


@pytest.fixture
def receiver_db(empty_db_url: str) -> str:
    migrate(empty_db_url)
    create_effects_table(empty_db_url)
    return empty_db_url


@pytest.fixture
async def pool(receiver_db: str) -> AsyncIterator[AsyncConnectionPool[Any]]:
    async with AsyncConnectionPool(receiver_db, min_size=1, max_size=4, open=False) as p:
        yield p


def account_history(api_url: str, key: str, deposits: int) -> list[Json]:
    """A new account and `deposits` deposits into it; its events in sequence order."""
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=api_url, headers=auth, timeout=30) as http:
        account = http.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
        for n in range(deposits):
            resp = http.post(
                "/v1/deposits", json={"account": account, "amount": n + 1, "currency": "USD"}
            )
            assert resp.status_code == 201, resp.text
        events: list[Json] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = http.get("/v1/events", params=params).json()
            events += [e for e in page["data"] if e["subject"] == account]
            if not page["has_more"]:
                break
            params["starting_after"] = page["data"][-1]["id"]
    events.sort(key=lambda e: sequence_number(e["sequence"]))
    assert [sequence_number(e["sequence"]) for e in events] == list(range(1, deposits + 2))
    return events


def inbox_for(pool: AsyncConnectionPool[Any], api_url: str, key: str) -> Inbox:
    return Inbox(pool, [SECRET], record_effect, late_handler=record_late,
                 events=EventsApi(api_url, key))


async def test_a_gap_is_filled_from_the_events_api_in_order(
    api_url: str, merchant: NewKey, pool: AsyncConnectionPool[Any], receiver_db: str
) -> None:
    events = account_history(api_url, merchant.api_key, deposits=150)  # two pages and more
    subject = events[0]["subject"]
    inbox = inbox_for(pool, api_url, merchant.api_key)
    try:
        assert await inbox.receive(*signed(events[0], [SECRET])) == "applied"
        assert await inbox.receive(*signed(events[-1], [SECRET])) == "held"
        assert await inbox.receive(*signed(events[-3], [SECRET])) == "held"
        await inbox.catch_up.subject(subject)
        assert [e[2] for e in effects(receiver_db)] == list(range(1, 152))
        assert [e[0] for e in effects(receiver_db)] == [e["id"] for e in events]
        via = dict(query(receiver_db, "SELECT sequence, via FROM receiver.inbox"))
        assert via[1] == via[149] == via[151] == "webhook"
        assert {via[n] for n in range(2, 149)} == {"backfill"} and via[150] == "backfill"
        # the relay's own delivery of a backfilled event, later: acknowledged, no second effect
        assert await inbox.receive(*signed(events[5], [SECRET])) == "duplicate"
        assert len(effects(receiver_db)) == 151
        assert scalar(receiver_db, "SELECT count(*) FROM receiver.skipped") == 0
    finally:
        await inbox.close()


async def test_another_merchants_key_fills_nothing_and_skips_nothing(
    api_url: str, db_url: str, merchant: NewKey, pool: AsyncConnectionPool[Any],
    receiver_db: str,
) -> None:
    events = account_history(api_url, merchant.api_key, deposits=2)
    subject = events[0]["subject"]
    stranger = new_merchant(db_url, "Someone else")
    right = inbox_for(pool, api_url, merchant.api_key)
    assert await right.receive(*signed(events[2], [SECRET])) == "held"
    for wrong in (inbox_for(pool, api_url, stranger.api_key),
                  inbox_for(pool, api_url, "sk_not_a_key"),
                  inbox_for(pool, f"http://127.0.0.1:{free_port()}", merchant.api_key)):
        try:
            with pytest.raises(BackfillError):
                await wrong.catch_up.subject(subject)
            await wrong.catch_up.pass_once()  # logs, backs off, raises nothing
        finally:
            await wrong.close()
    assert effects(receiver_db) == []
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.skipped") == 0
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox WHERE status = 'held'") == 1
    try:
        await right.catch_up.subject(subject)
    finally:
        await right.close()
    assert [e[2] for e in effects(receiver_db)] == [1, 2, 3]


async def test_purged_events_are_skipped_and_one_turning_up_later_is_late(
    api_url: str, db_url: str, merchant: NewKey, pool: AsyncConnectionPool[Any],
    receiver_db: str,
) -> None:
    events = account_history(api_url, merchant.api_key, deposits=4)
    subject = events[0]["subject"]
    # what retention does to an event without deliveries once it is old enough
    execute(db_url, "DELETE FROM outbox.events WHERE id = ANY(%s)",
            ([events[1]["id"], events[2]["id"]],))
    inbox = inbox_for(pool, api_url, merchant.api_key)
    try:
        assert await inbox.receive(*signed(events[0], [SECRET])) == "applied"
        assert await inbox.receive(*signed(events[4], [SECRET])) == "held"
        await inbox.catch_up.subject(subject)
        assert [(e[2], e[3]) for e in effects(receiver_db)] == [
            (1, False), (4, False), (5, False)]
        assert query(
            receiver_db, "SELECT subject, sequence FROM receiver.skipped ORDER BY sequence"
        ) == [(subject, 2), (subject, 3)]
        # sequence 2 turns up after all (a copy the sender still had): the late handler gets it
        assert await inbox.receive(*signed(events[1], [SECRET])) == "late"
        assert effects(receiver_db)[-1] == (events[1]["id"], subject, 2, True)
        assert query(receiver_db, "SELECT sequence FROM receiver.skipped") == [(3,)]
        assert scalar(receiver_db, "SELECT status FROM receiver.inbox WHERE webhook_id = %s",
                      (events[1]["id"],)) == "late"
        assert await inbox.receive(*signed(events[1], [SECRET])) == "duplicate"
        assert await inbox.receive(*signed(events[3], [SECRET])) == "duplicate"
        assert len(effects(receiver_db)) == 4
    finally:
        await inbox.close()


async def test_without_a_late_handler_a_late_event_is_recorded_not_applied(
    api_url: str, db_url: str, merchant: NewKey, pool: AsyncConnectionPool[Any],
    receiver_db: str,
) -> None:
    events = account_history(api_url, merchant.api_key, deposits=2)
    execute(db_url, "DELETE FROM outbox.events WHERE id = %s", (events[1]["id"],))
    inbox = Inbox(pool, [SECRET], record_effect, events=EventsApi(api_url, merchant.api_key))
    try:
        assert await inbox.receive(*signed(events[2], [SECRET])) == "held"
        await inbox.catch_up.subject(events[0]["subject"])
        assert await inbox.receive(*signed(events[1], [SECRET])) == "late"
    finally:
        await inbox.close()
    assert [(e[2], e[3]) for e in effects(receiver_db)] == [(1, False), (3, False)]
    kept = scalar(receiver_db, "SELECT event FROM receiver.inbox WHERE status = 'late'")
    assert kept == events[1]

