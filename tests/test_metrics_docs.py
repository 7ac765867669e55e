"""The metrics table of docs/operations.md against what the two endpoints really serve.

A real `payments-api` and a real `outbox-relay --metrics-port` (subprocesses) are scraped after
real traffic through the API: payments, a refund, a webhook delivered to a local receiver and one
that dies. Every metric in the table must be served by the endpoints it names, with its type and
labels; every metric served must be in the table. The table is parsed from the document, so the
two cannot drift apart.

Then the API's backlog gauges on their own: the same figures as the relay's, gone with their
consumer, and /metrics still answering (with `payments_api_database_up 0`) when the database
does not; and the request counters of several workers summed in multiprocess mode.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from api.app import create_app
from ledger.merchants import NewKey
from tests.apihelpers import Api, created
from tests.relayhelpers import ROOT, RelayProcess, delivery_counts
from tests.support import free_port
from tests.support.receiver import Receiver
from tests.support.tcpproxy import TcpProxy

DOC = ROOT / "docs" / "operations.md"
SERVERS = {"API": "api", "relay": "relay"}


# --- the document ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Documented:
    name: str
    type: str
    labels: frozenset[str]
    served_by: frozenset[str]


def documented_metrics(text: str | None = None) -> dict[str, Documented]:
    """The rows of the first table under "## Metrics" whose header starts with "metric"."""
    text = DOC.read_text() if text is None else text
    match = re.search(r"^## Metrics\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "docs/operations.md has no '## Metrics' section"
    lines = match.group(1).splitlines()
    start = next(
        (i for i, line in enumerate(lines) if re.match(r"^\|\s*metric\s*\|", line)), None
    )
    assert start is not None, "no metrics table (header '| metric | type | labels | ...')"
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    assert header[:4] == ["metric", "type", "labels", "served by"], header
    out: dict[str, Documented] = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        labels = frozenset(re.findall(r"`([a-z_]+)`", cells[2]))
        if not labels:
            assert cells[2] == "none", f"{name}: labels must be `a`, `b` or none: {cells[2]!r}"
        served = frozenset(SERVERS[s.strip()] for s in cells[3].split(","))
        assert name not in out, f"{name} is in the table twice"
        out[name] = Documented(name, cells[1], labels, served)
    assert out, "the metrics table is empty"
    return out


def test_the_table_parses() -> None:
    table = documented_metrics()
    for name in ("outbox_pending", "outbox_in_flight", "outbox_dead",
                 "outbox_oldest_pending_age_seconds"):
        assert table[name].served_by == {"api", "relay"}, name
        assert table[name].labels == {"consumer"}
    assert "payments_api_database_up" in table
    assert {d.type for d in table.values()} <= {"counter", "gauge", "histogram"}


# --- scraping -------------------------------------------------------------------------------------


@dataclass
class Family:
    type: str
    labels: set[str] = field(default_factory=set)
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def parse(text: str) -> dict[str, Family]:
    """Families by the name an operator queries: counters with `_total`, histograms bare."""
    out: dict[str, Family] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        entry = out.setdefault(name, Family(family.type))
        for sample in family.samples:
            entry.samples.append((sample.name, dict(sample.labels), sample.value))
            entry.labels |= set(sample.labels) - {"le"}
    return out


def value(families: Mapping[str, Family], name: str, **labels: str) -> float | None:
    """The sample `name{labels}` (exactly these labels), None when it is not served."""
    family = families.get(name)
    for sample_name, sample_labels, sample_value in family.samples if family else ():
        if sample_name == name and sample_labels == labels:
            return sample_value
    return None


def _created_companion(name: str, documented: Mapping[str, Documented]) -> bool:
    """`x_created` of a documented counter `x_total` or histogram `x`."""
    if not name.endswith("_created"):
        return False
    base = name.removesuffix("_created")
    return base in documented or base + "_total" in documented


def check_against_table(
    server: str, families: Mapping[str, Family], table: Mapping[str, Documented],
    *, skip: Sequence[str] = (),
) -> None:
    expected = {
        name: d for name, d in table.items()
        if server in d.served_by and not name.startswith(tuple(skip))
    }
    problems = []
    for name, doc in expected.items():
        family = families.get(name)
        if family is None:
            problems.append(f"{name}: documented for {server}, not served")
            continue
        if family.type != doc.type:
            problems.append(f"{name}: documented as {doc.type}, served as {family.type}")
        if not family.samples:
            problems.append(f"{name}: served without any sample")
        if family.labels != doc.labels:
            problems.append(f"{name}: documented labels {sorted(doc.labels)}, "
                            f"served {sorted(family.labels)}")
    for name in families:
        if name in expected or _created_companion(name, expected):
            continue
        problems.append(f"{name}: served by {server}, not in the table of docs/operations.md")
    assert not problems, "\n".join(problems)


def scrape(url: str) -> dict[str, Family]:
    resp = httpx.get(url, timeout=20)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return parse(resp.text)


# --- a real payments-api --------------------------------------------------------------------------


@dataclass
class ApiProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait(10)


@contextlib.contextmanager
def api_process(
    db_url: str, tmp: Path, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None,
    name: str = "api",
) -> Iterator[ApiProcess]:
    """`payments-api` (as `python -m api`) on a free port, stdout and stderr in one log file;
    up when /healthz answers, SIGTERM afterwards."""
    port = free_port()
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "api", "--port", str(port), *args],
            cwd=ROOT,
            env={**os.environ, "DATABASE_URL": db_url, **(env or {})},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = ApiProcess(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"payments-api exited:\n{running.log()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{running.url}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"payments-api did not start:\n{running.log()}"
            time.sleep(0.05)
        yield running
    finally:
        running.stop()


def register_endpoint(api: Api, receiver: Receiver, path: str, *, default: int = 204) -> str:
    """A '*' webhook endpoint created through the API, answered by `receiver` at `path`."""
    body = created(api.post("/v1/webhook_endpoints",
                            {"url": receiver.url(path), "event_types": ["*"]}))
    receiver.add_endpoint(path, body["secret"], default=default)
    endpoint_id: str = body["id"]
    return endpoint_id


def wait_settled(db_url: str, timeout: float = 60.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = delivery_counts(db_url)
        if not counts.get("pending"):
            return counts
        assert time.monotonic() < deadline, f"still pending after {timeout} s: {counts}"
        time.sleep(0.1)


# --- the tests ----------------------------------------------------------------------------------


def test_both_endpoints_serve_exactly_the_documented_metrics(
    db_url: str, merchant: NewKey, receiver: Receiver, tmp_path: Path
) -> None:
    table = documented_metrics()
    env = {"OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}
    metrics_port = free_port()
    relay = RelayProcess(db_url, tmp_path, args=["--metrics-port", str(metrics_port)])
    with api_process(db_url, tmp_path, env=env) as server, \
            httpx.Client(base_url=server.url, timeout=20) as client:
        api = Api(client, merchant.api_key)
        ok = register_endpoint(api, receiver, "/ok")
        failing = register_endpoint(api, receiver, "/failing", default=500)
        try:
            relay.start().wait_ready()
            source = api.funded_account(100_000)
            destination = api.account()
            payments = [api.payment(source["id"], destination["id"], 100 + i) for i in range(3)]
            assert api.refund(payments[0]["id"], 50).status_code == 201
            assert api.get("/v1/payments/pay_doesnotexist").status_code == 404
            assert api.pay(source["id"], destination["id"], 10**15).status_code == 402

            wait_settled(db_url)
            with psycopg.connect(db_url) as conn:
                per_consumer: dict[str, int] = dict(conn.execute(
                    "SELECT consumer, count(*) FROM outbox.deliveries GROUP BY consumer"
                ).fetchall())
            events_per_endpoint = per_consumer[ok]
            assert per_consumer[failing] == events_per_endpoint
            receiver.wait_for(events_per_endpoint, path="/ok", timeout=30)

            # The relay refreshes its backlog gauges every 5 s.
            relay_url = f"http://127.0.0.1:{metrics_port}/metrics"
            deadline = time.monotonic() + 30
            while True:
                relay_families = scrape(relay_url)
                if value(relay_families, "outbox_dead", consumer=failing) == events_per_endpoint:
                    break
                assert time.monotonic() < deadline, "the relay's gauges never caught up"
                time.sleep(0.5)
            api_families = scrape(f"{server.url}/metrics")
        finally:
            relay.close()

    check_against_table("api", api_families, table)
    check_against_table("relay", relay_families, table)

    # The same figures under the same names, whichever endpoint is scraped: per consumer on the
    # relay; on the API (no key needed) handlers by name and all webhook endpoints summed.
    for name in ("outbox_pending", "outbox_in_flight", "outbox_dead",
                 "outbox_oldest_pending_age_seconds"):
        assert value(api_families, name, consumer="reports") == \
            value(relay_families, name, consumer="reports"), name
        relay_webhooks = [value(relay_families, name, consumer=c) or 0 for c in (ok, failing)]
        combined = max(relay_webhooks) if name.endswith("_seconds") else sum(relay_webhooks)
        assert value(api_families, name, consumer="webhooks") == combined, name
        api_consumers = {labels.get("consumer") for _, labels, _ in api_families[name].samples}
        assert ok not in api_consumers and failing not in api_consumers, name
    assert value(relay_families, "outbox_dead", consumer=failing) == events_per_endpoint
    assert value(api_families, "outbox_dead", consumer="webhooks") == events_per_endpoint
    assert value(api_families, "payments_api_database_up") == 1
    assert value(relay_families, "outbox_deliveries_total", outcome="delivered") == \
        events_per_endpoint
    assert (value(relay_families, "outbox_deliveries_total", outcome="dead") or 0) == \
        events_per_endpoint
    assert (value(api_families, "payments_api_requests_total", method="POST",
                  route="/v1/payments", status="201") or 0) == 3
    assert value(api_families, "payments_api_requests_total", method="POST",
                 route="/v1/payments", status="402") == 1
    assert value(api_families, "payments_api_requests_total", method="GET",
                 route="/v1/payments/{id}", status="404") == 1


@pytest.fixture
def app_client(db_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(db_url), raise_server_exceptions=False) as client:
        yield client


def test_webhook_endpoints_are_summed_and_never_named_on_the_api(
    app_client: TestClient, merchant: NewKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    api = Api(app_client, merchant.api_key)
    endpoint = created(api.post("/v1/webhook_endpoints",
                                {"url": "http://127.0.0.1:9/hook", "event_types": ["*"]}))
    api.funded_account(500)  # account.created, deposit.succeeded, account.balance_changed
    text = app_client.get("/metrics").text
    assert endpoint["id"] not in text  # /metrics needs no key: no merchant's object ids
    families = parse(text)
    assert value(families, "outbox_pending", consumer="webhooks") == 3
    assert value(families, "outbox_dead", consumer="webhooks") == 0
    assert value(families, "outbox_pending", consumer="reports") == 1
    age = value(families, "outbox_oldest_pending_age_seconds", consumer="webhooks")
    assert age is not None and 0 < age < 60

    assert api.delete(f"/v1/webhook_endpoints/{endpoint['id']}").status_code in (200, 204)
    families = parse(app_client.get("/metrics").text)
    for name in ("outbox_pending", "outbox_in_flight", "outbox_dead",
                 "outbox_oldest_pending_age_seconds"):
        consumers = {labels.get("consumer") for _, labels, _ in families[name].samples}
        assert consumers == {"reports"}, name  # no webhook endpoint left: no webhooks series


def test_metrics_answer_when_the_database_does_not(
    db_url: str, make_proxy: Callable[[str], TcpProxy]
) -> None:
    proxy = make_proxy(db_url)
    with TestClient(create_app(proxy.url_for(db_url)), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        families = parse(client.get("/metrics").text)
        assert value(families, "payments_api_database_up") == 1
        assert value(families, "outbox_pending", consumer="reports") == 0

        # Connections cut, new ones black-holed: every scrape still answers, within the
        # backlog query's bounds (2 s for a connection), without the backlog.
        proxy.cut()
        proxy.block("hang")
        for _ in range(2):
            started = time.monotonic()
            resp = client.get("/metrics")
            elapsed = time.monotonic() - started
            assert resp.status_code == 200, resp.text
            assert elapsed < 8, f"/metrics took {elapsed:.1f} s with the database away"
            families = parse(resp.text)
            assert value(families, "payments_api_database_up") == 0
            assert "outbox_pending" not in families
            assert "payments_api_requests_total" in families
            assert "payments_api_request_duration_seconds" in families

        proxy.unblock()
        deadline = time.monotonic() + 30
        while value(parse(client.get("/metrics").text), "payments_api_database_up") != 1:
            assert time.monotonic() < deadline, "database_up never came back"
            time.sleep(0.2)


def test_a_blocked_backlog_query_times_out(db_url: str, app_client: TestClient) -> None:
    """A backlog query stuck behind a lock gives up after the statement timeout (2 s)."""
    assert value(parse(app_client.get("/metrics").text), "payments_api_database_up") == 1
    with psycopg.connect(db_url) as locker:
        locker.execute("LOCK TABLE outbox.consumers IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        resp = app_client.get("/metrics")
        elapsed = time.monotonic() - started
        locker.rollback()
    assert resp.status_code == 200
    assert 1.5 < elapsed < 8, elapsed
    families = parse(resp.text)
    assert value(families, "payments_api_database_up") == 0
    assert "outbox_dead" not in families
    assert value(parse(app_client.get("/metrics").text), "payments_api_database_up") == 1


def test_several_workers_are_summed_in_multiprocess_mode(
    db_url: str, tmp_path: Path
) -> None:
    table = documented_metrics()
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    requests = 40
    with api_process(db_url, tmp_path, args=["--workers", "2"],
                     env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc)}) as server, \
            httpx.Client(base_url=server.url, timeout=20) as client:
        for _ in range(requests):
            # A new connection each time, so that both workers get some.
            assert httpx.get(f"{server.url}/openapi.json", timeout=20).status_code == 200
        pids = {p.name.split("_")[-1] for p in multiproc.glob("*.db")}
        assert len(pids) >= 2, f"one worker served everything: {sorted(multiproc.iterdir())}"
        for _ in range(6):
            families = parse(client.get("/metrics", headers={"Connection": "close"}).text)
            assert value(families, "payments_api_requests_total", method="GET",
                         route="/openapi.json", status="200") == requests
            assert value(families, "payments_api_database_up") == 1
        # One process's own figures are not served: they would jump between workers.
        check_against_table("api", families, table, skip=("process_", "python_"))


def _answers(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/metrics", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize(
    ("args", "reachable", "unreachable"),
    [
        ((), "127.0.0.1", "127.0.0.2"),
        (("--metrics-host", "127.0.0.2"), "127.0.0.2", "127.0.0.1"),
        (("--metrics-host", "0.0.0.0"), "127.0.0.2", None),
    ],
)
def test_the_relay_metrics_listen_on_127_0_0_1_unless_told_otherwise(
    db_url: str, tmp_path: Path, args: tuple[str, ...], reachable: str, unreachable: str | None
) -> None:
    """Its series name every webhook endpoint: by default only this host may read them. A
    socket bound to 127.0.0.1 refuses connections to 127.0.0.2 (another loopback address);
    one bound to 0.0.0.0 accepts them."""
    port = free_port()
    relay = RelayProcess(db_url, tmp_path, args=["--metrics-port", str(port), *args])
    try:
        relay.start().wait_ready()
        assert _answers(reachable, port), relay.log()
        if unreachable is not None:
            assert not _answers(unreachable, port)
    finally:
        relay.close()
