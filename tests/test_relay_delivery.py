"""The relay daemon end to end: real `outbox-relay` subprocesses, real signals, a real receiver
that verifies every Standard Webhooks signature."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from tests.relayhelpers import (
    RelayProcess,
    add_endpoint,
    check_complete_and_ordered,
    check_same_bytes_on_redelivery,
    delivery_counts,
    make_traffic,
    new_merchant,
    wait_until_delivered,
    webhook_expectations,
)
from tests.support.receiver import Receiver, Reply

MakeRelay = Callable[..., RelayProcess]


@pytest.fixture
def make_relay(db_url: str, tmp_path: Path) -> Iterator[MakeRelay]:
    started: list[RelayProcess] = []

    def make(**kwargs: object) -> RelayProcess:
        relay = RelayProcess(db_url, tmp_path, name=f"relay{len(started)}", **kwargs)  # type: ignore[arg-type]
        started.append(relay)
        return relay.start()

    yield make
    for relay in started:
        relay.close()


@pytest.mark.parametrize("relays", [1, 3])
async def test_relays_deliver_everything_signed_and_in_order(
    db_url: str, receiver: Receiver, make_relay: MakeRelay, relays: int
) -> None:
    merchants = [new_merchant(db_url, f"m{i}") for i in range(2)]
    endpoints = [
        add_endpoint(db_url, receiver, merchants[0]),
        add_endpoint(db_url, receiver, merchants[0]),
        add_endpoint(db_url, receiver, merchants[1]),
    ]
    procs = [make_relay().wait_ready() for _ in range(relays)]
    await make_traffic(db_url, merchants, 120, clients=4)
    await wait_until_delivered(db_url)
    for proc in procs:
        assert proc.stop() == 0, proc.log()

    expected = webhook_expectations(db_url)
    assert sum(len(v) for v in expected.values()) > 300
    duplicates = check_complete_and_ordered(receiver, endpoints, expected)
    assert duplicates == 0  # nobody was killed
    assert delivery_counts(db_url) == {"delivered": sum(len(v) for v in expected.values())
                                       + _handler_deliveries(db_url)}
    for endpoint in endpoints:
        receipt = receiver.receipts(endpoint.path)[0]
        assert receipt.content_type == "application/cloudevents+json"
        assert receipt.body["specversion"] == "1.0"


def _handler_deliveries(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox.deliveries WHERE consumer = 'reports'"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_event_type_filter_and_merchant_scoping(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    mine, theirs = new_merchant(db_url, "mine"), new_merchant(db_url, "theirs")
    payments_only = add_endpoint(db_url, receiver, mine, ["payment.*"])
    exact = add_endpoint(db_url, receiver, mine, ["deposit.succeeded"])
    other = add_endpoint(db_url, receiver, theirs, ["*"])
    make_relay().wait_ready()
    await make_traffic(db_url, [mine], 10, clients=1)
    await make_traffic(db_url, [theirs], 4, clients=1, seed=2)
    await wait_until_delivered(db_url)

    expected = webhook_expectations(db_url)
    check_complete_and_ordered(receiver, [payments_only, exact, other], expected)
    assert {r.body["type"] for r in receiver.accepted(payments_only.path)} == {
        "payment.succeeded"
    }
    assert len(receiver.accepted(payments_only.path)) == 10
    assert {r.body["type"] for r in receiver.accepted(exact.path)} == {"deposit.succeeded"}
    with psycopg.connect(db_url) as conn:
        owners = dict(conn.execute("SELECT id, merchant_id FROM outbox.events").fetchall())
    assert {owners[r.webhook_id] for r in receiver.accepted(other.path)} == {theirs}
    assert {owners[r.webhook_id] for r in receiver.accepted(payments_only.path)} == {mine}


async def test_retry_then_success_keeps_id_and_body(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.respond(endpoint.path, 500, Reply(reset=True))
    make_relay().wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    receipts = await receiver.wait_for_async(3, path=endpoint.path, timeout=30)
    await wait_until_delivered(db_url)

    assert [r.attempt for r in receipts] == [1, 2, 3]
    assert len({r.webhook_id for r in receipts}) == 1
    check_same_bytes_on_redelivery(receipts)
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT status, attempts, last_status_code FROM outbox.deliveries WHERE consumer = %s",
            (endpoint.id,),
        ).fetchone()
        log = conn.execute(
            "SELECT status_code, error IS NOT NULL FROM outbox.attempts WHERE consumer = %s"
            " ORDER BY id",
            (endpoint.id,),
        ).fetchall()
    assert row == ("delivered", 3, 204)
    assert log == [(500, True), (None, True), (204, False)]


async def test_dead_letter_then_recover(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.set_default(endpoint.path, 500)
    make_relay().wait_ready()
    await make_traffic(db_url, [merchant], 2, clients=1)
    await wait_until_delivered(db_url)
    with psycopg.connect(db_url) as conn:
        dead = conn.execute(
            "SELECT attempts, last_status_code, dead_since IS NOT NULL FROM outbox.deliveries"
            " WHERE consumer = %s",
            (endpoint.id,),
        ).fetchall()
    assert dead == [(3, 500, True)] * 2  # three entries in the schedule: three attempts
    assert len(receiver.receipts(endpoint.path)) == 6

    receiver.set_default(endpoint.path, 204)
    from outbox.redrive import redrive

    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as aconn:
        assert (await redrive(aconn, endpoint.id)).requeued == 2
        await aconn.execute("NOTIFY outbox_wakeup")
    await wait_until_delivered(db_url)
    assert len(receiver.accepted(endpoint.path)) == 2
    assert delivery_counts(db_url).get("dead") is None


async def test_retry_after_is_honoured(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.respond(endpoint.path, Reply(429, retry_after=2), Reply(503, retry_after=1))
    make_relay().wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    receipts = await receiver.wait_for_async(3, path=endpoint.path, timeout=30)
    # The schedule says 0.2 s and 0.4 s; Retry-After says 2 s and 1 s.
    assert receipts[1].arrived_at - receipts[0].arrived_at >= 1.9
    assert receipts[2].arrived_at - receipts[1].arrived_at >= 0.9
    await wait_until_delivered(db_url)


async def test_a_2xx_is_a_delivery_whatever_its_headers_say(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    """Retry-After means something only on 429 and 503, and there only ASCII digits or an
    HTTP-date; nothing a receiver puts in its headers may turn an answer into an error."""
    merchant = new_merchant(db_url)
    ok = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    busy = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    odd = ["①", "²", "１２", "9" * 400, "-1", "soon", "Fri, 31 Feb 2026 12:00:30 GMT"]
    receiver.respond(
        ok.path,
        *[Reply(200, retry_after=value) for value in odd],
        Reply(200, headers={"Content-Encoding": "gzip"}, body=b"not gzip at all"),
    )
    # A 503 whose Retry-After is no number: the schedule's wait (0.2 s), not an error.
    receiver.respond(busy.path, Reply(503, retry_after="①"))
    events = len(odd) + 1
    relay = make_relay().wait_ready()
    await make_traffic(db_url, [merchant], events, clients=1)
    await wait_until_delivered(db_url)

    with psycopg.connect(db_url) as conn:
        first_time = conn.execute(
            "SELECT attempts, last_status_code, last_error FROM outbox.deliveries"
            " WHERE consumer = %s",
            (ok.id,),
        ).fetchall()
        busy_log = conn.execute(
            "SELECT status_code, error FROM outbox.attempts WHERE consumer = %s ORDER BY id",
            (busy.id,),
        ).fetchall()
    assert first_time == [(1, 200, None)] * events
    assert len(receiver.receipts(ok.path)) == events
    assert busy_log == [(503, "HTTP 503")] + [(204, None)] * events
    assert "sender failed" not in relay.log()


async def test_requests_ask_for_no_compression(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    """The relay reads answers raw and never decompresses them, so it does not ask for gzip."""
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    make_relay().wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    [receipt] = await receiver.wait_for_async(1, path=endpoint.path, timeout=30)
    assert receipt.headers.get("accept-encoding") == "identity"


async def test_an_interim_answer_without_a_final_one_is_recorded_as_such(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.respond(endpoint.path, Reply(204, informational=102, delay=30), Reply(204, delay=30))
    make_relay(env={"OUTBOX_HTTP_TIMEOUT": "2", "OUTBOX_RETRY_SCHEDULE": "0,0.2,0.2"}).wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    await wait_until_delivered(db_url)
    with psycopg.connect(db_url) as conn:
        log = conn.execute(
            "SELECT status_code, error FROM outbox.attempts WHERE consumer = %s ORDER BY id",
            (endpoint.id,),
        ).fetchall()
    assert log == [
        (None, "timed out after 2 s waiting for a final answer: the endpoint sent only an"
               " informational (1xx) response"),
        (None, "timed out after 2 s"),  # no interim answer at all: a plain timeout
        (204, None),
    ]


async def test_410_disables_the_endpoint_and_enabling_resumes(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    gone = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    fine = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.respond(gone.path, 410)
    make_relay().wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    await receiver.wait_for_async(1, path=gone.path, timeout=30)
    await receiver.wait_for_async(1, path=fine.path, timeout=30)

    with psycopg.connect(db_url) as conn:
        for _ in range(300):
            status = conn.execute(
                "SELECT status, disabled_reason FROM webhook_endpoints WHERE id = %s", (gone.id,)
            ).fetchone()
            if status is not None and status[0] == "disabled":
                break
            conn.commit()
            await asyncio.sleep(0.05)
        assert status is not None and status[0] == "disabled" and "410" in status[1]
        parked = conn.execute(
            "SELECT status, attempts, isfinite(next_attempt_at), last_status_code"
            " FROM outbox.deliveries WHERE consumer = %s",
            (gone.id,),
        ).fetchall()
        assert parked == [("pending", 1, False, 410)]
        enabled = conn.execute(
            "SELECT enabled FROM outbox.consumers WHERE name = %s", (gone.id,)
        ).fetchone()
        assert enabled == (False,)

    # Disabled: new events are not fanned out to it.
    await make_traffic(db_url, [merchant], 1, clients=1, seed=5)
    await receiver.wait_for_async(2, path=fine.path, timeout=30)
    assert len(receiver.receipts(gone.path)) == 1

    from outbox.consumers import enable_consumer

    async with await psycopg.AsyncConnection.connect(db_url) as aconn:
        async with aconn.transaction():
            assert await enable_consumer(aconn, gone.id)
    await receiver.wait_for_async(2, path=gone.path, timeout=30)
    await wait_until_delivered(db_url)
    assert len(receiver.accepted(gone.path)) == 1


async def test_re_enabling_delivers_what_was_pending_not_what_was_published_meanwhile(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    """docs/relay.md, 410 Gone: the events published while an endpoint was disabled were never
    queued for it; recover does not bring them either; the events API has them."""
    from ledger import service
    from outbox.consumers import disable_consumer, enable_consumer
    from outbox.redrive import redrive

    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["account.created"])

    async def account() -> str:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            async with conn.transaction():
                created = await service.create_account(conn, service.Merchant(merchant), "USD",
                                                       {})
            cur = await conn.execute(
                "SELECT id FROM outbox.events WHERE subject = %s", (created["id"],))
            row = await cur.fetchone()
            assert row is not None
            return str(row[0])

    pending = await account()  # queued while no relay runs
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        async with conn.transaction():
            assert await disable_consumer(conn, endpoint.id, "disabled by the test")
    meanwhile = await account()
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        async with conn.transaction():
            assert await enable_consumer(conn, endpoint.id)
    make_relay().wait_ready()
    await receiver.wait_for_async(1, path=endpoint.path, timeout=30)
    await wait_until_delivered(db_url)
    assert receiver.ids(endpoint.path) == [pending]
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as conn:
        assert (await redrive(conn, endpoint.id)).requeued == 0
        cur = await conn.execute(
            "SELECT count(*) FROM outbox.deliveries WHERE consumer = %s AND event_id = %s",
            (endpoint.id, meanwhile))
        assert await cur.fetchone() == (0,)
        cur = await conn.execute(  # what GET /v1/events lists for the merchant
            "SELECT id FROM outbox.events WHERE merchant_id = %s AND type = 'account.created'"
            " ORDER BY id", (merchant,))
        assert [r[0] for r in await cur.fetchall()] == sorted([pending, meanwhile])


async def test_redirects_are_failures(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    target = add_endpoint(db_url, receiver, merchant, ["nothing"], path="/target")
    receiver.set_default(endpoint.path, Reply.redirect(receiver.url(target.path)))
    make_relay().wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    await wait_until_delivered(db_url)
    assert receiver.receipts(target.path) == []
    assert delivery_counts(db_url).get("dead") == 1


async def test_failing_endpoint_does_not_slow_another(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    slow = add_endpoint(db_url, receiver, merchant)
    healthy = add_endpoint(db_url, receiver, merchant)
    # Every request to `slow` hangs until the relay's timeout: the worst kind of failure.
    receiver.set_default(slow.path, Reply(500, delay=30))
    make_relay(
        env={"OUTBOX_HTTP_TIMEOUT": "3", "OUTBOX_RETRY_SCHEDULE": "0,60"},
        args=["--concurrency", "8"],
    ).wait_ready()
    await make_traffic(db_url, [merchant], 40, clients=2)
    expected = webhook_expectations(db_url)[healthy.id]
    # 40 payments make well over 8 events for `slow`, each holding a slot for 3 s; were slots
    # shared first come first served, `healthy` would wait many timeouts.
    await receiver.wait_for_async(len(expected), path=healthy.path, timeout=60)
    assert {r.webhook_id for r in receiver.accepted(healthy.path)} == expected
    assert receiver.peak_in_flight <= 8


async def test_an_attempt_that_runs_to_the_full_timeout_is_never_sent_twice(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    """Two relays with the shortest lease the settings accept; every request hangs past the
    timeout and the schedule allows one attempt, so each event must arrive exactly once. An
    attempt lasts longer than OUTBOX_HTTP_TIMEOUT (aiohttp rounds deadlines of 5 s or more up to
    the next second, and the delivery may first wait in its relay's queue): a lease that ended
    before it would let the other relay claim the delivery and send it again meanwhile."""
    from relay.settings import Settings, SettingsError

    timeout = 5.5
    lease = timeout
    while True:
        lease += 0.5
        try:
            Settings.from_env({"OUTBOX_HTTP_TIMEOUT": str(timeout),
                               "OUTBOX_LEASE_SECONDS": str(lease)})
            break
        except SettingsError:
            continue
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["account.created"])
    receiver.set_default(endpoint.path, Reply(204, delay=60))
    env = {"OUTBOX_HTTP_TIMEOUT": str(timeout), "OUTBOX_LEASE_SECONDS": str(lease),
           "OUTBOX_RETRY_SCHEDULE": "0"}
    for _ in range(2):
        make_relay(env=env).wait_ready()
    from ledger import service

    events = 10
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        for _ in range(events):
            # One at a time, so the attempts start at different fractions of a second and end
            # anywhere up to a second after the timeout.
            async with conn.transaction():
                await service.create_account(conn, service.Merchant(merchant), "USD", {})
            await asyncio.sleep(0.1)
    try:
        await wait_until_delivered(db_url, within=60)
    finally:
        arrivals = receiver.ids(endpoint.path)
        assert len(arrivals) == len(set(arrivals)), (
            f"{len(arrivals) - len(set(arrivals))} requests sent again while the first attempt"
            " was still running")
    assert len(arrivals) == events
    assert delivery_counts(db_url, endpoint.id) == {"dead": events}


async def test_sigterm_releases_leases_and_exits_zero(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.set_default(endpoint.path, Reply(204, delay=30))
    relay = make_relay(env={"OUTBOX_SHUTDOWN_GRACE": "1", "OUTBOX_HTTP_TIMEOUT": "20",
                            "OUTBOX_LEASE_SECONDS": "60"})
    relay.wait_ready()
    await make_traffic(db_url, [merchant], 3, clients=1)
    await receiver.wait_for_async(3, path=endpoint.path, timeout=30)
    relay.signal(signal.SIGTERM)
    assert relay.wait() == 0, relay.log()
    relay.wait_message("STOPPING=1", timeout=1)
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT status, lease_token IS NULL, next_attempt_at <= now(), attempts"
            " FROM outbox.deliveries WHERE consumer = %s",
            (endpoint.id,),
        ).fetchall()
        sleepers = conn.execute("SELECT count(*) FROM outbox.sleepers").fetchone()
    assert rows == [("pending", True, True, 0)] * 3, relay.log()
    assert sleepers == (0,)


async def test_second_sigint_forces_exit(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.set_default(endpoint.path, Reply(204, delay=30))
    relay = make_relay(env={"OUTBOX_HTTP_TIMEOUT": "20", "OUTBOX_LEASE_SECONDS": "60"})
    relay.wait_ready()
    await make_traffic(db_url, [merchant], 1, clients=1)
    await receiver.wait_for_async(1, path=endpoint.path, timeout=30)
    relay.signal(signal.SIGINT)
    relay.wait_message("STOPPING=1")
    relay.signal(signal.SIGINT)
    assert relay.wait(10) == 130


def test_bad_configuration_exits_2(db_url: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.relayhelpers import ROOT

    cases = [
        ({"OUTBOX_RETRY_SCHEDULE": "0,x"}, []),
        ({"OUTBOX_HTTP_TIMEOUT": "30", "OUTBOX_LEASE_SECONDS": "10"}, []),
        ({"OUTBOX_HTTP_TIMEOUT": "5.5", "OUTBOX_LEASE_SECONDS": "6"}, []),
        ({"OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "not-a-net"}, []),
        ({}, ["--concurrency", "0"]),
        ({}, ["--log-format", "xml"]),
        ({}, ["--bogus"]),
        ({"DATABASE_URL": "postgresql://x/?nonsense=1"}, []),
    ]
    import os

    for env, args in cases:
        result = subprocess.run(
            [sys.executable, "-m", "relay", *args],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": db_url, "OUTBOX_PURGE_INTERVAL": "0", **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 2, (env, args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("outbox-relay: "), result.stderr


async def test_systemd_notifications_metrics_and_json_logs(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    import json
    import urllib.request

    from tests.support import free_port

    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    receiver.respond(endpoint.path, 500)
    port = free_port()
    relay = make_relay(
        env={"WATCHDOG_USEC": "400000"},
        args=["--metrics-port", str(port), "--log-format", "json"],
    )
    relay.wait_ready()
    relay.wait_message("WATCHDOG=1", timeout=10)
    await make_traffic(db_url, [merchant], 3, clients=1)
    await wait_until_delivered(db_url)
    relay._drain()
    deadline = asyncio.get_running_loop().time() + 15
    while not any(m.startswith("STATUS=") for m in relay.messages):
        assert asyncio.get_running_loop().time() < deadline, relay.messages
        await asyncio.sleep(0.1)
        relay._drain()

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    text = await asyncio.to_thread(scrape)
    assert 'outbox_deliveries_total{outcome="delivered"} 3.0' in text
    assert 'outbox_deliveries_total{outcome="retry"} 1.0' in text
    assert "outbox_attempt_duration_seconds_count 4.0" in text
    assert "outbox_end_to_end_seconds_count" in text
    assert f'outbox_pending{{consumer="{endpoint.id}"}}' in text
    assert 'outbox_oldest_pending_age_seconds{consumer="reports"}' in text

    assert relay.stop() == 0
    relay._drain()
    assert "STOPPING=1" in relay.messages
    lines = [json.loads(line) for line in relay.log().splitlines() if line.strip()]
    retry = next(line for line in lines if line.get("outcome") == "retry")
    assert retry["consumer"] == endpoint.id and retry["attempt"] == 1
    assert retry["status_code"] == 500 and retry["event"].startswith("evt_")
    log_text = relay.log()
    assert endpoint.secret.removeprefix("whsec_") not in log_text
    assert "v1," not in log_text


async def test_an_idle_relay_registers_as_sleeper_and_is_woken(
    db_url: str, receiver: Receiver, make_relay: MakeRelay
) -> None:
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant, ["payment.succeeded"])
    relay = make_relay().wait_ready()
    assert relay.proc is not None

    async def sleepers() -> list[str]:
        with psycopg.connect(db_url) as conn:
            return [r[0] for r in conn.execute("SELECT relay FROM outbox.sleepers")]

    for _ in range(300):
        if any(name.endswith(f":{relay.proc.pid}") for name in await sleepers()):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the idle relay never registered in outbox.sleepers")
    # A publisher sees the sleeper and notifies; the relay delivers and sleeps again.
    await make_traffic(db_url, [merchant], 1, clients=1)
    await receiver.wait_for_async(1, path=endpoint.path, timeout=30)
    await wait_until_delivered(db_url)
    assert relay.stop() == 0
    assert await sleepers() == []
