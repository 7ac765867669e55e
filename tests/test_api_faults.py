"""The API when its database fails, on a private cluster the test may stop, crash and reconfigure.

- The server stops (cleanly, or as a crash) under payment load: every answer is 201 or 503
  `unavailable` with `Retry-After`, never a 500; the API recovers on its own once the server is
  back; every payment that got a 201 exists afterwards; retrying the 503s with their
  Idempotency-Key makes each request take effect exactly once; money is conserved.
- The disk under the ledger tables fills up (a tablespace on a 4 MiB tmpfs, filled to the brim):
  writes answer 503 `unavailable`, never 500, nothing half-written; once space is freed the API
  writes again by itself, and the refused requests retried with their keys take effect once.
- The database turns read-only (`default_transaction_read_only`, as during a failover or a full
  disk guard): writes answer 503 `unavailable` with `Retry-After` (the decision documented in
  docs/reliability.md: the condition is the database's and temporary, like a stopped server),
  nothing is written, not even an idempotency key; reads keep working; writes resume when the
  database is writable again.
"""

from __future__ import annotations

import errno
import os
import pwd
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest

from ledger.merchants import NewKey, create_merchant
from tests.apihelpers import assert_conserved, query, snapshot
from tests.support.pgcluster import SERVER_USER, PgCluster
from tests.test_request_limits import ApiProcess, serve_api

THREADS = 4


@dataclass
class Outcome:
    key: str
    status: int
    body: dict[str, Any]
    retry_after: str | None
    at: float


@dataclass
class Load:
    """Payment traffic from a few threads, each request with its own Idempotency-Key."""

    api: ApiProcess
    api_key: str
    source: str
    destination: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(THREADS):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
            assert not thread.is_alive(), "a load thread hung"

    def count(self, status: int, since: float = 0.0) -> int:
        return sum(1 for o in list(self.outcomes) if o.status == status and o.at >= since)

    def wait_for(self, status: int, count: int, since: float, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while self.count(status, since) < count:
            assert time.monotonic() < deadline, (
                f"no {count} answers {status} within {timeout} s: "
                f"{sorted({o.status for o in self.outcomes if o.at >= since})}\n"
                f"{self.api.log()[-2000:]}"
            )
            time.sleep(0.05)
        return time.monotonic()

    def pay(self, client: httpx.Client, key: str) -> Outcome:
        resp = client.post(
            "/v1/payments",
            json={"source": self.source, "destination": self.destination, "amount": 1,
                  "currency": "USD"},
            headers={"Idempotency-Key": key},
        )
        try:
            body = resp.json()
        except ValueError:
            body = {"raw": resp.text[:300]}
        return Outcome(key, resp.status_code, body, resp.headers.get("retry-after"),
                       time.monotonic())

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.api_key}"})

    def _run(self) -> None:
        with self.client() as client:
            while not self.stop.is_set():
                try:
                    outcome = self.pay(client, str(uuid.uuid4()))
                except httpx.TransportError as exc:
                    outcome = Outcome("", -1, {"error": repr(exc)}, None, time.monotonic())
                self.outcomes.append(outcome)


@dataclass
class Setup:
    cluster: PgCluster
    url: str
    api: ApiProcess
    merchant: NewKey
    source: str
    destination: str


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    """A private cluster that keeps what it acknowledged through a crash of the server process:
    synchronous_commit on (the shared fixture turns it off for speed; a 201 on top of an
    unflushed commit can vanish in an immediate stop). fsync may stay off: the operating system
    keeps written WAL when only PostgreSQL dies."""
    with PgCluster(settings={"synchronous_commit": "on"}) as running:
        yield running


@pytest.fixture
def setup(cluster: PgCluster) -> Iterator[Setup]:
    pg_cluster = cluster
    url = pg_cluster.migrate()
    with psycopg.connect(url) as conn:
        merchant = create_merchant(conn, "Fault merchant")
    with serve_api(url) as api:
        auth = {"Authorization": f"Bearer {merchant.api_key}"}
        with httpx.Client(base_url=api.url, headers=auth, timeout=10) as client:
            source = client.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
            destination = client.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
            deposit = client.post("/v1/deposits", json={"account": source, "amount": 10**12,
                                                        "currency": "USD"})
            assert deposit.status_code == 201, deposit.text
        yield Setup(pg_cluster, url, api, merchant, source, destination)


