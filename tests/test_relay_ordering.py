"""One delivery of a subject in flight, whatever operators do (docs/relay.md, Ordering).

For one endpoint and one subject at most one delivery is in flight at any moment, and a later
`sequence` is never sent before an earlier one's attempt has been answered, unless the earlier one
is dead. Disabling, enabling, recovering and redriving never cancel or shorten a lease a relay
holds; a dead delivery brought back while a later one of its subject is in flight waits for that
one's answer. Real `outbox-relay` processes, the API (in-process and under uvicorn),
`paymentsctl` as a subprocess, and a receiver that records every request that arrived while
another of its subject was unanswered (`Receiver.overlaps`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from ledger.merchants import NewKey
from tests.apihelpers import Api, assert_conserved, created, live_server, query, start_api
from tests.relayhelpers import (
    RelayProcess,
    make_traffic,
    wait_until_delivered,
    webhook_expectations,
)
from tests.support.receiver import Receipt, Receiver, Reply

# Attempts are held open at the receiver for seconds: a timeout well above that, and a lease
# above the timeout (the relay refuses anything else).
ENV = {"OUTBOX_HTTP_TIMEOUT": "20", "OUTBOX_LEASE_SECONDS": "40"}
SCHEDULE_LENGTH = 3  # tests.relayhelpers.FAST_ENV: "0,0.2,0.4", three attempts
WATCH = 3.0  # how long a held attempt stays unanswered while the test watches for a second one
EPOCH = "2000-01-01T00:00:00Z"
ROUNDS = 6  # of the four operator actions, in random order each round

MakeRelay = Callable[..., RelayProcess]


@pytest.fixture
def make_relay(db_url: str, tmp_path: Path) -> Iterator[MakeRelay]:
    started: list[RelayProcess] = []

    def make(**kwargs: object) -> RelayProcess:
        env = {**ENV, **kwargs.pop("env", {})}  # type: ignore[dict-item]
        relay = RelayProcess(db_url, tmp_path, name=f"relay{len(started)}", env=env, **kwargs)  # type: ignore[arg-type]
        started.append(relay)
        return relay.start()

    yield make
    for relay in started:
        relay.close()


@pytest.fixture
def api(db_url: str, merchant: NewKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    with start_api(db_url, merchant) as client:
        yield client


def endpoint(api: Api, receiver: Receiver, event_types: list[str]) -> tuple[str, str]:
    """An endpoint registered through the API, served by the receiver: (id, path)."""
    path = f"/hook{random.randrange(10**9)}"
    we = created(api.post("/v1/webhook_endpoints",
                          {"url": receiver.url(path), "event_types": event_types}))
    receiver.add_endpoint(path, we["secret"])
    return we["id"], path


def sequences(receipts: list[Receipt]) -> list[int]:
    return [int(r.body["sequence"]) for r in receipts]


def leases(db_url: str, consumer: str) -> dict[str, object]:
    """event id -> lease token (None when not leased) of the consumer's deliveries."""
    rows = query(db_url, "SELECT event_id, lease_token FROM outbox.deliveries WHERE consumer = %s",
                 (consumer,))
    return dict(rows)


