"""Whole again as soon as the database is: after PostgreSQL restarts (cleanly or as a crash), the
API, the relay and `paymentsctl` serve without a database error once the server accepts
connections again, allowing `GRACE` seconds, at a trickle of traffic and under bursts alike.

Each test runs on a private cluster (tests/support/pgcluster.py) with the services as real
subprocesses. The API is served with one and with two uvicorn workers (each worker has its own
pool, so a trickle leaves stale connections idle in both for a long time). The requests that
count are those *sent* at least `GRACE` seconds after `pg_ctl start` returned: every one of them
must succeed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import psycopg
import pytest

from ledger.merchants import create_merchant
from tests.relayhelpers import (
    RelayProcess,
    add_endpoint,
    make_traffic,
    new_merchant,
    wait_until_delivered,
)
from tests.support.pgcluster import PgCluster
from tests.support.receiver import Receiver
from tests.test_cli import run as run_ctl
from tests.test_request_limits import ApiProcess, serve_api

GRACE = 1.0
TRICKLE_INTERVAL = 0.25
AFTER_RESTART = 8.0


@dataclass
class Answer:
    sent: float
    what: str
    status: int
    body: str


@dataclass
class Trickle:
    """One request every TRICKLE_INTERVAL, alternately a read and a payment."""

    api: ApiProcess
    api_key: str
    source: str
    destination: str
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(30)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def one(self, client: httpx.Client, n: int) -> Answer:
        sent = time.monotonic()
        what = "read" if n % 2 else "payment"
        try:
            if what == "read":
                resp = client.get(f"/v1/accounts/{self.source}")
            else:
                resp = client.post(
                    "/v1/payments",
                    json={"source": self.source, "destination": self.destination, "amount": 1,
                          "currency": "USD"},
                    headers={"Idempotency-Key": str(uuid.uuid4())},
                )
        except httpx.TransportError as exc:
            return Answer(sent, what, -1, repr(exc))
        return Answer(sent, what, resp.status_code, resp.text[:200])

    def burst(self, clients: int = 8, each: int = 6) -> list[Answer]:
        """Concurrent requests, enough to take every connection a pool has grown to."""
        answers: list[Answer] = []

        def run(k: int) -> None:
            with self.client() as client:
                for n in range(each):
                    answers.append(self.one(client, k + n))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        return answers

    def _run(self) -> None:
        n = 0
        with self.client() as client:
            while not self.stop.is_set():
                self.answers.append(self.one(client, n))
                n += 1
                self.stop.wait(TRICKLE_INTERVAL)


@pytest.fixture
def funded(pg_cluster: PgCluster) -> Iterator[tuple[str, str, str, str]]:
    """(database URL, API key, source account, destination account) on the private cluster."""
    url = pg_cluster.migrate()
    with psycopg.connect(url) as conn:
        key = create_merchant(conn, "Restart merchant").api_key
    with serve_api(url) as api:
        with httpx.Client(base_url=api.url, timeout=10,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            source = client.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
            destination = client.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
            deposit = client.post("/v1/deposits", json={"account": source, "amount": 10**12,
                                                        "currency": "USD"})
            assert deposit.status_code == 201, deposit.text
    yield url, key, source, destination


@pytest.mark.parametrize(
    ("workers", "mode", "down"), [(1, "fast", 1.0), (2, "fast", 1.0), (2, "immediate", 8.0)]
)
def test_the_api_answers_without_503_one_second_after_the_server_is_back(
    pg_cluster: PgCluster, funded: tuple[str, str, str, str], workers: int, mode: str,
    down: float,
) -> None:
    url, key, source, destination = funded
    with serve_api(url, ["--workers", str(workers)]) as api:
        trickle = Trickle(api, key, source, destination)
        trickle.start()
        try:
            # Pools grown past their minimum, then left idle but for the trickle.
            warm = trickle.burst()
            assert all(a.status in (200, 201) for a in warm), warm
            time.sleep(1.0)
            pg_cluster.stop(mode)
            time.sleep(down)  # 8 s: longer than a request waits for a connection (5 s)
            pg_cluster.start()
            back = time.monotonic()
            time.sleep(AFTER_RESTART / 2)
            late_burst = trickle.burst()
            time.sleep(AFTER_RESTART / 2)
        finally:
            trickle.finish()
        log = api.log()
    counted = [a for a in trickle.answers + late_burst if a.sent >= back + GRACE]
    failed = [a for a in counted if a.status not in (200, 201)]
    during = [a for a in trickle.answers if back - 2 <= a.sent < back + GRACE]
    print(f"{workers} worker(s), {mode}, down {down:g} s: {len(counted)} requests after the grace, "
          f"{len(failed)} failed; around the restart: {[a.status for a in during]}")
    assert counted, "no request was sent after the restart"
    assert not failed, (
        f"{len(failed)} of {len(counted)} requests sent {GRACE} s or more after the server "
        f"was back failed, e.g. "
        + "; ".join(f"{a.what} +{a.sent - back:.1f}s {a.status} {a.body}" for a in failed[:5])
        + f"\n{log[-2000:]}"
    )


def _relay_records(log: str, since: float) -> list[dict[str, object]]:
    """The relay's JSON log records at WARNING or above logged at or after `since` (epoch)."""
    records = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        moment = datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00")).timestamp()
        if moment >= since and record.get("level") in ("warning", "error", "critical"):
            records.append(record)
    return records


