"""Claim latency before, during and after a purge of 1,000,000 delivered deliveries (issue 4).

    python -m bench.purge_latency [--rows 1000000] [--before 60] [--after 60] [--interleave 5]
                                  [--json PATH]

What it does, on the local PostgreSQL (`--server-url`, default the local socket), durability on
(the server's own fsync/synchronous_commit; the figures say which):

1. creates a dedicated database and migrates it;
2. writes `--rows` delivered webhook deliveries older than the retention, with their events,
   subjects and one attempt-log row each, straight in SQL with generate_series, then VACUUM
   ANALYZE, CHECKPOINT and sync (a long-running installation has vacuumed tables, and the load's
   write-back must not land in the first phase);
3. starts a webhook receiver (a child process answering 204), `--relays` real `outbox-relay`
   processes (their own purge timer off), and a payment stream of `--rate` payments per second
   (a child process calling the ledger service, so every payment publishes its three events and
   every event fans out to a '*' webhook endpoint and, for payment.succeeded, to `reports`);
4. times the relay's claim (`outbox.claim.claim_webhooks`, the statement and commit every relay
   runs) client-side every `--probe-interval` seconds, giving back at once whatever it claimed
   (`outbox.claim.release`), so the relays still deliver everything; each timing is tagged with
   the purge step running at the time (from pg_stat_activity);
5. phases: `--before` seconds, then `paymentsctl outbox purge --older-than 7d` as a subprocess
   ("during" lasts until it exits), then `--after` seconds. With `--interleave S` the purge is
   stopped (SIGSTOP) every other window of S seconds: the claims of those "paused" windows are a
   control taken under the same background load (the machine may be shared), the first second of
   each pause left out while the statement under way finishes;
6. prints p50/p90/p99/max claim latency per phase and per purge step, the ratios during/before
   (and running/paused), webhooks delivered per second per phase, and the purge's own counts and
   duration; drops the database.

The acceptance (issue 4): the p99 claim latency during the purge within 2x of before; the exit
status is 1 when it is not. `--explain` adds EXPLAIN (ANALYZE, BUFFERS) of the claim statement
before and during the purge (run in a rolled-back transaction). `--purge keyed` replaces the
product's purge by an experiment (each batch deletes its deliveries' events too, by key, with an
optional pause between batches) to compare against.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import os
import platform
import secrets
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
RETENTION = "7d"
CHUNK = 100_000
_ACCOUNT_PAIRS = 8


# --- the database -------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}/{name}{query}"


def create_database(server_url: str) -> tuple[str, str]:
    from db.migrate import upgrade

    name = f"bench_purge_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(server_url, autocommit=True) as server:
        server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_database(server_url, name)
    upgrade(url)
    return name, url


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as server:
        server.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def add_endpoint(url: str, merchant_id: str, hook_url: str) -> str:
    """A '*' webhook endpoint as the API creates it: the endpoint row and its consumer row."""
    from ledger.ids import new_id
    from outbox.signing import new_secret

    endpoint_id = new_id("we")
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO webhook_endpoints (id, merchant_id, url, event_types, secret)"
            " VALUES (%s, %s, %s, %s, %s)",
            (endpoint_id, merchant_id, hook_url, ["*"], new_secret()),
        )
        conn.execute(
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
            " VALUES (%s, 'webhook', %s, %s)",
            (endpoint_id, merchant_id, ["*"]),
        )
    return endpoint_id


# Three events per payment subject, as a payment's subject would carry over its life; every
# delivery delivered 50 ms after its event, all of it older than the retention (8 days and more).
_HISTORY_EVENTS = """
INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)
SELECT 'evt_hist' || lpad(g::text, 10, '0'), %(merchant)s, 'payment.succeeded',
       'pay_hist' || lpad((g / 3)::text, 10, '0'), g %% 3 + 1,
       now() - interval '8 days' - g * interval '400 ms',
       jsonb_build_object(
           'id', 'pay_hist' || lpad((g / 3)::text, 10, '0'), 'object', 'payment',
           'source', 'acct_hist_source', 'destination', 'acct_hist_destination',
           'amount', g %% 100000 + 1, 'amount_refunded', 0, 'currency', 'USD',
           'status', 'succeeded', 'failure_code', null, 'description', null,
           'metadata', '{}'::jsonb,
           'created_at', to_char(now() - interval '8 days' - g * interval '400 ms',
                                 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g
"""

_HISTORY_DELIVERIES = """
INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, status, attempts,
                               next_attempt_at, last_attempt_at, last_status_code,
                               delivered_at, created_at)
SELECT %(consumer)s, e.id, e.subject, e.sequence, 'delivered', 1,
       e.time, e.time + interval '50 ms', 204, e.time + interval '50 ms', e.time
FROM outbox.events e
WHERE e.id BETWEEN 'evt_hist' || lpad(%(lo)s::bigint::text, 10, '0')
              AND 'evt_hist' || lpad(%(hi)s::bigint::text, 10, '0')
"""

_HISTORY_ATTEMPTS = """
INSERT INTO outbox.attempts (consumer, event_id, attempted_at, status_code, latency_ms)
SELECT %(consumer)s, e.id, e.time + interval '50 ms', 204, 12
FROM outbox.events e
WHERE e.id BETWEEN 'evt_hist' || lpad(%(lo)s::bigint::text, 10, '0')
              AND 'evt_hist' || lpad(%(hi)s::bigint::text, 10, '0')
"""

_HISTORY_SUBJECTS = """
INSERT INTO outbox.subjects (subject, last_sequence)
SELECT subject, max(sequence) FROM outbox.events WHERE id LIKE 'evt_hist%%' GROUP BY subject
"""


def load_history(url: str, rows: int, merchant_id: str, consumer: str) -> float:
    """`rows` delivered deliveries older than the retention; returns the seconds it took."""
    start = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for lo in range(0, rows, CHUNK):
            hi = min(lo + CHUNK, rows) - 1
            params = {"merchant": merchant_id, "consumer": consumer, "lo": lo, "hi": hi}
            with conn.transaction():
                conn.execute(_HISTORY_EVENTS, params)
                conn.execute(_HISTORY_DELIVERIES, params)
                conn.execute(_HISTORY_ATTEMPTS, params)
            _progress(f"history: {hi + 1:,} of {rows:,} delivered deliveries written")
        conn.execute(_HISTORY_SUBJECTS)
        for table in ("outbox.events", "outbox.deliveries", "outbox.attempts", "outbox.subjects"):
            conn.execute(f"VACUUM (ANALYZE) {table}")
        conn.execute("CHECKPOINT")
    # The load leaves a gigabyte of dirty pages in the OS cache; their write-back would land in
    # the "before" phase.
    os.sync()
    return time.perf_counter() - start


# --- an experimental purge, for comparison (--purge keyed) --------------------------------------

# The events of the deliveries a batch just deleted, in the same transaction: index probes on
# pk_events and ix_deliveries_event_id instead of admin.retention's anti-join over both tables.
# (Events that never had a delivery would need a pass of their own; the history here has none.)
_KEYED_EVENTS = """
DELETE FROM outbox.events e
WHERE e.id = ANY(%(event_ids)s::text[]) AND e.time < %(cutoff)s
  AND NOT EXISTS (SELECT 1 FROM outbox.deliveries d WHERE d.event_id = e.id)
"""


def keyed_purge(url: str, older_than: str, batch_size: int, pause: float) -> dict[str, int]:
    """admin.retention's delivery batches, each also deleting its own events, with `pause` times
    the batch's duration slept between batches. Not the product's purge: an experiment."""
    from admin.retention import PURGE_DELIVERIES, PURGE_DELIVERY_ATTEMPTS, parse_duration

    counts = {"deliveries": 0, "events": 0, "attempts": 0}
    with psycopg.connect(url, autocommit=True, application_name="paymentsctl") as conn:
        row = conn.execute("SELECT now() - %s::interval", (parse_duration(older_than),)).fetchone()
        assert row is not None
        params: dict[str, Any] = {"cutoff": row[0], "batch_size": batch_size}
        while True:
            started = time.perf_counter()
            with conn.transaction():
                gone = conn.execute(PURGE_DELIVERIES, params).fetchall()
                if gone:
                    events = [e for _, e in gone]
                    cur = conn.execute(PURGE_DELIVERY_ATTEMPTS,
                                       {"consumers": [c for c, _ in gone], "event_ids": events})
                    counts["attempts"] += max(cur.rowcount, 0)
                    cur = conn.execute(_KEYED_EVENTS, {**params, "event_ids": events})
                    counts["events"] += max(cur.rowcount, 0)
            counts["deliveries"] += len(gone)
            if len(gone) < batch_size:
                return counts
            if pause:
                time.sleep(pause * (time.perf_counter() - started))


# --- child processes: receiver and payment stream -----------------------------------------------


def _receiver_main(port: int, counter: Any) -> None:
    """Answers every POST with 204 and counts them."""
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        with counter.get_lock():
            counter.value += 1
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                handle_signals=True)


def _stream_main(url: str, merchant_id: str, rate: float, counter: Any) -> None:
    """`rate` payments per second between a few funded account pairs, until SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_stream(url, merchant_id, rate, counter))


