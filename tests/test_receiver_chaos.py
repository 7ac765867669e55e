"""Exactly once past the webhook, under chaos on both sides (docs/receiver.md).

Our `outbox-relay` delivers a merchant's events to a receiver built with the library
(`tests/support/chaos_receiver.py`: the example's handlers, its own process and database),
while:
- the receiver is SIGKILLed in the middle of handlers (each stalled on purpose after writing its
  effects), and once at an arbitrary moment, and restarted;
- the relay is SIGKILLed twice and restarted;
- the receiver answers 500 on the first attempt of one event in 7 (after writing its effects),
  and takes longer than the relay's timeout on one in 11 (then commits, so the retry is a
  duplicate);
- one event in the middle of an account's history and one that ends its payment's history are
  refused until they are dead letters, then recovered with `POST …/recover`;
- one event's delivery row is deleted, so only backfill from `GET /v1/events` can bring it;
- payments keep being made meanwhile.
At the end the receiver's log of applied events holds every event of the merchant exactly once,
each subject's events in sequence order from 1 without a gap, and the balances it kept equal
the ledger's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from ledger.merchants import NewKey
from tests.apihelpers import assert_conserved, created, execute, live_server, query
from tests.receiverhelpers import ReceiverProcess, scalar
from tests.relayhelpers import RelayProcess, delivery_counts, make_traffic
from tests.support import free_port

HTTP_TIMEOUT = 1.5
CHAOS_ENV = {
    "OUTBOX_RETRY_SCHEDULE": "0,0.3,0.6,1,1.5,2,2,3,3,3",  # 16 s: outlives a receiver restart
    "OUTBOX_HTTP_TIMEOUT": str(HTTP_TIMEOUT),
    "OUTBOX_LEASE_SECONDS": "7",
}
SETTLE_SECONDS = 120


@dataclass(frozen=True)
class Targets:
    dead_last: str  # ends its subject: only the recovered dead letter can bring it
    dead_middle: str  # later events of its subject follow: backfill brings it first
    purged: str  # its delivery row is deleted: only backfill can bring it
    stalls: list[str]  # the receiver is killed in the middle of their handlers


def pick_targets(db_url: str, merchant_id: str) -> Targets:
    rows = query(
        db_url,
        "SELECT id, type, subject, sequence FROM outbox.events WHERE merchant_id = %s"
        " ORDER BY subject, sequence",
        (merchant_id,),
    )
    by_subject: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for event_id, type_, subject, sequence in rows:
        by_subject[subject].append((event_id, type_, sequence))
    accounts = sorted(s for s in by_subject if s.startswith("acct_") and len(by_subject[s]) > 6)
    payments = sorted(s for s in by_subject if s.startswith("pay_"))
    deposits = sorted(s for s in by_subject if s.startswith("dep_"))
    assert len(accounts) >= 3 and len(payments) >= 2 and deposits, by_subject.keys()
    return Targets(
        dead_last=by_subject[payments[0]][-1][0],
        dead_middle=by_subject[accounts[0]][2][0],
        purged=by_subject[accounts[1]][3][0],
        # subjects without a gap, so their events reach the handler from a webhook request
        stalls=[by_subject[accounts[2]][4][0], by_subject[payments[1]][0][0],
                by_subject[deposits[0]][0][0]],
    )


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for proc in started:
        proc.close()


def write_plan(path: Path, **plan: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(plan))
    os.replace(tmp, path)


async def wait_until(predicate: Any, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_each_event_is_applied_once_in_subject_order_through_chaos(
    db_url: str,
    empty_db_url: str,
    merchant: NewKey,
    tmp_path: Path,
    procs: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    receiver_db = empty_db_url
    began = datetime.now(UTC)
    port = free_port()
    plan, markers = tmp_path / "plan.json", tmp_path / "markers.log"
    markers.touch()
    auth = {"Authorization": f"Bearer {merchant.api_key}"}

    with live_server(db_url) as api_url:
        http = httpx.AsyncClient(base_url=api_url, headers=auth, timeout=30)
        endpoint = created(await http.post("/v1/webhook_endpoints", json={
            "url": f"http://127.0.0.1:{port}/webhooks", "event_types": ["*"]}))
        # Before any relay runs: the first wave, the targets, the deleted delivery.
        await make_traffic(db_url, [merchant.merchant_id], 60, clients=4, seed=15)
        targets = pick_targets(db_url, merchant.merchant_id)
        assert execute(db_url, "DELETE FROM outbox.deliveries WHERE consumer = %s"
                               " AND event_id = %s", (endpoint["id"], targets.purged)) == 1
        write_plan(plan, blocked=[targets.dead_last, targets.dead_middle], stall=targets.stalls)

        receiver = ReceiverProcess(
            "tests.support.chaos_receiver", port,
            {"RECEIVER_DATABASE_URL": receiver_db,
             "RECEIVER_WEBHOOK_SECRETS": endpoint["secret"],
             "RECEIVER_EVENTS_URL": api_url, "RECEIVER_API_KEY": merchant.api_key},
            ["--plan", str(plan), "--markers", str(markers), "--slow", str(HTTP_TIMEOUT + 0.5)],
            tmp_path / "receiver.log",
        )
        relay = RelayProcess(db_url, tmp_path, env=CHAOS_ENV)
        procs += [receiver, relay]
        receiver.start().wait_ready()
        relay.start().wait_ready()

        async def restart_receiver() -> None:
            await asyncio.to_thread(receiver.kill)
            await asyncio.to_thread(lambda: receiver.start().wait_ready())

        async def kill_receiver() -> int:
            """SIGKILLs the receiver in the middle of each stalled handler, and once at an
            arbitrary moment; returns the kills in the middle of a handler."""
            loop = asyncio.get_running_loop()
            in_handlers = handled = 0
            arbitrary_at: float | None = loop.time() + 2.0
            while handled < len(targets.stalls) or arbitrary_at is not None:
                stalled = len(markers.read_text().splitlines())
                if stalled > handled:
                    handled = stalled
                    await restart_receiver()
                    in_handlers += 1
                elif arbitrary_at is not None and loop.time() >= arbitrary_at:
                    arbitrary_at = None
                    await restart_receiver()
                await asyncio.sleep(0.02)
            return in_handlers

        async def kill_relay() -> None:
            for pause in (1.0, 2.5):
                await asyncio.sleep(pause)
                relay.kill()
                relay.start()
            await asyncio.to_thread(relay.wait_ready)

        def status(event_id: str) -> str:
            return str(scalar(db_url, "SELECT status FROM outbox.deliveries"
                                      " WHERE consumer = %s AND event_id = %s",
                              (endpoint["id"], event_id)))

        refused_until_dead: dict[str, int] = {}

        async def dead_then_recovered() -> None:
            dead = [targets.dead_last, targets.dead_middle]
            await wait_until(lambda: {status(e) for e in dead} == {"dead"}, 60, "dead letters")
            refused_until_dead.update(query(
                receiver_db, "SELECT webhook_id, n FROM chaos_attempts"
                             " WHERE webhook_id = ANY(%s)", (dead,)))
            write_plan(plan, blocked=[], stall=targets.stalls)
            resp = await http.post(f"/v1/webhook_endpoints/{endpoint['id']}/recover",
                             json={"since": began.isoformat()})
            assert resp.status_code == 202, resp.text
            assert resp.json()["requeued"] >= 2

        chaos = {
            asyncio.create_task(coroutine, name=name) for name, coroutine in [
                ("receiver killed", kill_receiver()),
                ("relay killed", kill_relay()),
                ("dead letters recovered", dead_then_recovered()),
                ("second wave of payments",
                 make_traffic(db_url, [merchant.merchant_id], 40, clients=2, seed=16)),
            ]
        }
        done, pending = await asyncio.wait(chaos, timeout=SETTLE_SECONDS)
        for task in pending:
            task.cancel()
        assert not pending, (
            f"unfinished: {[t.get_name() for t in pending]}; stalls marked:"
            f" {markers.read_text()}\n{receiver.log()}"
        )
        for task in done:
            task.result()
        [receiver_kills] = [t.result() for t in done if t.get_name() == "receiver killed"]

        expected = {row[0]: (row[1], row[2]) for row in query(
            db_url, "SELECT id, subject, sequence FROM outbox.events WHERE merchant_id = %s",
            (merchant.merchant_id,))}

        def settled() -> bool:
            counts = delivery_counts(db_url, endpoint["id"])
            applied = scalar(receiver_db,
                             "SELECT count(DISTINCT event_id) FROM receiver_example.applied")
            return not counts.get("pending") and applied >= len(expected)

        await wait_until(settled, SETTLE_SECONDS, f"every event applied:\n{receiver.log()}")
        await http.aclose()
        assert relay.stop() == 0, relay.log()
        # uvicorn shuts down gracefully, then re-raises the SIGTERM it caught
        assert receiver.stop() == -signal.SIGTERM, receiver.log()

    # Exactly once: every event of the merchant, once, and nothing else.
    applied = query(receiver_db, "SELECT event_id, subject, sequence, late"
                                 " FROM receiver_example.applied ORDER BY position")
    ids = [row[0] for row in applied]
    assert len(ids) == len(set(ids)), "an event was applied twice"
    assert set(ids) == set(expected)
    assert all(expected[event_id] == (subject, sequence)
               for event_id, subject, sequence, _ in applied)
    assert not any(row[3] for row in applied), "no event should have been late"
    # In order: each subject's events in application order are 1, 2, 3, … without a gap.
    per_subject: dict[str, list[int]] = defaultdict(list)
    for _, subject, sequence, _ in applied:
        per_subject[subject].append(sequence)
    disordered = {s: seqs for s, seqs in per_subject.items()
                  if seqs != list(range(1, len(seqs) + 1))}
    assert disordered == {}
    # The receiver's balances, which it checks link by link, are the ledger's.
    kept = dict(query(receiver_db, "SELECT account, balance FROM receiver_example.balances"))
    ledger = dict(query(db_url, "SELECT id, balance FROM accounts WHERE merchant_id = %s"
                                " AND kind = 'customer'", (merchant.merchant_id,)))
    assert kept == ledger
    assert_conserved(db_url)

    # Each fault happened, and was absorbed where it should have been.
    inbox = dict(query(receiver_db, "SELECT webhook_id, via FROM receiver.inbox"))
    assert inbox[targets.purged] == "backfill"
    assert inbox[targets.dead_middle] == "backfill"
    assert inbox[targets.dead_last] == "webhook"
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.inbox WHERE status <> 'applied'") \
        == 0
    assert scalar(receiver_db, "SELECT count(*) FROM receiver.skipped") == 0
    attempts = dict(query(receiver_db, "SELECT webhook_id, n FROM chaos_attempts"))
    assert targets.purged not in attempts, "the deleted delivery was sent after all"
    for recovered in (targets.dead_last, targets.dead_middle):  # each came back once recovered
        assert attempts[recovered] > refused_until_dead.get(recovered, 0)
    assert len(markers.read_text().splitlines()) == len(targets.stalls)
    assert receiver_kills >= 1 and receiver.kills == receiver_kills + 1
    assert relay.starts == 3
    relay_log = query(db_url, "SELECT status_code, error FROM outbox.attempts"
                              " WHERE consumer = %s", (endpoint["id"],))
    assert any(code == 500 for code, _ in relay_log), "no 500 was injected"
    assert any(code is None and "timed out" in (error or "") for code, error in relay_log)
    assert delivery_counts(db_url, endpoint["id"]) == {"delivered": len(expected) - 1}
    print(f"\n{len(expected)} events, {receiver_kills} receiver kills mid-handler, "
          f"{sum(n - 1 for n in attempts.values())} repeated requests, "
          f"{sum(1 for v in inbox.values() if v == 'backfill')} backfilled")
