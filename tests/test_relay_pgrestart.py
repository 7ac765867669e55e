"""The relay outlives its database: a restart (and a crash) of a private PostgreSQL server
while it runs. It logs, backs off, reconnects, and delivers what was committed before and after.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg

from tests.relayhelpers import (
    RelayProcess,
    add_endpoint,
    check_complete_and_ordered,
    make_traffic,
    new_merchant,
    wait_until_delivered,
    webhook_expectations,
)
from tests.support.pgcluster import PgCluster
from tests.support.receiver import Receiver, Reply


async def test_relay_survives_postgres_restarts(
    pg_cluster: PgCluster, receiver: Receiver, tmp_path: Path
) -> None:
    db_url = pg_cluster.migrate()
    merchant = new_merchant(db_url)
    endpoint = add_endpoint(db_url, receiver, merchant)
    relay = RelayProcess(db_url, tmp_path).start()
    try:
        relay.wait_ready()
        await make_traffic(db_url, [merchant], 20, clients=2, seed=1)
        # Some of the next batch is held at the receiver while the server goes down, so the
        # relay has results to write when the database is gone.
        receiver.respond(endpoint.path, *[Reply(204, delay=1.0)] * 5)
        await make_traffic(db_url, [merchant], 20, clients=2, seed=2)
        await receiver.wait_for_async(1, path=endpoint.path, where=lambda r: r.reply.delay > 0)

        await asyncio.to_thread(pg_cluster.stop, "fast")
        # Longer than the relay waits for a pooled connection, so its loop sees the failure.
        await asyncio.sleep(7)
        assert relay.proc is not None and relay.proc.poll() is None, relay.log()
        await asyncio.to_thread(pg_cluster.start)
        await make_traffic(db_url, [merchant], 20, clients=2, seed=3)

        await asyncio.to_thread(pg_cluster.restart, "immediate")  # a crash this time
        await make_traffic(db_url, [merchant], 20, clients=2, seed=4)
        await wait_until_delivered(db_url, within=120)

        # Still listening after the restarts: an idle relay is woken by NOTIFY, not just polling.
        started = time.time()
        await make_traffic(db_url, [merchant], 1, clients=1, seed=5)
        await wait_until_delivered(db_url, within=60)
        assert time.time() - started < 30
        assert relay.stop() == 0, relay.log()
    finally:
        relay.close()

    expected = webhook_expectations(db_url)
    check_complete_and_ordered(receiver, [endpoint], expected, slow_ok=1.0)
    assert "database unavailable" in relay.log()
    # Against the table, not what the clients were told: the private cluster runs with
    # synchronous_commit=off, so its crash may take back the last acknowledged commits.
    with psycopg.connect(db_url) as conn:
        reports = conn.execute(
            "SELECT sum(payments_count), sum(payments_amount) FROM daily_reports"
        ).fetchone()
        payments = conn.execute(
            "SELECT count(*), sum(amount) FROM payments WHERE status = 'succeeded'"
        ).fetchone()
    assert payments is not None and 75 <= payments[0] <= 81
    assert reports == payments