async def _stream(url: str, merchant_id: str, rate: float, counter: Any) -> None:
    from psycopg_pool import AsyncConnectionPool

    from ledger import service

    merchant = service.Merchant(merchant_id)
    async with AsyncConnectionPool(url, min_size=2, max_size=4, open=False) as pool:

        async def in_tx(fn: Any, *args: Any) -> Any:
            async with pool.connection() as conn, conn.transaction():
                return await fn(conn, *args)

        pairs = []
        for _ in range(_ACCOUNT_PAIRS):
            a = (await in_tx(service.create_account, merchant, "USD", {}))["id"]
            b = (await in_tx(service.create_account, merchant, "USD", {}))["id"]
            await in_tx(service.create_deposit, merchant, a, 10**12, "USD")
            await in_tx(service.create_deposit, merchant, b, 10**12, "USD")
            pairs.append((a, b))
        period = 1.0 / rate
        next_at = time.monotonic()
        n = 0
        while True:
            a, b = pairs[n % len(pairs)]
            src, dst = (a, b) if (n // len(pairs)) % 2 == 0 else (b, a)
            try:
                await in_tx(service.create_payment, merchant, src, dst, 1 + n % 500, "USD")
                with counter.get_lock():
                    counter.value += 1
            except psycopg.Error as exc:
                print(f"stream: payment failed: {exc}", file=sys.stderr)
            n += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


# --- the probe ----------------------------------------------------------------------------------


@dataclass
class Sample:
    phase: str
    step: str
    at: float
    latency_ms: float
    claimed: int


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    claims: int = 0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    mean_ms: float = 0.0
    claimed_rows: int = 0
    webhooks_per_s: float = 0.0
    payments_per_s: float = 0.0
    loadavg_1m: float = 0.0


@dataclass
class Probe:
    url: str
    interval: float
    samples: list[Sample] = field(default_factory=list)
    phase: str = "warmup"
    step: str = ""

    async def run(self, stop: asyncio.Event) -> None:
        from outbox import claim

        relay = f"purge-bench-probe:{os.getpid()}"
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            while not stop.is_set():
                started = time.perf_counter()
                claimed = await claim.claim_webhooks(
                    conn, limit=100, lease_seconds=60, relay=relay
                )
                elapsed = time.perf_counter() - started
                if claimed:
                    await claim.release(conn, claimed)
                self.samples.append(
                    Sample(self.phase, self.step, time.time(), elapsed * 1000, len(claimed))
                )
                try:
                    await asyncio.wait_for(stop.wait(), self.interval)
                except TimeoutError:
                    pass


# What the purge is doing, from its statement in pg_stat_activity (admin/retention.py).
_STEPS = (
    ("deliveries", "WHERE status = 'delivered' AND delivered_at <"),
    ("deliveries", "DELETE FROM outbox.attempts a\nUSING unnest"),
    ("events", "FROM outbox.events e"),
    ("deliveries + their events", "WHERE e.id = ANY("),
    ("orphan attempts", "WHERE a.attempted_at <"),
)


async def watch_purge(url: str, probe: Probe, stop: asyncio.Event) -> None:
    """Tag the probe's samples with the purge step running at the time (polled every 0.2 s)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while not stop.is_set():
            cur = await conn.execute(
                "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'paymentsctl' AND backend_type = 'client backend'"
            )
            for (query,) in await cur.fetchall():
                for step, marker in _STEPS:
                    if marker in (query or ""):
                        probe.step = step
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarise(
    name: str, samples: Sequence[Sample], seconds: float, step: str | None = None
) -> Phase:
    chosen = [s for s in samples if s.phase == name and (step is None or s.step == step)]
    latencies = [s.latency_ms for s in chosen]
    return Phase(
        name=name,
        seconds=round(seconds, 1),
        claims=len(latencies),
        p50_ms=round(_percentile(latencies, 0.50), 3),
        p90_ms=round(_percentile(latencies, 0.90), 3),
        p99_ms=round(_percentile(latencies, 0.99), 3),
        max_ms=round(max(latencies, default=0.0), 3),
        mean_ms=round(statistics.fmean(latencies), 3) if latencies else 0.0,
        claimed_rows=sum(s.claimed for s in chosen),
    )


async def explain_claim(url: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim statement, in a transaction that is rolled back."""
    from outbox.claim import CLAIM_WEBHOOKS

    params = {"busy": [], "limit": 100, "lease": 60, "token": uuid.UUID(int=0),
              "relay": "purge-bench-explain"}
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + CLAIM_WEBHOOKS, params)
        plan = "\n".join(row[0] for row in await cur.fetchall())
        await conn.rollback()
    return plan


