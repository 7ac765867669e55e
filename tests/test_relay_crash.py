"""Three relays SIGKILLed at random and restarted while 16 clients make 1,000 payments:
everything still arrives everywhere, in order per subject, and the reports count every payment
exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

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
from tests.support.receiver import Receiver

CRASH_ENV = {
    "OUTBOX_LEASE_SECONDS": "7.5",
    "OUTBOX_HTTP_TIMEOUT": "2",
    "OUTBOX_RETRY_SCHEDULE": "0,0.2,0.5,1,1,1,1,1,1,1",
}


@pytest.fixture
def relays(db_url: str, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    procs = [RelayProcess(db_url, tmp_path, env=CRASH_ENV, name=f"relay{i}") for i in range(3)]
    yield procs
    for proc in procs:
        proc.close()


async def test_kill_and_restart_relays_under_load(
    db_url: str, receiver: Receiver, relays: list[RelayProcess]
) -> None:
    merchants = [new_merchant(db_url, "a"), new_merchant(db_url, "b")]
    endpoints = [
        add_endpoint(db_url, receiver, merchants[0]),
        add_endpoint(db_url, receiver, merchants[0], ["payment.*"]),
        add_endpoint(db_url, receiver, merchants[1]),
    ]
    for proc in relays:
        proc.start().wait_ready()

    rng = random.Random(7)
    kills: list[float] = []
    traffic_done = asyncio.Event()

    async def killer() -> None:
        while len(kills) < 10 or not traffic_done.is_set():
            await asyncio.sleep(rng.uniform(0.2, 0.8))
            victim = rng.choice(relays)
            kills.append(time.time())
            victim.kill()
            victim.start()

    killing = asyncio.create_task(killer())
    try:
        traffic = await make_traffic(db_url, merchants, 1000, clients=16)
    finally:
        traffic_done.set()
    await asyncio.wait_for(killing, 120)
    for proc in relays:
        proc.wait_ready(60)
    await wait_until_delivered(db_url, within=240)
    for proc in relays:
        assert proc.stop() == 0, proc.log()

    expected = webhook_expectations(db_url)
    duplicates = check_complete_and_ordered(receiver, endpoints, expected)
    print(f"\n{len(kills)} kills, {duplicates} duplicate webhook requests")
    assert len(kills) >= 10
    for endpoint in endpoints:
        receipts = receiver.receipts(endpoint.path)
        check_same_bytes_on_redelivery(receipts)
        first: dict[str | None, float] = {}
        for r in receipts:
            if r.attempt == 1:
                first[r.webhook_id] = r.arrived_at
            else:
                # A repeat needs a relay that died between sending and recording the answer.
                assert any(first[r.webhook_id] - 1 <= k <= r.arrived_at for k in kills), (
                    f"{r.webhook_id} repeated without a kill in between"
                )

    with psycopg.connect(db_url) as conn:
        totals = conn.execute(
            "SELECT sum(payments_count), sum(payments_amount) FROM daily_reports"
        ).fetchone()
        reports = conn.execute(
            "SELECT status, count(*) FROM outbox.deliveries WHERE consumer = 'reports'"
            " GROUP BY status"
        ).fetchall()
    assert len(traffic.payments) == 1000
    assert totals == (1000, sum(traffic.payments.values()))
    assert dict(reports) == {"delivered": 1000 + 2 * 16}  # payments and the opening deposits
