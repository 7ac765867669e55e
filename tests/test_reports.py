"""The `reports` handler consumer: daily totals, applied exactly once, in the relay's
transaction."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import AsyncConnection

from ledger.merchants import NewKey
from outbox.envelope import Event
from outbox.handlers import Handler, apply_reports
from relay.settings import Settings
from relay.worker import Relay
from tests.apihelpers import Api, assert_conserved, execute, query, start_api
from tests.relayhelpers import (
    RelayProcess,
    add_endpoint,
    delivery_counts,
    make_traffic,
    new_merchant,
    wait_until_delivered,
    webhook_expectations,
)
from tests.support.receiver import Receiver


def _event(type_: str, amount: int, currency: str = "USD", merchant: str = "mer_a",
           when: datetime | None = None) -> Event:
    when = when or datetime(2026, 11, 27, 23, 59, 59, tzinfo=UTC)
    return Event(f"evt_{type_}_{amount}", type_, "s", 1, when,
                 {"amount": amount, "currency": currency}, merchant)


async def test_apply_reports_aggregates_by_merchant_day_and_currency(
    aconn: AsyncConnection,
) -> None:
    next_day = datetime(2026, 11, 28, 0, 0, 1, tzinfo=UTC)
    events = [
        _event("payment.succeeded", 100),
        _event("payment.succeeded", 250),
        _event("payment.succeeded", 7, "EUR"),
        _event("payment.succeeded", 5, when=next_day),
        _event("refund.succeeded", 30),
        _event("deposit.succeeded", 1000),
        _event("payout.paid", 400),
        _event("payment.failed", 999),
        _event("account.balance_changed", 999),
        _event("payment.succeeded", 1, merchant="mer_b"),
    ]
    async with aconn.transaction():
        await apply_reports(aconn, events)
        await apply_reports(aconn, events[:1])
    cur = await aconn.execute(
        "SELECT merchant_id, day, currency, payments_count, payments_amount, refunds_amount,"
        " deposits_amount, payouts_amount FROM daily_reports ORDER BY 1, 2, 3"
    )
    assert await cur.fetchall() == [
        ("mer_a", date(2026, 11, 27), "EUR", 1, 7, 0, 0, 0),
        ("mer_a", date(2026, 11, 27), "USD", 3, 450, 30, 1000, 400),
        ("mer_a", date(2026, 11, 28), "USD", 1, 5, 0, 0, 0),
        ("mer_b", date(2026, 11, 27), "USD", 1, 1, 0, 0, 0),
    ]


async def _run_relay(
    db_url: str, handlers: Mapping[str, Handler]
) -> tuple[Relay, asyncio.Task[int]]:
    settings = Settings(
        database_url=db_url, retry_schedule=(0, 0.1, 0.1), purge_interval=timedelta(0),
        allowed_networks=(ipaddress.ip_network("127.0.0.0/8"),),
    )
    relay = Relay(settings, handlers=handlers)
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(relay.listener.connected.wait(), 30)
    return relay, task


async def test_relay_applies_each_event_once(db_url: str) -> None:
    merchant = new_merchant(db_url)
    relay, task = await _run_relay(db_url, {"reports": apply_reports})
    try:
        traffic = await make_traffic(db_url, [merchant], 60, clients=3)
        await wait_until_delivered(db_url)
    finally:
        relay.stop()
        assert await asyncio.wait_for(task, 60) == 0
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT sum(payments_count), sum(payments_amount), sum(deposits_amount)"
            " FROM daily_reports"
        ).fetchone()
    assert row == (len(traffic.payments), sum(traffic.payments.values()), 6 * 10_000_000)


async def test_a_failing_event_is_isolated_retried_and_dead_lettered(db_url: str) -> None:
    merchant = new_merchant(db_url)
    calls: list[int] = []

    async def picky(conn: AsyncConnection, events: Sequence[Event]) -> None:
        calls.append(len(events))
        if any(e.type == "deposit.succeeded" for e in events):
            raise ValueError("cannot handle deposits")
        await apply_reports(conn, events)

    relay, task = await _run_relay(db_url, {"reports": picky})
    try:
        traffic = await make_traffic(db_url, [merchant], 10, clients=1)
        await wait_until_delivered(db_url)
    finally:
        relay.stop()
        assert await asyncio.wait_for(task, 60) == 0
    with psycopg.connect(db_url) as conn:
        statuses = conn.execute(
            "SELECT e.type, d.status, d.attempts, d.last_error IS NOT NULL"
            " FROM outbox.deliveries d JOIN outbox.events e ON e.id = d.event_id"
            " WHERE d.consumer = 'reports' GROUP BY 1, 2, 3, 4 ORDER BY 1"
        ).fetchall()
        total = conn.execute("SELECT sum(payments_amount) FROM daily_reports").fetchone()
    assert statuses == [
        ("deposit.succeeded", "dead", 3, True),
        ("payment.succeeded", "delivered", 1, False),
    ]
    assert total == (sum(traffic.payments.values()),)


async def test_a_stuck_handler_batch_holds_up_no_webhook_delivery(
    db_url: str, receiver: Receiver
) -> None:
    """The handler consumers' batch runs beside the claim loop: while one is stuck, webhooks
    are still claimed and delivered; once it moves, every event is applied once."""
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant)
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def stuck(conn: AsyncConnection, events: Sequence[Event]) -> None:
        entered.set()
        await gate.wait()
        await apply_reports(conn, events)

    relay, task = await _run_relay(db_url, {"reports": stuck})
    try:
        traffic = await make_traffic(db_url, [merchant], 20, clients=2)
        await asyncio.wait_for(entered.wait(), 30)
        expected = webhook_expectations(db_url)[endpoint.id]
        # Every webhook while the handler batch is still held open.
        await wait_until_delivered(db_url, within=60, consumer=endpoint.id)
        assert delivery_counts(db_url, endpoint.id) == {"delivered": len(expected)}
        assert not gate.is_set()  # all of them while the handler batch was still waiting
        gate.set()
        await wait_until_delivered(db_url)
    finally:
        gate.set()
        relay.stop()
        assert await asyncio.wait_for(task, 60) == 0
    receipts = receiver.receipts(endpoint.path)
    assert all(r.verified for r in receipts)
    assert {r.webhook_id for r in receipts} == expected
    with psycopg.connect(db_url) as conn:
        total = conn.execute("SELECT sum(payments_amount) FROM daily_reports").fetchone()
    assert total == (sum(traffic.payments.values()),)


async def test_totals_stay_exact_past_64_bits(
    db_url: str, merchant: NewKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A day's totals are exact for any sum of accepted amounts. With `bigint` totals, 9,224
    payments of 10^15 in one currency and day overflowed: the reports delivery died, and so did
    every later money event of that merchant and day. Here the day already holds what just under
    9,224 such payments add up to, and three more arrive through the relay; then the total is
    pushed past 2^64, where JSON integers still come out exact."""
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    big = 10**15
    with start_api(db_url, merchant) as api:
        source = api.account()["id"]
        for _ in range(3):
            api.deposit(source, big)
        destination = api.account()["id"]
        paid = [api.payment(source, destination, big) for _ in range(3)]
        [(day,)] = query(db_url, "SELECT (time AT TIME ZONE 'UTC')::date FROM outbox.events"
                                 " WHERE subject = %s", (paid[0]["id"],))
        # The day so far: 9,222 payments of 10^15, and a little more (2^63 - 10^15).
        before = 2**63 - big
        execute(db_url, "INSERT INTO daily_reports (merchant_id, day, currency, payments_count,"
                        " payments_amount) VALUES (%s, %s, 'USD', 9222, %s)",
                (merchant.merchant_id, day, before))

        relay = RelayProcess(db_url, tmp_path).start()
        try:
            relay.wait_ready()
            await wait_until_delivered(db_url, consumer="reports")
        finally:
            assert relay.stop() == 0
        assert delivery_counts(db_url, "reports") == {"delivered": 3 + 3}  # none dead

        expected = {"payments_count": 9222 + 3, "payments_amount": before + 3 * big,
                    "refunds_amount": 0, "deposits_amount": 3 * big, "payouts_amount": 0}
        assert expected["payments_amount"] > 2**63 - 1
        assert _report(api, day) == expected

        execute(db_url, "UPDATE daily_reports SET payments_amount = payments_amount + 2^64::numeric"
                        " WHERE merchant_id = %s", (merchant.merchant_id,))
        expected["payments_amount"] += 2**64
        assert _report(api, day) == expected
    assert_conserved(db_url)


def _report(api: Api, day: date) -> dict[str, int]:
    """The day's USD totals, parsed so that every number stays exact (and must be an integer)."""
    resp = api.get("/v1/reports/daily", {"day": day.isoformat()})
    assert resp.status_code == 200, resp.text

    def no_floats(text: str) -> None:
        raise AssertionError(f"a number that is not an integer: {text}")

    body = json.loads(resp.text, parse_float=no_floats)
    totals: dict[str, int] = body["currencies"]["USD"]
    assert all(type(v) is int for v in totals.values()), totals
    return totals
