"""Relay faults (issue 6, item 3), with real `outbox-relay` processes and a verifying receiver.

- The connection between a relay and its database is cut (tests/support/tcpproxy.py: every
  connection reset, new ones held) for longer than OUTBOX_LEASE_SECONDS while payments keep being
  committed: the cut-off relay's leases expire, a second relay connected directly takes its
  deliveries over and delivers everything while the first is still cut off; the `reports`
  handler applies every event exactly once (daily_reports equals the succeeded payments); no
  webhook is lost; when the link comes back the first relay's late results are refused (its
  lease is gone) and it carries on.
- Receivers that hang past OUTBOX_HTTP_TIMEOUT, reset the connection, answer 429 with
  Retry-After, 500, 410 and 3xx, all at once beside a healthy endpoint: each gets the contract's
  behaviour (docs/api.md, Webhooks) and the healthy endpoint gets every event once, first time.
  Each behaviour alone is in tests/test_relay_delivery.py; docs/reliability.md lists both.
- An endpoint disabled (by a 410) while an event for it is being committed: that event's
  delivery must be parked like the others, not left pending and due behind a disabled consumer
  (a known defect: this test fails until publishing and disabling are serialised).
- The PostgreSQL server crashes and restarts while clients post payments through `payments-api`
  and two `outbox-relay` processes deliver: the relays survive, resume, and deliver every event
  of every payment that got a 201; the reports count each payment once.

The first and the last run on private clusters (tests/support/pgcluster.py). Every wait is
generous and nothing asserts how fast anything happened (only lower bounds that load cannot
break).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from outbox.signing import new_secret
from tests.relayhelpers import (
    RelayProcess,
    add_endpoint,
    check_complete_and_ordered,
    check_same_bytes_on_redelivery,
    make_traffic,
    new_merchant,
    wait_until_delivered,
    webhook_expectations,
)
from tests.support.pgcluster import PgCluster
from tests.support.receiver import Receiver, Reply
from tests.support.tcpproxy import TcpProxy
from tests.test_api_faults import THREADS, Load, Outcome
from tests.test_request_limits import _console_script, serve_api

GONE_REASON = "the endpoint answered 410 Gone"

Spawn = Callable[..., RelayProcess]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """`spawn(db_url, **kwargs)` starts a RelayProcess; all are killed after the test."""
    started: list[RelayProcess] = []

    def make(db_url: str, **kwargs: Any) -> RelayProcess:
        relay = RelayProcess(db_url, tmp_path, name=f"relay{len(started)}", **kwargs)
        started.append(relay)
        return relay.start()

    yield make
    for relay in started:
        relay.close()


def rows(db_url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def assert_reports_exactly_once(db_url: str) -> None:
    """The `reports` consumer applied every event once: its totals are the tables' sums, and it
    has no delivery left pending or dead."""
    totals = rows(
        db_url,
        "SELECT coalesce(sum(payments_count), 0), coalesce(sum(payments_amount), 0),"
        " coalesce(sum(deposits_amount), 0) FROM daily_reports",
    )[0]
    payments = rows(
        db_url,
        "SELECT count(*), coalesce(sum(amount), 0) FROM payments WHERE status = 'succeeded'",
    )[0]
    deposits = rows(db_url, "SELECT coalesce(sum(amount), 0) FROM deposits")[0]
    assert totals == (*payments, *deposits), f"reports {totals}, tables {payments} {deposits}"
    left = rows(
        db_url,
        "SELECT status, count(*) FROM outbox.deliveries WHERE consumer = 'reports'"
        " AND status <> 'delivered' GROUP BY status",
    )
    assert left == [], left


async def wait_for(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {within} s waiting for {what}"
        await asyncio.sleep(0.05)


# --- (a) the relay's database connection is cut -------------------------------------------------

CUT_ENV = {
    "OUTBOX_LEASE_SECONDS": "9",
    "OUTBOX_HTTP_TIMEOUT": "3.5",
    "OUTBOX_RETRY_SCHEDULE": "0,0.2,0.5,1,1,1,1,1",
}
# The receiver's delay on the first requests after the warm-up: long enough that the relay is
# still waiting for the answer when the link is cut, below the HTTP timeout so the answer is a
# success it can no longer record.
HELD_REPLY = 3.0


async def test_cut_off_relay_loses_its_leases_to_another_and_effects_stay_exactly_once(
    pg_cluster: PgCluster,
    receiver: Receiver,
    spawn: Spawn,
    make_proxy: Callable[[str], TcpProxy],
) -> None:
    db_url = pg_cluster.migrate()
    merchants = [new_merchant(db_url, "cut a"), new_merchant(db_url, "cut b")]
    endpoints = [
        add_endpoint(db_url, receiver, merchants[0]),
        add_endpoint(db_url, receiver, merchants[0], ["payment.*"]),
        add_endpoint(db_url, receiver, merchants[1]),
    ]
    proxy = make_proxy(db_url)
    cut_off = spawn(proxy.url_for(db_url), env=CUT_ENV).wait_ready()
    assert cut_off.proc is not None
    cut_off_name = f"{socket.gethostname()}:{cut_off.proc.pid}"
    await make_traffic(db_url, merchants, 20, clients=2, seed=1)
    await wait_until_delivered(db_url)

    # The next requests are held at the receiver, so the relay has attempts in flight (and
    # leases) when its link goes.
    for endpoint in endpoints:
        receiver.respond(endpoint.path, *[Reply(204, delay=HELD_REPLY)] * 4)
    traffic = asyncio.create_task(make_traffic(db_url, merchants, 60, clients=4, seed=2))
    await receiver.wait_for_async(1, where=lambda r: r.reply.delay > 0, timeout=60)
    proxy.block("hang")  # reconnections hang: the relay cannot reach the database at all
    assert proxy.cut() >= 2  # its pool and its LISTEN connection
    cut_at = time.monotonic()
    stranded = rows(
        db_url,
        "SELECT consumer, event_id FROM outbox.deliveries"
        " WHERE leased_by = %s AND status = 'pending'",
        (cut_off_name,),
    )
    assert stranded, "the cut-off relay held no lease"

    takeover = spawn(db_url, env=CUT_ENV).wait_ready()
    await traffic
    await make_traffic(db_url, merchants, 20, clients=2, seed=3)  # committed during the cut
    # Everything is delivered while the first relay is still cut off: the second one took over
    # its deliveries once their leases ran out.
    await wait_until_delivered(db_url, within=120)
    assert time.monotonic() - cut_at >= float(CUT_ENV["OUTBOX_LEASE_SECONDS"])
    assert cut_off.proc.poll() is None, cut_off.log()
    done = rows(
        db_url,
        "SELECT count(*) FROM outbox.deliveries WHERE (consumer, event_id) IN"
        " (SELECT * FROM unnest(%s::text[], %s::text[])) AND status = 'delivered'",
        ([c for c, _ in stranded], [e for _, e in stranded]),
    )[0][0]
    assert done == len(stranded)
    assert_reports_exactly_once(db_url)

    # The link comes back: the first relay's results of the attempts it made before the cut
    # arrive too late; they are logged as attempts but change no delivery.
    proxy.unblock()
    await wait_for(lambda: "lease lost before completion" in cut_off.log(), 90,
                   "the cut-off relay to write its stale results")
    await make_traffic(db_url, merchants, 10, clients=2, seed=4)
    await wait_until_delivered(db_url, within=120)
    assert cut_off.stop() == 0, cut_off.log()
    assert takeover.stop() == 0, takeover.log()
    assert "database unavailable" in cut_off.log()

    expected = webhook_expectations(db_url)
    duplicates = check_complete_and_ordered(receiver, endpoints, expected, slow_ok=HELD_REPLY)
    stranded_ids = {e for _, e in stranded}
    resent = {
        r.webhook_id
        for endpoint in endpoints
        for r in receiver.receipts(endpoint.path)
        if r.attempt > 1
    }
    assert resent & stranded_ids, "no stranded delivery was sent again by the other relay"
    for endpoint in endpoints:
        check_same_bytes_on_redelivery(receiver.receipts(endpoint.path))
    assert_reports_exactly_once(db_url)
    undelivered = rows(
        db_url, "SELECT count(*) FROM outbox.deliveries WHERE status <> 'delivered'"
    )[0][0]
    assert undelivered == 0
    print(f"\n{len(stranded)} leases stranded by the cut, {duplicates} duplicate requests")


# --- (b) misbehaving receivers beside a healthy one ---------------------------------------------

RECEIVER_ENV = {
    "OUTBOX_HTTP_TIMEOUT": "2",
    "OUTBOX_LEASE_SECONDS": "10",
    "OUTBOX_RETRY_SCHEDULE": "0,0.5,1",  # three attempts
}
REDIRECTS = (301, 302, 303, 307, 308)
THROTTLE = 3


def _deliveries(db_url: str, consumer: str) -> list[tuple[Any, ...]]:
    return rows(
        db_url,
        "SELECT event_id, status, attempts, last_status_code, last_error,"
        " isfinite(next_attempt_at) FROM outbox.deliveries WHERE consumer = %s ORDER BY event_id",
        (consumer,),
    )


def _attempt_log(db_url: str, consumer: str) -> list[tuple[Any, ...]]:
    return rows(
        db_url,
        "SELECT event_id, status_code, error FROM outbox.attempts WHERE consumer = %s"
        " ORDER BY id",
        (consumer,),
    )


async def _settled(db_url: str, within: float = 90.0) -> None:
    """Until nothing is due any more: delivered, dead, or parked behind a disabled endpoint."""

    def done() -> bool:
        return not rows(
            db_url,
            "SELECT 1 FROM outbox.deliveries WHERE status = 'pending'"
            " AND next_attempt_at < 'infinity' LIMIT 1",
        )

    try:
        await wait_for(done, within, "every delivery to settle")
    except AssertionError as exc:
        due = rows(
            db_url,
            "SELECT consumer, event_id, attempts, next_attempt_at - now(), lease_token IS NOT NULL,"
            " last_status_code, last_error FROM outbox.deliveries WHERE status = 'pending'"
            " AND next_attempt_at < 'infinity'",
        )
        raise AssertionError(f"{exc}: still due {due}") from None


async def test_misbehaving_receivers_get_the_contract_and_a_healthy_one_is_unaffected(
    db_url: str, receiver: Receiver, spawn: Spawn
) -> None:
    merchant = new_merchant(db_url)
    healthy = add_endpoint(db_url, receiver, merchant)  # every event, chains included
    kinds = ("hang", "reset", "error", "redirect", "throttled", "gone")
    bad = {kind: add_endpoint(db_url, receiver, merchant, ["payment.succeeded"]) for kind in kinds}
    target = receiver.add_endpoint("/redirect-target", new_secret())
    receiver.set_default(bad["hang"].path, Reply(204, delay=30))  # far past the timeout
    receiver.set_default(bad["reset"].path, Reply(reset=True))
    receiver.set_default(bad["error"].path, 500)
    receiver.respond(bad["redirect"].path, *[Reply.redirect(target, s) for s in REDIRECTS])
    receiver.set_default(bad["redirect"].path, Reply.redirect(target, 308))
    receiver.respond(bad["throttled"].path, Reply(429, retry_after=THROTTLE))
    receiver.set_default(bad["gone"].path, 410)

    # The events are committed first, so every endpoint's first attempts go out together (and no
    # event is published while the 410 disables its endpoint: see the next test).
    await make_traffic(db_url, [merchant], 4, clients=1)
    relay = spawn(db_url, env=RECEIVER_ENV)
    relay.wait_ready()
    await _settled(db_url)
    assert relay.stop() == 0, relay.log()
    expected = webhook_expectations(db_url)
    payments = expected[bad["error"].id]
    assert len(payments) == 4

    # The healthy endpoint: every event, once, first time, in order, while the others failed.
    assert check_complete_and_ordered(receiver, [healthy], expected) == 0
    assert len(receiver.receipts(healthy.path)) == len(expected[healthy.id]) > 4
    assert {(s, a) for _, s, a, *_ in _deliveries(db_url, healthy.id)} == {("delivered", 1)}

    # Hangs past the timeout and resets: failed attempts without a status code, the same
    # request sent again on the schedule, dead when it runs out.
    for kind, error in (("hang", "timed out after 2 s"), ("reset", None)):
        endpoint = bad[kind]
        for event, status, attempts, code, last_error, _ in _deliveries(db_url, endpoint.id):
            assert (status, attempts, code) == ("dead", 3, None), (kind, event)
            assert last_error and (error is None or last_error == error), (kind, last_error)
        log = _attempt_log(db_url, endpoint.id)
        assert len(log) == 12 and all(code is None and err for _, code, err in log), log
        arrivals = Counter(receiver.ids(endpoint.path))
        assert arrivals == dict.fromkeys(payments, 3), (kind, arrivals)
        check_same_bytes_on_redelivery(receiver.receipts(endpoint.path))

    # 500: a failure with its status; dead after the schedule.
    assert {d[1:5] for d in _deliveries(db_url, bad["error"].id)} == {
        ("dead", 3, 500, "HTTP 500")
    }

    # 3xx of every kind: a failure, never followed.
    redirected = _deliveries(db_url, bad["redirect"].id)
    assert {(d[1], d[2]) for d in redirected} == {("dead", 3)}
    assert all(d[3] in REDIRECTS and "not followed" in d[4] for d in redirected), redirected
    assert {code for _, code, _ in _attempt_log(db_url, bad["redirect"].id)} == set(REDIRECTS)
    assert receiver.receipts("/redirect-target") == [], "a redirect was followed"

    # 429 with Retry-After: the wait it asks for instead of the schedule's 0.5 s; it counts as
    # an attempt; then delivered.
    throttled = bad["throttled"]
    states = _deliveries(db_url, throttled.id)
    assert {d[1] for d in states} == {"delivered"}
    assert sorted(d[2] for d in states) == [1, 1, 1, 2]
    first_429 = receiver.receipts(throttled.path)[0]
    assert first_429.reply.status == 429
    again = [r for r in receiver.receipts(throttled.path)
             if r.webhook_id == first_429.webhook_id and r.attempt == 2]
    assert again and again[0].arrived_at - first_429.arrived_at >= THROTTLE - 0.1
    assert check_complete_and_ordered(receiver, [throttled], expected) == 1

    # 410: the endpoint is disabled and its deliveries parked (pending, no next attempt).
    gone = bad["gone"]
    assert rows(db_url, "SELECT status, disabled_reason LIKE '%%410%%' FROM webhook_endpoints"
                        " WHERE id = %s", (gone.id,)) == [("disabled", True)]
    assert rows(db_url, "SELECT enabled FROM outbox.consumers WHERE name = %s",
                (gone.id,)) == [(False,)]
    parked = _deliveries(db_url, gone.id)
    assert len(parked) == 4
    assert all(d[1] == "pending" and d[2] <= 1 and d[5] is False for d in parked), parked
    assert any(d[3] == 410 for d in parked), parked


async def test_an_event_committed_while_its_endpoint_is_disabled_is_parked_too(
    db_url: str, receiver: Receiver
) -> None:
    """A 410 (or the API, or the CLI) disables an endpoint while a payment is being committed.
    The publisher read the consumer as enabled and fans the event out to it. Disabling waits for
    that publisher to commit (it holds the merchant's consumers lock shared), then parks its
    delivery with the others: never pending and due behind a disabled consumer."""
    from ledger import service
    from outbox.consumers import disable_consumer

    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant)
    async with await psycopg.AsyncConnection.connect(db_url) as publisher, \
            await psycopg.AsyncConnection.connect(db_url) as operator:
        async with publisher.transaction():
            await service.create_account(publisher, service.Merchant(merchant), "USD", {})

            async def disable() -> bool:
                async with operator.transaction():
                    return await disable_consumer(operator, endpoint.id, GONE_REASON)

            # The disabling transaction waits for the publisher in flight (an advisory lock the
            # publisher holds shared until commit) instead of missing its delivery.
            task = asyncio.create_task(disable())
            operator_pid = operator.info.backend_pid
            for _ in range(400):
                waiting = rows(
                    db_url,
                    "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
                    (operator_pid,),
                )
                if waiting:
                    break
                await asyncio.sleep(0.025)
            assert waiting, "disabling did not wait for the publisher in flight"
            assert not task.done()
        assert await asyncio.wait_for(task, 30)
    state = rows(
        db_url,
        "SELECT d.status, isfinite(d.next_attempt_at), k.enabled FROM outbox.deliveries d"
        " JOIN outbox.consumers k ON k.name = d.consumer WHERE d.consumer = %s",
        (endpoint.id,),
    )
    # Not fanned out at all, or fanned out and parked: either is consistent.
    assert state in ([], [("pending", False, False)]), (
        f"a delivery of the disabled endpoint is pending and due, not parked: {state}"
    )


# --- (c) the server restarts under payment load through the API ---------------------------------

PACE = 0.03  # seconds between one client's payments: a few hundred payments in all


class PacedLoad(Load):
    def pay(self, client: httpx.Client, key: str) -> Outcome:
        outcome = super().pay(client, key)
        if not self.stop.is_set():
            time.sleep(PACE)
        return outcome


@pytest.fixture
def durable_cluster() -> Iterator[PgCluster]:
    """synchronous_commit on, so that a crash of the server keeps every commit it acknowledged
    (as in tests/test_api_faults.py): every 201 is then a payment whose events must arrive."""
    with PgCluster(settings={"synchronous_commit": "on"}) as cluster:
        yield cluster


async def test_relays_resume_after_a_server_crash_under_api_load_and_lose_no_201(
    durable_cluster: PgCluster, receiver: Receiver, spawn: Spawn
) -> None:
    cluster = durable_cluster
    db_url = cluster.migrate()
    from ledger.merchants import create_merchant

    with psycopg.connect(db_url) as conn:
        merchant = create_merchant(conn, "Restart merchant")
    endpoint = add_endpoint(db_url, receiver, merchant.merchant_id, ["payment.*"])
    # Every event, so the two accounts' long balance chains must stay in order across the crash.
    everything = add_endpoint(db_url, receiver, merchant.merchant_id)
    relay_cmd = [_console_script("outbox-relay")]
    relays = [spawn(db_url, command=relay_cmd).wait_ready() for _ in range(2)]

    with serve_api(db_url) as api:
        auth = {"Authorization": f"Bearer {merchant.api_key}"}
        async with httpx.AsyncClient(base_url=api.url, headers=auth, timeout=10) as client:
            accounts = [
                (await client.post("/v1/accounts", json={"currency": "USD"})).json()["id"]
                for _ in range(2)
            ]
            source, destination = accounts
            funded = await client.post("/v1/deposits", json={"account": source, "amount": 10**12,
                                                             "currency": "USD"})
            assert funded.status_code == 201, funded.text
        load = PacedLoad(api, merchant.api_key, source, destination)
        load.start()
        try:
            await asyncio.to_thread(load.wait_for, 201, 100, 0.0, 90)
            await asyncio.to_thread(cluster.stop, "immediate")  # a crash
            stopped = time.monotonic()
            await asyncio.to_thread(load.wait_for, 503, THREADS, stopped, 60)
            await asyncio.sleep(2)
            for relay in relays:
                assert relay.proc is not None and relay.proc.poll() is None, relay.log()
            await asyncio.to_thread(cluster.start)
            restarted = time.monotonic()
            await asyncio.to_thread(load.wait_for, 201, 100, restarted, 90)
        finally:
            await asyncio.to_thread(load.finish)

    outcomes = list(load.outcomes)
    paid = {o.body["id"] for o in outcomes if o.status == 201}
    after_restart = {o.body["id"] for o in outcomes if o.status == 201 and o.at >= restarted}
    assert len(paid) == load.count(201) and after_restart
    assert load.count(503) > 0, "the crash was never noticed"
    await wait_until_delivered(db_url, within=120)
    for relay in relays:
        assert relay.stop() == 0, relay.log()
    assert any("database unavailable" in relay.log() for relay in relays)

    # Every payment that got a 201 reached the endpoint (and whatever else was committed: a
    # request cut off by the crash may have committed without an answer).
    expected = webhook_expectations(db_url)
    check_complete_and_ordered(receiver, [endpoint, everything], expected)
    delivered_payments: dict[str, set[str]] = defaultdict(set)
    for r in receiver.accepted(endpoint.path):
        delivered_payments[r.body["type"]].add(r.body["data"]["id"])
    missing = paid - delivered_payments["payment.succeeded"]
    assert not missing, f"{len(missing)} payments answered 201 never reached the endpoint"
    stored = {r[0] for r in rows(db_url, "SELECT id FROM payments")}
    assert paid <= stored
    assert_reports_exactly_once(db_url)
    print(f"\n{len(paid)} x 201 ({len(after_restart)} after the restart), "
          f"{load.count(503)} x 503, {len(stored)} payments stored")
