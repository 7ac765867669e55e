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