def _listening(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay'"
            " AND query = 'LISTEN outbox_wakeup'"
        ).fetchone()
    return bool(row and row[0])


async def test_the_relay_works_without_a_database_error_one_second_after_the_server_is_back(
    pg_cluster: PgCluster, receiver: Receiver, tmp_path: Path
) -> None:
    url = pg_cluster.migrate()
    merchant = new_merchant(url)
    add_endpoint(url, receiver, merchant)
    relay = RelayProcess(url, tmp_path, args=["--log-format", "json"]).start()
    try:
        relay.wait_ready()
        await make_traffic(url, [merchant], 4, clients=1, seed=1)
        await wait_until_delivered(url)
        await asyncio.to_thread(pg_cluster.stop, "fast")
        await asyncio.sleep(8)  # every backoff of the relay at its longest
        await asyncio.to_thread(pg_cluster.start)
        back_wall, back = time.time(), time.monotonic()
        listening_after = None
        while time.monotonic() - back < 10:
            if await asyncio.to_thread(_listening, url):
                listening_after = time.monotonic() - back
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, back + GRACE - time.monotonic()))
        committed = time.monotonic()
        await make_traffic(url, [merchant], 1, clients=1, seed=2)
        await wait_until_delivered(url, within=60)
        delivered_after = time.monotonic() - committed
        for seed in range(3, 8):
            await make_traffic(url, [merchant], 1, clients=1, seed=seed)
            await asyncio.sleep(0.3)
        await wait_until_delivered(url, within=60)
        assert relay.stop() == 0, relay.log()
    finally:
        relay.close()
    log = relay.log_path.read_text(errors="replace")
    late = _relay_records(log, back_wall + GRACE)
    print(f"relay: listening again {listening_after} s after the restart; an event committed "
          f"{GRACE} s after it delivered in {delivered_after:.2f} s; late warnings: {late}")
    assert not late, f"the relay still failed {GRACE} s after the server was back: {late}"
    assert listening_after is not None and listening_after <= GRACE, (
        f"the relay's LISTEN came back {listening_after} s after the server"
    )


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_paymentsctl_works_as_soon_as_the_server_accepts_connections(
    pg_cluster: PgCluster, mode: str
) -> None:
    """paymentsctl opens one connection per command, so nothing of the old server lingers; the
    first command after `pg_ctl start` succeeds."""
    url = pg_cluster.migrate()
    assert run_ctl(url, "outbox", "status").returncode == 0
    pg_cluster.restart(mode)
    for args in (("outbox", "status", "--json"), ("outbox", "dead"),
                 ("outbox", "purge", "--older-than", "7d"), ("merchant", "create", "After")):
        result = run_ctl(url, *args)
        assert result.returncode == 0, (args, result.stderr)