def _assert_unavailable(outcome: Outcome) -> None:
    assert outcome.status == 503, outcome
    assert outcome.body.get("code") == "unavailable", outcome
    assert outcome.retry_after is not None and outcome.retry_after.isdigit(), outcome


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_server_stop_under_payment_load(setup: Setup, mode: str) -> None:
    s = setup
    load = Load(s.api, s.merchant.api_key, s.source, s.destination)
    load.start()
    try:
        load.wait_for(201, 20, since=0.0, timeout=30)
        s.cluster.stop(mode)  # "immediate" is a crash: recovery runs on the next start
        stopped = time.monotonic()
        load.wait_for(503, THREADS, since=stopped, timeout=30)
        with httpx.Client(base_url=s.api.url, timeout=10) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.headers.get("retry-after")
        s.cluster.start()
        restarted = time.monotonic()
        recovered = load.wait_for(201, 20, since=restarted, timeout=45)
    finally:
        load.finish()
    assert load.count(503) > 0, "the stop was never noticed"
    _check_outcomes_and_retry(s, load)
    with httpx.Client(base_url=s.api.url, timeout=10) as client:
        assert client.get("/readyz").status_code == 200
    print(f"{mode}: {load.count(201)} x 201, {load.count(503)} x 503, "
          f"recovered {recovered - restarted:.1f} s after the restart")


def _check_outcomes_and_retry(s: Setup, load: Load) -> None:
    """No answer but 201/503; each 503 is `unavailable` with Retry-After; every 201 exists; a
    retry of each 503 with its key takes effect once; money is conserved."""
    outcomes = list(load.outcomes)
    others = [o for o in outcomes if o.status not in (201, 503)]
    assert not others, f"answers other than 201 and 503: {others[:5]}"
    for outcome in outcomes:
        if outcome.status == 503:
            _assert_unavailable(outcome)
    paid = {o.body["id"]: o for o in outcomes if o.status == 201}
    assert len(paid) == load.count(201), "two requests got the same payment"
    rows = dict(query(s.url, "SELECT id, amount FROM payments WHERE id = ANY(%s)", (list(paid),)))
    assert set(rows) == set(paid), f"lost after a 201: {sorted(set(paid) - set(rows))[:5]}"
    with load.client() as client:
        for outcome in [o for o in outcomes if o.status == 503]:
            retried = load.pay(client, outcome.key)
            assert retried.status == 201, retried
    keys = {o.key for o in outcomes if o.key}
    total = query(s.url, "SELECT count(*) FROM payments")[0][0]
    assert total == len(keys), (total, len(keys))
    assert_conserved(s.url)


_MOVED_TABLES = ("ledger_entries", "payments", "idempotency_keys", "outbox.events",
                 "outbox.deliveries", "outbox.subjects")