async def leases_stay(db_url: str, consumer: str, expected: dict[str, object],
                      seconds: float) -> None:
    """For `seconds` (while an attempt is held open at the receiver), the consumer's leases stay
    exactly `expected`: the one in flight keeps its token, nothing else is claimed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert leases(db_url, consumer) == expected
        await asyncio.sleep(0.05)


def run_paymentsctl(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = shutil.which("paymentsctl", path=str(Path(sys.executable).parent))
    assert command is not None
    return subprocess.run(
        [command, *args], env={**os.environ, "DATABASE_URL": db_url}, capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL,
    )


# --- the reproductions --------------------------------------------------------------------------


async def test_disabling_and_enabling_mid_attempt_cancels_nothing(
    db_url: str, api: Api, receiver: Receiver, make_relay: MakeRelay
) -> None:
    """PATCH to disabled and back to enabled while an attempt is in flight: no second copy goes
    out while it is unanswered, the subject's next event waits for its answer, and its 2xx
    counts (the lease was never taken from the relay)."""
    we, path = endpoint(api, receiver, ["account.*"])
    gate = threading.Event()
    receiver.respond(path, Reply(204, gate=gate))
    relay = make_relay().wait_ready()
    account = api.account()  # account.created, sequence 1: held at the receiver
    [first] = await receiver.wait_for_async(1, path=path, timeout=30)
    api.deposit(account["id"], 100)  # account.balance_changed, sequence 2: waits behind it

    held = leases(db_url, we)
    assert held[first.webhook_id or ""] is not None and len(held) == 2

    url = f"/v1/webhook_endpoints/{we}"
    assert api.patch(url, {"status": "disabled"}).json()["status"] == "disabled"
    assert api.patch(url, {"status": "enabled"}).json()["status"] == "enabled"
    await leases_stay(db_url, we, held, WATCH)
    assert len(receiver.receipts(path)) == 1
    gate.set()

    await wait_until_delivered(db_url, consumer=we)
    assert receiver.overlaps == []
    assert sequences(receiver.receipts(path)) == [1, 2]
    assert query(db_url, "SELECT status, attempts FROM outbox.deliveries WHERE event_id = %s",
                 (first.webhook_id,)) == [("delivered", 1)]
    assert "lease lost" not in relay.log()


@pytest.mark.parametrize("how", ["api recover", "paymentsctl redrive"])
async def test_a_recovered_delivery_waits_for_a_later_one_in_flight(
    db_url: str, api: Api, receiver: Receiver, make_relay: MakeRelay, how: str
) -> None:
    """Sequence 1 died, so sequence 2 went out. Recovering 1 while 2 is in flight sends nothing
    beside it: 1 goes once 2 is answered (after it: out of order, and reported so)."""
    we, path = endpoint(api, receiver, ["account.*"])
    account = api.account()
    api.deposit(account["id"], 100)
    gate = threading.Event()
    receiver.respond(path, 500, 500, 500, Reply(204, gate=gate))
    make_relay().wait_ready()
    receipts = await receiver.wait_for_async(SCHEDULE_LENGTH + 1, path=path, timeout=30)
    assert sequences(receipts) == [1, 1, 1, 2]
    held = leases(db_url, we)
    assert held[receipts[-1].webhook_id or ""] is not None

    if how == "api recover":
        resp = api.post(f"/v1/webhook_endpoints/{we}/recover", {"since": EPOCH})
        assert resp.status_code == 202, resp.text
        assert resp.json() == {"requeued": 1, "out_of_order_subjects": 1}
    else:
        result = run_paymentsctl(db_url, "outbox", "redrive", "--consumer", we, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {
            "consumer": we, "redriven": 1, "out_of_order_subjects": 1}
    await leases_stay(db_url, we, held, WATCH)
    assert len(receiver.receipts(path)) == SCHEDULE_LENGTH + 1
    gate.set()

    await wait_until_delivered(db_url, consumer=we)
    assert receiver.overlaps == []
    assert sequences(receiver.receipts(path)) == [1, 1, 1, 2, 1]


async def test_a_410_after_the_lease_was_lost_changes_nothing(
    db_url: str, api: Api, receiver: Receiver, make_relay: MakeRelay
) -> None:
    """A relay whose lease ran out while it waited for the answer (and another relay took the
    delivery over) gets a 410: only the holder of the lease may disable the endpoint."""
    we, path = endpoint(api, receiver, ["account.*"])
    gate = threading.Event()
    receiver.respond(path, Reply(410, gate=gate))
    relay = make_relay().wait_ready()
    api.account()
    [held] = await receiver.wait_for_async(1, path=path, timeout=30)
    with psycopg.connect(db_url, autocommit=True) as conn:
        # What another relay does once the lease has run out: a claim of its own.
        taken = conn.execute(
            "UPDATE outbox.deliveries SET lease_token = gen_random_uuid(), leased_by = 'other:1',"
            " next_attempt_at = now() + interval '40 s' WHERE consumer = %s AND event_id = %s",
            (we, held.webhook_id),
        ).rowcount
        assert taken == 1
    gate.set()
    for _ in range(600):
        logged = query(db_url, "SELECT status_code FROM outbox.attempts WHERE consumer = %s",
                       (we,))
        if logged:
            break
        await asyncio.sleep(0.05)
    # The attempt is logged in the transaction that would have disabled the endpoint.
    assert logged == [(410,)]
    assert api.get(f"/v1/webhook_endpoints/{we}").json()["status"] == "enabled"
    assert query(db_url, "SELECT enabled FROM outbox.consumers WHERE name = %s",
                 (we,)) == [(True,)]
    assert query(
        db_url,
        "SELECT status, leased_by, isfinite(next_attempt_at) FROM outbox.deliveries"
        " WHERE consumer = %s", (we,),
    ) == [("pending", "other:1", True)]
    for _ in range(200):
        if "lease lost before completion" in relay.log():
            break
        await asyncio.sleep(0.05)
    assert "lease lost before completion" in relay.log()


# --- the invariant under operator actions -------------------------------------------------------


def check_invariant(receipts: list[Receipt], fanned_out: dict[str, set[int]]) -> None:
    """Per subject, in arrival order: when a sequence arrives, every earlier sequence of the
    subject that was fanned out to the endpoint (events committed while it was disabled were
    not) has been answered with a 2xx before it, or has died (as many failed answers as the
    schedule has attempts). Overlaps the receiver checks itself."""
    by_subject: dict[str, list[Receipt]] = defaultdict(list)
    for r in sorted(receipts, key=lambda r: r.arrived_at):
        by_subject[r.body["subject"]].append(r)
    for subject, arrivals in by_subject.items():
        acknowledged: set[int] = set()
        failures: dict[int, int] = defaultdict(int)
        for r in arrivals:
            sequence = int(r.body["sequence"])
            for earlier in sorted(s for s in fanned_out[subject] if s < sequence):
                assert earlier in acknowledged or failures[earlier] >= SCHEDULE_LENGTH, (
                    f"{subject}: sequence {sequence} sent before {earlier} was answered "
                    f"(failures so far {failures[earlier]})"
                )
            if 200 <= r.reply.status < 300:
                acknowledged.add(sequence)
            else:
                failures[sequence] += 1


async def test_one_delivery_of_a_subject_in_flight_whatever_operators_do(
    db_url: str, merchant: NewKey, receiver: Receiver, make_relay: MakeRelay,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Payments flow; the endpoint answers after a few milliseconds and fails some attempts, so
    some deliveries die; meanwhile an operator disables and enables the endpoint, recovers through
    the API and redrives with `paymentsctl`, again and again. No subject ever has two deliveries
    in flight, no later event overtakes an earlier one that is not dead, no lease is ever lost,
    and in the end everything arrives."""
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    rng = random.Random(20261203)
    path = "/all"
    replies = [Reply(500) if rng.random() < 0.25 else Reply(204, delay=rng.uniform(0, 0.4))
               for _ in range(4000)]
    relay = make_relay(env={"OUTBOX_HTTP_TIMEOUT": "5", "OUTBOX_LEASE_SECONDS": "30"})
    relay.wait_ready()
    actions: dict[str, int] = defaultdict(int)
    requeued: list[int] = []
    with live_server(db_url) as base:
        async with httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {merchant.api_key}"}, timeout=30
        ) as client:
            resp = await client.post("/v1/webhook_endpoints",
                                     json={"url": receiver.url(path), "event_types": ["*"]})
            we = resp.json()["id"]
            receiver.add_endpoint(path, resp.json()["secret"])
            receiver.respond(path, *replies)
            done = asyncio.Event()

            async def operator() -> None:
                for _ in range(ROUNDS):
                    for action in rng.sample(["disable", "enable", "recover", "redrive"], 4):
                        await act(action)
                        await asyncio.sleep(rng.uniform(0.02, 0.2))
                done.set()

            async def act(action: str) -> None:
                if action in ("disable", "enable"):
                    status = f"{action}d"
                    resp = await client.patch(f"/v1/webhook_endpoints/{we}",
                                              json={"status": status})
                    assert resp.status_code == 200, resp.text
                elif action == "recover":
                    resp = await client.post(f"/v1/webhook_endpoints/{we}/recover",
                                             json={"since": EPOCH})
                    assert resp.status_code == 202, resp.text
                    requeued.append(resp.json()["requeued"])
                else:
                    result = await asyncio.to_thread(
                        run_paymentsctl, db_url, "outbox", "redrive", "--consumer", we,
                        "--json")
                    assert result.returncode == 0, result.stderr
                    requeued.append(json.loads(result.stdout)["redriven"])
                actions[action] += 1

            async def traffic() -> None:
                batch = 0
                while not done.is_set():
                    batch += 1
                    await make_traffic(db_url, [merchant.merchant_id], 10, clients=2, seed=batch)

            await asyncio.gather(operator(), traffic())
            # The end of the day: the endpoint is fixed and enabled, the dead are recovered.
            receiver.clear_replies(path)
            receiver.set_default(path, 204)
            resp = await client.patch(f"/v1/webhook_endpoints/{we}", json={"status": "enabled"})
            assert resp.status_code == 200
            for _ in range(5):
                resp = await client.post(f"/v1/webhook_endpoints/{we}/recover",
                                         json={"since": EPOCH})
                await wait_until_delivered(db_url, consumer=we)
                if not query(db_url, "SELECT 1 FROM outbox.deliveries WHERE consumer = %s"
                                     " AND status <> 'delivered'", (we,)):
                    break

    assert actions == dict.fromkeys(("disable", "enable", "recover", "redrive"), ROUNDS)
    assert sum(requeued) > 0, "no dead delivery was ever brought back while the relay ran"
    receipts = receiver.receipts(path)
    assert all(r.verified for r in receipts)
    assert receiver.overlaps == [], receiver.overlaps[:5]
    fanned_out: dict[str, set[int]] = defaultdict(set)
    for subject, sequence in query(
            db_url, "SELECT subject, sequence FROM outbox.deliveries WHERE consumer = %s", (we,)):
        fanned_out[subject].add(sequence)
    check_invariant(receipts, fanned_out)
    accepted = {r.webhook_id for r in receipts if 200 <= r.reply.status < 300}
    assert accepted == webhook_expectations(db_url)[we]
    assert "lease lost" not in relay.log()
    assert_conserved(db_url)