# --- the run ------------------------------------------------------------------------------------


def machine(url: str) -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = next(
        (int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
         if line.startswith("MemTotal:")),
        0,
    )
    settings = ("server_version", "fsync", "synchronous_commit", "full_page_writes",
                "wal_level", "shared_buffers", "max_wal_size", "checkpoint_timeout",
                "autovacuum", "data_directory")
    with psycopg.connect(url) as conn:
        values = {name: conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                  for name in settings}
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgresql": values,
    }


def _progress(message: str) -> None:
    print(f"[purge-bench] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ledger.merchants import create_merchant

    name, url = create_database(args.server_url)
    _progress(f"database {name}")
    procs: list[subprocess.Popen[bytes]] = []
    children: list[Any] = []
    logdir = Path(tempfile.mkdtemp(prefix="purge-bench-"))
    try:
        info = machine(url)
        with psycopg.connect(url) as conn:
            merchant_id = create_merchant(conn, "purge bench").merchant_id
        port = _free_port()
        ctx = multiprocessing.get_context("spawn")
        delivered = ctx.Value("q", 0)
        payments = ctx.Value("q", 0)
        receiver = ctx.Process(target=_receiver_main, args=(port, delivered), daemon=True)
        receiver.start()
        children.append(receiver)
        _wait_port(port)
        consumer = add_endpoint(url, merchant_id, f"http://127.0.0.1:{port}/hook")

        load_seconds = load_history(url, args.rows, merchant_id, consumer)
        _progress(f"history loaded in {load_seconds:.0f} s")
        with psycopg.connect(url) as conn:
            sizes = {
                t: conn.execute("SELECT pg_size_pretty(pg_total_relation_size(%s))",
                                (t,)).fetchone()[0]  # type: ignore[index]
                for t in ("outbox.events", "outbox.deliveries", "outbox.attempts")
            }

        env = {
            **os.environ,
            "DATABASE_URL": url,
            "OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "OUTBOX_PURGE_INTERVAL": "0",
        }
        for i in range(args.relays):
            with open(logdir / f"relay{i}.log", "wb") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "relay", "--concurrency", "32"],
                    cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                    stderr=subprocess.STDOUT,
                ))
        stream = ctx.Process(
            target=_stream_main, args=(url, merchant_id, args.rate, payments), daemon=True
        )
        stream.start()
        children.append(stream)

        measured = asyncio.run(measure(args, url, env, delivered, payments))
        with psycopg.connect(url) as conn:
            left: dict[str, int] = dict(conn.execute(
                "SELECT status, count(*) FROM outbox.deliveries GROUP BY status"
            ).fetchall())
        return {
            "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "command": "python -m bench.purge_latency " + shlex.join(sys.argv[1:]),
            "machine": info,
            "rows": args.rows,
            "history_load_seconds": round(load_seconds, 1),
            "table_sizes_before": sizes,
            "relays": args.relays,
            "stream_payments_per_s": args.rate,
            **measured,
            "deliveries_left": left,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join(10)
        if args.keep_database:
            _progress(f"kept database {name}")
        else:
            drop_database(args.server_url, name)
        _progress(f"relay logs in {logdir}")


async def measure(
    args: argparse.Namespace, url: str, env: dict[str, str], delivered: Any, payments: Any
) -> dict[str, Any]:
    """The probe through the phases before, during and after the purge."""
    probe = Probe(url, args.probe_interval)
    stop = asyncio.Event()
    probe_task = asyncio.create_task(probe.run(stop))
    marks: dict[str, tuple[float, int, int, float]] = {}

    def mark(phase: str) -> None:
        marks[phase] = (time.monotonic(), delivered.value, payments.value, os.getloadavg()[0])
        probe.phase = phase

    await asyncio.sleep(args.warmup)
    explains: dict[str, str] = {}
    if args.explain:
        explains["before"] = await explain_claim(url)
    _progress(f"before: {args.before:.0f} s")
    mark("before")
    await asyncio.sleep(args.before)

    _progress("during: paymentsctl outbox purge")
    mark("during")
    if args.purge == "product":
        purge_cmd = [sys.executable, "-m", "admin.cli", "outbox", "purge",
                     "--older-than", RETENTION, "--json"]
        if args.purge_batch_size:
            purge_cmd += ["--batch-size", str(args.purge_batch_size)]
    else:
        purge_cmd = [sys.executable, "-m", "bench.purge_latency", "--keyed-purge-only",
                     "--purge-batch-size", str(args.purge_batch_size or 5000),
                     "--purge-pause", str(args.purge_pause)]
    purge_started = time.monotonic()
    watch_stop = asyncio.Event()
    watcher = asyncio.create_task(watch_purge(url, probe, watch_stop))
    purge = await asyncio.create_subprocess_exec(
        *purge_cmd, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    finished = asyncio.create_task(purge.communicate())
    if args.explain:
        await asyncio.wait({finished}, timeout=min(5.0, args.interleave / 2 or 5.0))
        if not finished.done():
            explains["during"] = await explain_claim(url)
    # With --interleave, the purge is stopped (SIGSTOP) every other window: the claims of the
    # "paused" windows are the control, taken under the same background load as the others.
    running_seconds = 0.0
    while args.interleave:
        window = time.monotonic()
        await asyncio.wait({finished}, timeout=args.interleave)
        running_seconds += time.monotonic() - window
        if finished.done():
            break
        purge.send_signal(signal.SIGSTOP)
        probe.phase = "settling"  # the statement under way still runs in its backend
        await asyncio.sleep(min(1.0, args.interleave / 2))
        probe.phase = "paused"
        await asyncio.sleep(args.interleave - min(1.0, args.interleave / 2))
        purge.send_signal(signal.SIGCONT)
        probe.phase = "during"
    out, err = await finished
    purge_seconds = time.monotonic() - purge_started
    running_seconds = running_seconds or purge_seconds
    watch_stop.set()
    await watcher
    probe.step = ""
    if purge.returncode != 0:
        raise RuntimeError(f"purge failed ({purge.returncode}): {err.decode().strip()}")

    _progress(f"after: {args.after:.0f} s")
    mark("after")
    await asyncio.sleep(args.after)
    mark("end")
    stop.set()
    await probe_task

    phases = []
    for current, following in itertools.pairwise(["before", "during", "after", "end"]):
        t0, d0, p0, _ = marks[current]
        t1, d1, p1, load = marks[following]
        phase = summarise(current, probe.samples, t1 - t0)
        phase.webhooks_per_s = round((d1 - d0) / (t1 - t0), 1)
        phase.payments_per_s = round((p1 - p0) / (t1 - t0), 1)
        phase.loadavg_1m = round(load, 2)
        phases.append(phase)
    before, during = phases[0], phases[1]
    phases[1].seconds = round(running_seconds, 1)
    paused = None
    if args.interleave:
        paused_seconds = purge_seconds - running_seconds
        paused = summarise("paused", probe.samples, paused_seconds)
        phases.insert(2, paused)
    steps = []
    for step in dict.fromkeys(s.step for s in probe.samples if s.phase == "during"):
        at = [s.at for s in probe.samples if s.phase == "during" and s.step == step]
        part = summarise("during", probe.samples, max(at) - min(at), step)
        part.name = f"during: {step or 'starting'}"
        steps.append(part)
    return {
        "purge": {"seconds": round(purge_seconds, 1), "result": json.loads(out),
                  "how": args.purge if args.purge == "product" else
                  f"keyed (experiment), pause {args.purge_pause}x",
                  "batch_size": args.purge_batch_size or "default"},
        "phases": [asdict(p) for p in phases],
        "purge_steps": [asdict(p) for p in steps],
        "ratio_p50": round(during.p50_ms / before.p50_ms, 2) if before.p50_ms else None,
        "ratio_p99": round(during.p99_ms / before.p99_ms, 2) if before.p99_ms else None,
        "paired_ratio_p50": round(during.p50_ms / paused.p50_ms, 2) if paused else None,
        "paired_ratio_p99": round(during.p99_ms / paused.p99_ms, 2) if paused else None,
        "interleave_seconds": args.interleave,
        "explain": explains,
    }


def render(result: dict[str, Any]) -> str:
    m = result["machine"]
    pg = m["postgresql"]
    lines = [
        f"date      {result['date']}",
        f"command   {result['command']}",
        f"machine   {m['cpu']}, {m['nproc']} CPUs, {m['memory_gib']} GiB, Linux {m['kernel']},"
        f" Python {m['python']}",
        f"postgres  {pg['server_version']}, fsync={pg['fsync']},"
        f" synchronous_commit={pg['synchronous_commit']},"
        f" full_page_writes={pg['full_page_writes']}, shared_buffers={pg['shared_buffers']},"
        f" max_wal_size={pg['max_wal_size']}",
        f"history   {result['rows']:,} delivered deliveries (+ events, attempts) in"
        f" {result['history_load_seconds']} s; sizes {result['table_sizes_before']}",
        f"traffic   {result['relays']} relay(s), {result['stream_payments_per_s']} payments/s",
        f"purge     {result['purge']['how']}, batch size {result['purge']['batch_size']}:"
        f" {result['purge']['seconds']} s, {result['purge']['result']}",
        "",
        f"{'phase':8} {'seconds':>8} {'claims':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}"
        f" {'max ms':>8} {'webhooks/s':>11} {'payments/s':>11} {'load':>5}",
    ]
    for p in result["phases"]:
        # The paused windows are spread through the purge: no rates of their own.
        rates = (("-", "-", "-") if p["name"] == "paused"
                 else (p["webhooks_per_s"], p["payments_per_s"], p["loadavg_1m"]))
        lines.append(
            f"{p['name']:8} {p['seconds']:>8} {p['claims']:>7} {p['p50_ms']:>8} {p['p90_ms']:>8}"
            f" {p['p99_ms']:>8} {p['max_ms']:>8} {rates[0]:>11} {rates[1]:>11} {rates[2]:>5}"
        )
    for p in result["purge_steps"]:
        lines.append(
            f"  {p['name']:22} {p['seconds']:>6} s {p['claims']:>6} claims, p50 {p['p50_ms']} ms,"
            f" p90 {p['p90_ms']} ms, p99 {p['p99_ms']} ms, max {p['max_ms']} ms"
        )
    lines.append("")
    lines.append(
        f"during/before: p50 x{result['ratio_p50']}, p99 x{result['ratio_p99']}"
        f" (acceptance: p99 within 2x) -> {'PASS' if verdict(result) else 'FAIL'}"
    )
    if result["interleave_seconds"]:
        lines.append(
            f"purge running / purge paused, {result['interleave_seconds']} s windows"
            f" interleaved: p50 x{result['paired_ratio_p50']},"
            f" p99 x{result['paired_ratio_p99']}"
        )
    lines.append(f"deliveries left: {result['deliveries_left']}")
    for phase, plan in result["explain"].items():
        lines += ["", f"EXPLAIN of the claim, {phase} the purge:", plan]
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> bool:
    ratio = result["ratio_p99"]
    return ratio is not None and ratio <= 2.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.purge_latency",
        description="Claim latency before, during and after purging delivered deliveries.",
    )
    parser.add_argument("--server-url", default=os.environ.get("BENCH_SERVER_URL",
                                                               "postgresql:///postgres"),
                        help="maintenance database of the server (default: local socket)")
    parser.add_argument("--rows", type=int, default=1_000_000,
                        help="delivered deliveries to purge (default 1,000,000)")
    parser.add_argument("--relays", type=int, default=1, help="outbox-relay processes (default 1)")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="payments per second while measuring (default 20)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--before", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--after", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--probe-interval", type=float, default=0.01,
                        help="seconds between timed claims (default 0.01)")
    parser.add_argument("--purge-batch-size", type=int, default=None,
                        help="paymentsctl outbox purge --batch-size (default: its own)")
    parser.add_argument("--purge", choices=("product", "keyed"), default="product",
                        help="product: paymentsctl outbox purge (default); keyed: an experiment"
                        " deleting each batch's events with its deliveries")
    parser.add_argument("--purge-pause", type=float, default=0.0,
                        help="keyed only: sleep this many times each batch's duration")
    parser.add_argument("--interleave", type=float, default=0.0, metavar="SECONDS",
                        help="stop the purge (SIGSTOP) every other window of this many seconds,"
                        " for a control measured under the same background load")
    parser.add_argument("--keyed-purge-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--explain", action="store_true",
                        help="EXPLAIN (ANALYZE, BUFFERS) the claim before and during the purge")
    parser.add_argument("--json", type=Path, help="also write the result as JSON here")
    parser.add_argument("--keep-database", action="store_true")
    args = parser.parse_args(argv)
    if args.keyed_purge_only:
        counts = keyed_purge(os.environ["DATABASE_URL"], RETENTION,
                             args.purge_batch_size or 5000, args.purge_pause)
        print(json.dumps(counts))
        return 0
    if args.rows < 1 or args.relays < 0 or args.rate <= 0:
        parser.error("--rows and --rate must be positive, --relays at least 0")
    result = run(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if verdict(result) else 1


if __name__ == "__main__":
    sys.exit(main())