def test_disk_full_under_payment_load(setup: Setup) -> None:
    s = setup
    mountpoint = tempfile.mkdtemp(prefix="pg-small-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                              mountpoint], capture_output=True, text=True)
    if mounted.returncode != 0:
        os.rmdir(mountpoint)
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    filler = os.path.join(mountpoint, "filler")
    try:
        owner = pwd.getpwnam(SERVER_USER) if os.geteuid() == 0 else None
        if owner is not None:
            os.chown(mountpoint, owner.pw_uid, owner.pw_gid)
        with psycopg.connect(s.url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLESPACE small LOCATION '{mountpoint}'")
            indexes = conn.execute(
                "SELECT schemaname || '.' || indexname FROM pg_indexes"
                " WHERE schemaname || '.' || tablename = ANY(%s)",
                ([t if "." in t else f"public.{t}" for t in _MOVED_TABLES],),
            ).fetchall()
            for table in _MOVED_TABLES:
                conn.execute(f"ALTER TABLE {table} SET TABLESPACE small")
            for (index,) in indexes:
                conn.execute(f"ALTER INDEX {index} SET TABLESPACE small")
        load = Load(s.api, s.merchant.api_key, s.source, s.destination)
        load.start()
        try:
            load.wait_for(201, 10, since=0.0, timeout=30)
            _fill(mountpoint, filler, leave=16384)
            full = time.monotonic()
            load.wait_for(503, THREADS, since=full, timeout=60)
            os.remove(filler)
            freed = time.monotonic()
            load.wait_for(201, 10, since=freed, timeout=45)
        finally:
            load.finish()
        assert "No space left on device" in s.cluster.log(), "the disk never filled up"
        _check_outcomes_and_retry(s, load)
        print(f"disk full: {load.count(201)} x 201, {load.count(503)} x 503")
    finally:
        if os.path.exists(filler):
            os.remove(filler)
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        os.rmdir(mountpoint)


def _fill(mountpoint: str, filler: str, leave: int) -> None:
    """Fill the file system up to `leave` free bytes. The server writes meanwhile (payments keep
    coming), so the space may run out before the filler is written: that is full too."""
    stat = os.statvfs(mountpoint)
    try:
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise


def _terminate_api_sessions(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE application_name = 'payments-api'")


def _set_read_only(s: Setup, on: bool) -> None:
    with psycopg.connect(s.cluster.server_url, autocommit=True) as conn:
        setting = "SET default_transaction_read_only = on" if on else (
            "RESET default_transaction_read_only")
        conn.execute(f"ALTER DATABASE {s.cluster.dbname} {setting}")
    # The setting applies to new sessions: the API's pooled connections must be replaced.
    _terminate_api_sessions(s.cluster.server_url)


def _until_ok(client: httpx.Client, method: str, path: str, ok: int, **kw: Any) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        resp = client.request(method, path, **kw)
        if resp.status_code == ok:
            return resp
        assert resp.status_code == 503, resp.text
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.1)


def test_read_only_database_refuses_writes_cleanly_and_serves_reads(setup: Setup) -> None:
    s = setup
    auth = {"Authorization": f"Bearer {s.merchant.api_key}"}
    with httpx.Client(base_url=s.api.url, headers=auth, timeout=15) as client:
        paid = client.post("/v1/payments", json={"source": s.source, "destination": s.destination,
                                                 "amount": 5, "currency": "USD"})
        assert paid.status_code == 201
        endpoint = client.post("/v1/webhook_endpoints",
                               json={"url": "https://93.184.216.34/h", "event_types": ["*"]})
        assert endpoint.status_code == 201

        _set_read_only(s, True)
        _until_ok(client, "GET", f"/v1/accounts/{s.source}", 200)
        before = snapshot(s.url)
        writes: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/v1/accounts", {"currency": "USD"}),
            ("POST", "/v1/deposits", {"account": s.source, "amount": 1, "currency": "USD"}),
            ("POST", "/v1/payments", {"source": s.source, "destination": s.destination,
                                      "amount": 1, "currency": "USD"}),
            ("POST", f"/v1/payments/{paid.json()['id']}/refunds", {"amount": 1}),
            ("POST", "/v1/payouts", {"account": s.source, "amount": 1, "currency": "USD"}),
            ("POST", "/v1/webhook_endpoints", {"url": "https://93.184.216.34/x",
                                               "event_types": ["*"]}),
            ("PATCH", f"/v1/webhook_endpoints/{endpoint.json()['id']}", {"status": "disabled"}),
            ("DELETE", f"/v1/webhook_endpoints/{endpoint.json()['id']}", {}),
        ]
        wrong = []
        for method, path, body in writes:
            for idem in (None, str(uuid.uuid4())):
                headers = {**auth, "Idempotency-Key": idem} if idem else auth
                # A fresh connection each: after a 500 uvicorn drops the connection.
                try:
                    resp = httpx.request(method, s.api.url + path, json=body or None,
                                         headers=headers, timeout=15)
                except httpx.TransportError as exc:
                    wrong.append(f"{method} {path} key={bool(idem)}: {exc!r}")
                    continue
                outcome = Outcome(idem or "", resp.status_code, resp.json(),
                                  resp.headers.get("retry-after"), 0.0)
                try:
                    _assert_unavailable(outcome)
                except AssertionError:
                    wrong.append(f"{method} {path} key={bool(idem)}: {resp.status_code}"
                                 f" {resp.text[:160]}")
        assert snapshot(s.url) == before, "a refused write left something behind"
        for path in (f"/v1/accounts/{s.source}", "/v1/accounts", "/v1/payments", "/v1/events",
                     f"/v1/payments/{paid.json()['id']}", "/v1/webhook_endpoints"):
            assert client.get(path).status_code == 200, path
        assert not wrong, "writes to a read-only database:\n" + "\n".join(wrong)

        _set_read_only(s, False)
        again = _until_ok(client, "POST", "/v1/payments", 201, json={
            "source": s.source, "destination": s.destination, "amount": 1, "currency": "USD"})
        assert again.json()["status"] == "succeeded"
    assert_conserved(s.url)
