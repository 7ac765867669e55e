"""The benchmark run: phases in a fixed order, each figure next to its baseline.

 1. set-up: databases, API, receiver, seeded accounts (API and pgbench each their own, same count)
 2. api: POST /v1/payments with an Idempotency-Key at a fixed client concurrency
 3. pgbench: the same SQL transaction (bench/pgbench.py) and its ledger part, same concurrency
 4. wake-up: the API (and pgbench) with a relay registered as asleep (every payment NOTIFYs)
    and with none
 5. handler drain: a backlog of payment.succeeded events for `reports`, drained by the relay
 6. pgqueuer drain: the same number of jobs, pgqueuer's own settings
 7. webhook drain: a backlog of webhook deliveries to the receiver
 8. pgqueuer throughput: enqueue and dequeue together
 9. end to end: 300 payments/s offered through the API, commit -> 204 at the receiver
10. fairness: one merchant's four endpoints hang past a short timeout with a backlog while
    another merchant's events flow: the other merchant's latency, the hanging ones' schedule
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench import database, httpload, machine, pgbench, procs
from bench.procs import Child
from bench.receiver import verify
from bench.stack import HOST, Api, Profiler, Receiver, Relays
from ledger.merchants import hash_key

Json = dict[str, Any]


@dataclass(frozen=True)
class Config:
    quick: bool
    base_url: str = "postgresql:///postgres"
    accounts: int = 1000
    concurrency: int = 32
    api_workers: int = 2
    api_seconds: float = 30.0
    warmup: float = 5.0
    wakeup_seconds: float = 15.0
    jobs: int = 50_000
    webhook_backlog: int = 20_000
    throughput_seconds: float = 30.0
    e2e_rate: float = 300.0
    e2e_seconds: float = 40.0
    relays: int = 1
    fairness_timeout: float = 2.0
    fairness_retry_wait: float = 10.0
    fairness_backlog: int = 30
    fairness_rate: float = 10.0
    fairness_events: int = 200
    fairness_burst: int = 40
    relay_concurrency: int = 32
    relay_batch: int = 100
    pgqueuer_drivers: tuple[str, ...] = ("apg", "psy")
    profile_dir: Path | None = None
    log_dir: Path = Path("bench-logs")
    only: frozenset[str] = frozenset()

    @classmethod
    def make(cls, quick: bool, **overrides: Any) -> Config:
        base: dict[str, Any]
        if quick:
            # Under 5 minutes on 2 shared cores (223 s measured at load 5-15); the drains keep
            # pgqueuer's default 50,000 jobs, its rate depends on the count.
            base = dict(api_seconds=12.0, warmup=3.0, wakeup_seconds=6.0, jobs=50_000,
                        webhook_backlog=5_000, throughput_seconds=10.0, e2e_seconds=15.0,
                        pgqueuer_drivers=("apg",))
        else:
            base = {}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(quick=quick, **base)

    def wants(self, phase: str) -> bool:
        return not self.only or phase in self.only


@dataclass
class Run:
    config: Config
    results: Json = field(default_factory=dict)
    usage: Json = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    db: database.Database | None = None
    pgq_db: database.Database | None = None
    merchant: str = ""
    api_key: str = ""
    accounts: list[str] = field(default_factory=list)
    api: Api | None = None
    receiver: Receiver | None = None
    relays: Relays | None = None
    endpoint_secret: str = ""
    postmaster: int = 0
    interrupted: str = ""

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def meter(self) -> machine.Meter:
        children: dict[str, int] = {}
        if self.api is not None:
            children["api"] = self.api.child.pid
        if self.receiver is not None:
            children["receiver"] = self.receiver.child.pid
        if self.relays is not None:
            for child in self.relays.children:
                children[child.name] = child.pid
        return machine.Meter(children, self.postmaster)


# --- set-up -------------------------------------------------------------------------------------


async def setup(run: Run) -> None:
    cfg = run.config
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    stale = database.drop_stale(cfg.base_url)
    if stale:
        run.say(f"dropped databases of earlier killed runs: {', '.join(stale)}")
    run.db = database.create(cfg.base_url, "payments")
    run.say(f"database {run.db.name}: migrating")
    database.migrate(run.db)
    run.merchant, run.api_key = database.create_merchant(run.db, "bench")
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_backend_pid()")
        row = await cur.fetchone()
        assert row is not None
        run.postmaster = machine.parent_of(row[0])
    run.receiver = Receiver(cfg.log_dir)
    run.api = Api(run.db.url, cfg.api_workers, cfg.log_dir)
    await run.receiver.ready()
    await run.api.ready()
    run.say(f"API up ({cfg.api_workers} uvicorn worker(s)) on port {run.api.port}; "
            f"seeding {cfg.accounts} accounts through it")
    host = f"{HOST}:{run.api.port}"
    auth = {"Authorization": f"Bearer {run.api_key}"}
    create = [httpload.render("POST", "/v1/accounts", host, b'{"currency":"USD"}', auth)
              for _ in range(cfg.accounts)]
    answers = await httpload.run_all(HOST, run.api.port, create, 16)
    for status, body in answers:
        if status != 201:
            raise RuntimeError(f"creating an account answered {status}: {body[:300]!r}")
        run.accounts.append(orjson.loads(body)["id"])
    deposits = [
        httpload.render("POST", "/v1/deposits", host,
                        orjson.dumps({"account": a, "amount": 10**12, "currency": "USD"}), auth)
        for a in run.accounts
    ]
    for status, body in await httpload.run_all(HOST, run.api.port, deposits, 16):
        if status != 201:
            raise RuntimeError(f"a deposit answered {status}: {body[:300]!r}")
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        await conn.execute(pgbench.SEED_SQL, {"merchant": run.merchant, "n": cfg.accounts})
    # A running system has payments before the first measured one. Without them `payments` is
    # analysed while empty, and a plan made on "empty" statistics (a sequential scan for the
    # risk count) stays for the whole phase where autovacuum is off, as on the machines of
    # docs/benchmarks.md: the first phase would measure that, and the later ones not.
    make = _payment_maker(run)
    warm = [make()[0] for _ in range(WARMUP_PAYMENTS)]
    for status, body in await httpload.run_all(HOST, run.api.port, warm, 16):
        if status != 201:
            raise RuntimeError(f"a warm-up payment answered {status}: {body[:300]!r}")
    await _clean_outbox(run)


WARMUP_PAYMENTS = 2_000


async def _clean_outbox(run: Run) -> None:
    """Start a phase from an empty queue: deliveries and events of earlier phases go.

    The queue tables are truncated, which leaves PostgreSQL without statistics for them (it
    estimates from their size), and the backlogs of the drain phases are not analysed. Analysing
    the empty tables instead would be a state no server with autovacuum keeps: plans prepared
    while a table is empty would then stay sequential scans as it grows, because autovacuum,
    which would analyse it again after 50 rows, is off on the benchmark server. The state the
    product must survive there, pending indexes analysed empty under a large table, is held by
    tests/test_queue_plans.py."""
    assert run.db is not None
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        await conn.execute("TRUNCATE outbox.deliveries, outbox.attempts, outbox.events")
        # outbox.sleepers stays: a live relay's row is what makes publishers wake it.
        for table in ("accounts", "payments", "ledger_entries", "idempotency_keys",
                      "outbox.subjects", "daily_reports"):
            await conn.execute(f"VACUUM ANALYZE {table}")
        await conn.execute("CHECKPOINT")


# --- the API and its baseline -------------------------------------------------------------------


def _payment_maker(run: Run) -> Callable[[], httpload.Request]:
    assert run.api is not None
    host = f"{HOST}:{run.api.port}"
    prefix = (
        f"POST /v1/payments HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {run.api_key}\r\nContent-Type: application/json\r\n"
    ).encode()
    accounts = run.accounts
    rng = random.Random(5)

    def make() -> httpload.Request:
        src, dst = rng.sample(accounts, 2)
        body = (b'{"source":"' + src.encode() + b'","destination":"' + dst.encode()
                + b'","amount":' + str(rng.randint(1, 100)).encode() + b',"currency":"USD"}')
        key = uuid.uuid4().hex
        data = (prefix + b"Idempotency-Key: " + key.encode() + b"\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n\r\n" + body)
        return data, key

    return make


async def api_closed_loop(run: Run, seconds: float, label: str) -> Json:
    assert run.api is not None
    cfg = run.config
    profiler = Profiler(cfg.profile_dir)
    profiler.start(label, run.api.serving_pids(), cfg.warmup + seconds)
    meter = run.meter()
    assert run.db is not None
    db_cores = asyncio.create_task(
        machine.database_cores(run.db.url, cfg.warmup + 0.5, max(seconds - 1.0, 0.5)))
    samples = await httpload.closed_loop(
        HOST, run.api.port, _payment_maker(run), cfg.concurrency, seconds, cfg.warmup, 201
    )
    usage = meter.stop()
    db_cpu = await db_cores
    run.usage[label] = usage.as_dict()
    profiler.finish()
    ok = samples.ok(201)
    rate = ok / samples.seconds
    result = {
        "payments_per_s": ok / samples.seconds,
        "p50_ms": httpload.percentile(samples.latencies_ms, 50),
        "p99_ms": httpload.percentile(samples.latencies_ms, 99),
        "succeeded": ok,
        "statuses": {str(k): v for k, v in sorted(samples.statuses.items())},
        "errors": samples.errors,
        "seconds": samples.seconds,
        "client_cpu_cores": samples.cpu_seconds / (samples.seconds + cfg.warmup),
        # CPU per payment, from the cores each side used over the phase (steady state).
        "api_cpu_ms_per_payment": usage.children_cores.get("api", 0.0) / max(rate, 1e-9) * 1000,
        "server_cpu_ms_per_payment": (usage.children_cores.get("postgresql_server", 0.0)
                                      / max(rate, 1e-9) * 1000),
        "database_cpu_ms_per_payment": (db_cpu / max(rate, 1e-9) * 1000
                                        if db_cpu is not None else None),
    }
    if ok < sum(samples.statuses.values()):
        run.notes.append(f"{label}: not every answer was 201: {result['statuses']}")
    return result


async def phase_api(run: Run) -> None:
    cfg = run.config
    run.say(f"api: {cfg.concurrency} connections, {cfg.warmup:.0f}s warm-up + "
            f"{cfg.api_seconds:.0f}s, Idempotency-Key on every request")
    api = await api_closed_loop(run, cfg.api_seconds, "api")
    run.results["api"] = api
    run.say(f"api: {api['payments_per_s']:.0f} payments/s, p50 {api['p50_ms']:.1f} ms, "
            f"p99 {api['p99_ms']:.1f} ms (client used {api['client_cpu_cores']:.2f} cores)")
    await _clean_outbox(run)


async def phase_pgbench(run: Run) -> None:
    cfg = run.config
    assert run.db is not None
    if not pgbench.available():
        run.notes.append("pgbench is not installed: no API baseline")
        return
    keyhash = hash_key(run.api_key).hex()
    out: Json = {}
    # same_txn is the API's own statement (the baseline); ledger_only leaves out authentication
    # and the idempotency key.
    for shape in pgbench.SHAPES:
        run.say(f"pgbench ({shape}): {cfg.concurrency} clients, {cfg.api_seconds:.0f}s")
        meter = run.meter()
        db_cores = asyncio.create_task(
            machine.database_cores(run.db.url, 1.0, max(cfg.api_seconds - 2.0, 0.5)))
        res = await asyncio.to_thread(
            pgbench.run, run.db.name, run.merchant, cfg.accounts, cfg.concurrency,
            cfg.api_seconds, shape, keyhash,
        )
        usage = meter.stop()
        db_cpu = await db_cores
        run.usage[f"pgbench_{shape}"] = usage.as_dict()
        out[shape] = {"tps": res.tps, "p50_ms": res.p50_ms, "p99_ms": res.p99_ms,
                      "transactions": res.transactions, "failed": res.failed,
                      "server_cpu_ms_per_txn": (usage.children_cores.get("postgresql_server", 0.0)
                                                / max(res.tps, 1e-9) * 1000),
                      "database_cpu_ms_per_txn": (db_cpu / max(res.tps, 1e-9) * 1000
                                                  if db_cpu is not None else None)}
        run.say(f"pgbench ({shape}): {res.tps:.0f} tps, p50 {res.p50_ms:.1f} ms, "
                f"p99 {res.p99_ms:.1f} ms")
        await _clean_outbox(run)
    run.results["pgbench"] = out


async def _pin_sleeper(run: Run, on: bool) -> None:
    assert run.db is not None
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        await conn.execute("DELETE FROM outbox.sleepers WHERE relay = 'bench:asleep'")
        if on:
            await conn.execute("INSERT INTO outbox.sleepers (relay) VALUES ('bench:asleep')")


async def _listen(url: str, stop: asyncio.Event, counter: list[int]) -> None:
    """A LISTENer on the wake-up channel, as a sleeping relay has, consuming notifications.

    `notifies(timeout=…)` ends by itself; cancelling the generator instead (wait_for) can leave
    the connection's lock held and hang the close."""
    from outbox.publish import WAKEUP_CHANNEL

    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(f"LISTEN {WAKEUP_CHANNEL}")
        while not stop.is_set():
            async for _ in conn.notifies(timeout=0.5):
                counter[0] += 1


async def phase_wakeup(run: Run) -> None:
    """Payments/s with the wake-up on (a relay registered as asleep: every payment's publish
    sends NOTIFY, and COMMIT takes the notify queue's global lock) and off (nobody asleep)."""
    cfg = run.config
    assert run.db is not None
    out: Json = {}
    for on in (True, False):
        tag = "on" if on else "off"
        await _pin_sleeper(run, on)
        stop = asyncio.Event()
        notified = [0]
        listener = asyncio.create_task(_listen(run.db.url, stop, notified))
        await asyncio.sleep(0.3)
        try:
            run.say(f"wake-up {tag}: API, {cfg.wakeup_seconds:.0f}s")
            api = await api_closed_loop(run, cfg.wakeup_seconds, f"wakeup_api_{tag}")
            pgb = None
            if pgbench.available():
                run.say(f"wake-up {tag}: pgbench (same_txn), {cfg.wakeup_seconds:.0f}s")
                pgb = await asyncio.to_thread(
                    pgbench.run, run.db.name, run.merchant, cfg.accounts, cfg.concurrency,
                    cfg.wakeup_seconds, "same_txn", hash_key(run.api_key).hex(),
                )
        finally:
            stop.set()
            await asyncio.gather(listener, return_exceptions=True)
        out[tag] = {
            "api_payments_per_s": api["payments_per_s"],
            "api_p99_ms": api["p99_ms"],
            "pgbench_tps": pgb.tps if pgb else None,
            "notifications_received": notified[0],
        }
        run.say(f"wake-up {tag}: API {api['payments_per_s']:.0f}/s"
                + (f", pgbench {pgb.tps:.0f} tps" if pgb else "")
                + f", {notified[0]} notifications")
        await _pin_sleeper(run, False)
        await _clean_outbox(run)
    run.results["wakeup"] = out


# --- the relay and its peer ---------------------------------------------------------------------


async def _publish_backlog(run: Run, count: int) -> float:
    """Publish `count` payment.succeeded events through the product's `publish()`, in one
    transaction; returns the wall-clock time its COMMIT returned."""
    from ledger import objects
    from ledger.ids import new_id
    from outbox.envelope import NewEvent
    from outbox.publish import publish

    assert run.db is not None
    rng = random.Random(7)
    async with await psycopg.AsyncConnection.connect(run.db.url) as conn:
        now = datetime.now(UTC)
        for start in range(0, count, 5000):
            events = []
            for _ in range(min(5000, count - start)):
                pay = new_id("pay")
                src, dst = rng.sample(run.accounts, 2)
                obj = objects.payment(pay, src, dst, rng.randint(1, 100), 0, "USD", "succeeded",
                                      None, None, {}, now)
                events.append(NewEvent("payment.succeeded", pay, obj, run.merchant))
            await publish(conn, events, now)
        await conn.commit()
        return time.time()


async def _pending(conn: psycopg.AsyncConnection[Any], consumer: str | None) -> int:
    if consumer is None:
        cur = await conn.execute(
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'pending'")
    else:
        cur = await conn.execute(
            "SELECT count(*) FROM outbox.deliveries WHERE status = 'pending' AND consumer = %s",
            (consumer,))
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _drained(conn: psycopg.AsyncConnection[Any], consumer: str | None, limit: float) -> None:
    """Poll until nothing is pending (the end time itself comes from `delivered_at`)."""
    deadline = time.monotonic() + limit
    while True:
        if await _pending(conn, consumer) == 0:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the backlog of {consumer or 'all consumers'} did not drain in "
                               f"{limit:.0f}s")
        await asyncio.sleep(0.2)


def _start_relays(run: Run, tag: str) -> Relays:
    cfg = run.config
    assert run.db is not None
    return Relays(run.db.url, cfg.relays, cfg.relay_concurrency, cfg.relay_batch, cfg.log_dir, tag)


async def _delivered_window(
    conn: psycopg.AsyncConnection[Any], consumer: str
) -> tuple[float, float, int, int]:
    """(first, last) delivered_at as epoch seconds, how many share the first, and the total."""
    cur = await conn.execute(
        "SELECT extract(epoch FROM min(delivered_at)), extract(epoch FROM max(delivered_at)),"
        " count(*) FILTER (WHERE delivered_at = (SELECT min(delivered_at) FROM outbox.deliveries"
        "   WHERE consumer = %(c)s AND status = 'delivered')), count(*)"
        " FROM outbox.deliveries WHERE consumer = %(c)s AND status = 'delivered'",
        {"c": consumer})
    row = await cur.fetchone()
    assert row is not None and row[0] is not None
    return float(row[0]), float(row[1]), int(row[2]), int(row[3])


async def phase_handler(run: Run) -> None:
    """A backlog accumulated while no relay ran; the relays start and drain it. The rate is
    measured from the first batch's commit to the last one's (`delivered_at`), so the process
    start-up is not in it; the first batch is not counted either."""
    cfg = run.config
    assert run.db is not None
    if run.relays is not None:
        run.relays.stop()
        run.relays = None
    await _clean_outbox(run)
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        await conn.execute("TRUNCATE daily_reports")
    run.say(f"handler drain: {cfg.jobs} payment.succeeded events for `reports` published with "
            f"no relay running; then {cfg.relays} relay(s), batch {cfg.relay_batch}")
    await _publish_backlog(run, cfg.jobs)
    meter = run.meter()
    run.relays = _start_relays(run, "h")
    meter.children.update({c.name: c.pid for c in run.relays.children})
    profiler = Profiler(cfg.profile_dir)
    await asyncio.sleep(1.0)
    profiler.start("handler", run.relays.pids(), 15)
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        await _drained(conn, "reports", 600)
        run.usage["handler_drain"] = meter.stop().as_dict()
        profiler.finish()
        first, last, at_first, delivered = await _delivered_window(conn, "reports")
        cur = await conn.execute("SELECT coalesce(sum(payments_count), 0) FROM daily_reports")
        counted_row = await cur.fetchone()
    counted = int(counted_row[0]) if counted_row else 0
    seconds = last - first
    rate = (delivered - at_first) / seconds if seconds > 0 else float("nan")
    run.results["handler"] = {"events": cfg.jobs, "delivered": delivered,
                              "reports_payments_count": counted, "seconds": seconds,
                              "events_per_s": rate, "relays": cfg.relays,
                              "batch_size": cfg.relay_batch}
    if delivered != cfg.jobs or counted != cfg.jobs:
        run.notes.append(f"handler: {delivered} delivered, reports counted {counted}, "
                         f"of {cfg.jobs}")
    run.say(f"handler drain: {rate:.0f} events/s ({seconds:.2f}s for {cfg.jobs}; reports "
            f"counted {counted})")


async def _peer(run: Run, *args: str) -> Json:
    """Run `python -m bench.peer ARGS` as a registered child; returns the JSON it writes."""
    assert run.pgq_db is not None
    out = run.config.log_dir / f"pgqueuer-{args[0]}-{args[2] if len(args) > 2 else ''}.json"
    out.unlink(missing_ok=True)
    child = Child(f"pgqueuer-{args[0]}", [sys.executable, "-m", "bench.peer", *args,
                                          "--dsn", run.pgq_db.url, "--out", str(out)],
                  None, run.config.log_dir)
    code = await asyncio.to_thread(child.proc.wait)
    child.stop()
    if code != 0:
        raise RuntimeError(f"pgqueuer {' '.join(args)} failed ({code}):\n{child.log_tail(30)}")
    return orjson.loads(out.read_bytes()) if out.exists() else {}


async def phase_pgqueuer_drain(run: Run) -> None:
    cfg = run.config
    if run.pgq_db is None:
        run.pgq_db = database.create(cfg.base_url, "pgqueuer")
        await _peer(run, "install", "--driver", "psy")
    out: Json = {}
    for driver in cfg.pgqueuer_drivers:
        run.say(f"pgqueuer drain ({driver}): {cfg.jobs} jobs, 5 dequeuers, batch 10")
        meter = run.meter()
        res = await _peer(run, "drain", "--driver", driver, "--jobs", str(cfg.jobs))
        run.usage[f"pgqueuer_drain_{driver}"] = meter.stop().as_dict()
        out[driver] = res
        run.say(f"pgqueuer drain ({driver}): {res['jobs_per_s']:.0f} jobs/s")
    run.results["pgqueuer_drain"] = out


async def phase_webhooks(run: Run) -> None:
    """Webhook deliveries accumulated while no relay ran (the handler consumer disabled, so
    only the endpoint gets them); the relays start and deliver to the receiver. The rate runs
    from the first arrival at the receiver to the last."""
    cfg = run.config
    assert run.db is not None and run.receiver is not None and run.api is not None
    await _ensure_endpoint(run)
    if run.relays is not None:
        run.relays.stop()
        run.relays = None
    await _clean_outbox(run)
    await run.receiver.reset()
    run.say(f"webhook drain: {cfg.webhook_backlog} deliveries published with no relay running; "
            f"then {cfg.relays} relay(s), --concurrency {cfg.relay_concurrency}")
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        await conn.execute("UPDATE outbox.consumers SET enabled = false WHERE kind = 'handler'")
        try:
            await _publish_backlog(run, cfg.webhook_backlog)
            meter = run.meter()
            run.relays = _start_relays(run, "w")
            meter.children.update({c.name: c.pid for c in run.relays.children})
            profiler = Profiler(cfg.profile_dir)
            deadline = time.monotonic() + 600
            profiling = False
            while True:
                stats = await run.receiver.stats()
                if not profiling and int(stats["count"]) > 0:
                    profiler.start("webhooks", run.relays.pids(), 10)
                    profiling = True
                if int(stats["unique"]) >= cfg.webhook_backlog:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError("the webhook backlog was not delivered in 10 minutes")
                await asyncio.sleep(0.2)
            run.usage["webhook_drain"] = meter.stop().as_dict()
            profiler.finish()
            await _drained(conn, None, 120)  # completions written too
        finally:
            await conn.execute("UPDATE outbox.consumers SET enabled = true WHERE kind = 'handler'")
    seconds = float(stats["last"]) - float(stats["first"])
    samples = await run.receiver.samples()
    good = sum(verify(run.endpoint_secret, s) for s in samples)
    rate = (cfg.webhook_backlog - 1) / seconds if seconds > 0 else float("nan")
    run.results["webhooks"] = {
        "deliveries": cfg.webhook_backlog, "received": int(stats["count"]),
        "unique": int(stats["unique"]), "seconds": seconds, "deliveries_per_s": rate,
        "signatures_checked": len(samples), "signatures_valid": good, "relays": cfg.relays,
        "relay_concurrency": cfg.relay_concurrency,
    }
    if good != len(samples):
        run.notes.append(f"webhooks: {len(samples) - good} of {len(samples)} signatures invalid")
    run.say(f"webhook drain: {rate:.0f} deliveries/s; {good}/{len(samples)} sampled signatures "
            f"valid; {int(stats['count']) - int(stats['unique'])} duplicates")


async def _ensure_endpoint(run: Run) -> None:
    assert run.api is not None and run.receiver is not None
    if run.endpoint_secret:
        return
    host = f"{HOST}:{run.api.port}"
    body = orjson.dumps({"url": run.receiver.url, "event_types": ["payment.succeeded"]})
    req = httpload.render("POST", "/v1/webhook_endpoints", host, body,
                          {"Authorization": f"Bearer {run.api_key}"})
    [(status, answer)] = await httpload.run_all(HOST, run.api.port, [req], 1)
    if status != 201:
        raise RuntimeError(f"creating the webhook endpoint answered {status}: {answer[:300]!r}")
    run.endpoint_secret = orjson.loads(answer)["secret"]


async def phase_pgqueuer_throughput(run: Run) -> None:
    cfg = run.config
    if run.pgq_db is None:
        run.pgq_db = database.create(cfg.base_url, "pgqueuer")
        await _peer(run, "install", "--driver", "psy")
    out: Json = {}
    for driver in cfg.pgqueuer_drivers:
        run.say(f"pgqueuer throughput ({driver}): {cfg.throughput_seconds:.0f}s, 1 enqueuer "
                "(batch 10), 5 dequeuers (batch 10)")
        meter = run.meter()
        res = await _peer(run, "throughput", "--driver", driver,
                          "--seconds", str(cfg.throughput_seconds))
        run.usage[f"pgqueuer_throughput_{driver}"] = meter.stop().as_dict()
        out[driver] = res
        run.say(f"pgqueuer throughput ({driver}): {res['jobs_per_s']:.0f} jobs/s")
    run.results["pgqueuer_throughput"] = out


async def phase_e2e(run: Run) -> None:
    cfg = run.config
    assert run.db is not None and run.receiver is not None and run.api is not None
    await _ensure_endpoint(run)
    await _clean_outbox(run)
    if run.relays is None:
        run.relays = _start_relays(run, "c")
    await run.relays.asleep()
    await run.receiver.reset()
    run.say(f"end to end: {cfg.e2e_rate:.0f} payments/s offered for {cfg.e2e_seconds:.0f}s "
            "through the API, relay delivering to the receiver")
    profiler = Profiler(cfg.profile_dir)
    profiler.start("e2e-relay", run.relays.pids(), cfg.e2e_seconds)
    meter = run.meter()
    samples = await httpload.open_loop(
        HOST, run.api.port, _payment_maker(run), cfg.e2e_rate, cfg.e2e_seconds, 64, 201
    )
    # Let the last deliveries land.
    expected = samples.ok(201)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = await run.receiver.stats()
        if int(stats["unique"]) >= expected:
            break
        await asyncio.sleep(0.2)
    run.usage["e2e"] = meter.stop().as_dict()
    profiler.finish()
    arrivals = await run.receiver.arrivals()
    ids: list[str] = arrivals["ids"]
    times: list[float] = arrivals["times"]
    first: dict[str, float] = {}
    for event_id, t in zip(ids, times, strict=True):
        first.setdefault(event_id, t)
    # When each payment's transaction ran: the event's `time` (the transaction's now(), which is
    # taken before COMMIT, so latencies here err on the long side).
    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT id, subject, extract(epoch FROM time) FROM outbox.events"
            " WHERE id = ANY(%s)", (list(first),))
        rows = await cur.fetchall()
    answered: dict[str, float] = {}
    for _tag, status, t, body in samples.answers:
        if status == 201:
            answered[orjson.loads(body)["id"]] = t
    from_txn = [(first[i] - float(t)) * 1000 for i, _s, t in rows]
    from_answer = [(first[i] - answered[s]) * 1000 for i, s, _t in rows if s in answered]
    run.results["e2e"] = {
        "offered_per_s": cfg.e2e_rate,
        "achieved_per_s": expected / cfg.e2e_seconds,
        "payments": expected,
        "delivered": len(first),
        "late_requests": samples.late,
        "p50_ms": httpload.percentile(from_txn, 50),
        "p99_ms": httpload.percentile(from_txn, 99),
        "max_ms": max(from_txn) if from_txn else float("nan"),
        "from_api_answer_p50_ms": httpload.percentile(from_answer, 50),
        "from_api_answer_p99_ms": httpload.percentile(from_answer, 99),
        "api_p50_ms": httpload.percentile(samples.latencies_ms, 50),
        "api_p99_ms": httpload.percentile(samples.latencies_ms, 99),
    }
    if len(first) < expected:
        run.notes.append(f"e2e: {expected - len(first)} of {expected} payments' webhooks did not "
                         "arrive within 30 s of the end")
    e2e = run.results["e2e"]
    run.say(f"end to end: p50 {e2e['p50_ms']:.1f} ms, p99 {e2e['p99_ms']:.1f} ms "
            f"({len(first)}/{expected} delivered; API p99 {e2e['api_p99_ms']:.1f} ms)")


# --- fairness -----------------------------------------------------------------------------------

FAIR_HANGING = 4


async def phase_fairness(run: Run) -> None:
    """Merchant A has FAIR_HANGING endpoints that never answer within a short
    OUTBOX_HTTP_TIMEOUT and a backlog of `fairness_backlog` account.created events for each,
    published before the relays start; merchant B has one endpoint that answers at once and
    creates accounts through the API at `fairness_rate`/s, with a burst of `fairness_burst` in
    the middle, from the moment the relays made their first attempt. B's latency runs from the
    event's `time` (its transaction) to the arrival at the receiver; A's first attempts are
    timed from the first attempt A got at all, and each retry against the moment it was due
    (its previous attempt's end plus the schedule's wait)."""
    cfg = run.config
    assert run.db is not None and run.receiver is not None and run.api is not None
    if run.relays is not None:
        run.relays.stop()
        run.relays = None
    await _clean_outbox(run)
    await run.receiver.reset()
    port = run.api.port
    host = f"{HOST}:{port}"
    _, a_key = database.create_merchant(run.db, "fairness A")
    _, b_key = database.create_merchant(run.db, "fairness B")
    hanging = [f"/hang/{n}" for n in range(FAIR_HANGING)]
    created: list[tuple[str, str]] = []
    for key, path in [(a_key, p) for p in hanging] + [(b_key, "/fast")]:
        body = orjson.dumps({"url": run.receiver.base + path, "event_types": ["account.created"]})
        [(status, answer)] = await httpload.run_all(HOST, port, [httpload.render(
            "POST", "/v1/webhook_endpoints", host, body, {"Authorization": f"Bearer {key}"})], 1)
        if status != 201:
            raise RuntimeError(f"creating a webhook endpoint answered {status}: {answer[:300]!r}")
        created.append((key, orjson.loads(answer)["id"]))

    def account(key: str) -> bytes:
        return httpload.render("POST", "/v1/accounts", host, b'{"currency":"USD"}',
                               {"Authorization": f"Bearer {key}"})

    for status, answer in await httpload.run_all(
            HOST, port, [account(a_key) for _ in range(cfg.fairness_backlog)], 8):
        if status != 201:
            raise RuntimeError(f"creating an account answered {status}: {answer[:300]!r}")
    timeout = cfg.fairness_timeout
    schedule = ",".join(["0"] + [f"{cfg.fairness_retry_wait:g}"] * 9)
    env = {"OUTBOX_HTTP_TIMEOUT": f"{timeout:g}",
           "OUTBOX_LEASE_SECONDS": f"{timeout + 10:g}", "OUTBOX_RETRY_SCHEDULE": schedule}
    run.say(f"fairness: merchant A's {FAIR_HANGING} endpoints hang past a {timeout:g} s timeout "
            f"with {cfg.fairness_backlog} events each; merchant B sends {cfg.fairness_events} "
            f"accounts at {cfg.fairness_rate:g}/s and a burst of {cfg.fairness_burst}; "
            f"{cfg.relays} relay(s), --concurrency {cfg.relay_concurrency}")
    meter = run.meter()
    run.relays = Relays(run.db.url, cfg.relays, cfg.relay_concurrency, cfg.relay_batch,
                        cfg.log_dir, "f", env)
    meter.children.update({c.name: c.pid for c in run.relays.children})
    deadline = time.monotonic() + 60
    while int((await run.receiver.stats())["count"]) == 0:  # the relays are up and working
        if time.monotonic() > deadline:
            raise TimeoutError("the relays attempted nothing within 60 s")
        await asyncio.sleep(0.05)

    def make_b() -> httpload.Request:
        return account(b_key), None

    async def burst() -> None:
        await asyncio.sleep(cfg.fairness_events / cfg.fairness_rate / 2)
        await httpload.run_all(HOST, port,
                               [account(b_key) for _ in range(cfg.fairness_burst)], 8)

    steady, _ = await asyncio.gather(
        httpload.open_loop(HOST, port, make_b, cfg.fairness_rate,
                           cfg.fairness_events / cfg.fairness_rate, 8, 201),
        burst())
    b_total = steady.ok(201) + cfg.fairness_burst
    a_attempts = 2 * FAIR_HANGING * cfg.fairness_backlog  # every A event's second attempt
    deadline = time.monotonic() + 120
    while True:
        arrivals = await run.receiver.arrivals()
        paths: list[str] = arrivals["paths"]
        b_seen = sum(1 for p in paths if p == "/fast")
        if b_seen >= b_total and len(paths) - b_seen >= a_attempts:
            break
        if time.monotonic() > deadline:
            run.notes.append(f"fairness: {b_seen}/{b_total} of B's events and "
                             f"{len(paths) - b_seen}/{a_attempts} of A's attempts within 120 s")
            break
        await asyncio.sleep(0.2)
    run.usage["fairness"] = meter.stop().as_dict()
    run.relays.stop()
    run.relays = None
    for key, endpoint_id in created:  # the hanging endpoints must not outlive the phase
        await httpload.run_all(HOST, port, [httpload.render(
            "DELETE", f"/v1/webhook_endpoints/{endpoint_id}", host, b"",
            {"Authorization": f"Bearer {key}"})], 1)

    async with await psycopg.AsyncConnection.connect(run.db.url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT id, extract(epoch FROM time)::float8 FROM outbox.events WHERE id = ANY(%s)",
            (sorted(set(arrivals["ids"])),))
        event_time: dict[str, float] = dict(await cur.fetchall())
    b_ms: list[float] = []
    tries: dict[tuple[str, str], list[float]] = {}
    for event_id, t, path in zip(arrivals["ids"], arrivals["times"], paths, strict=True):
        if path == "/fast":
            b_ms.append((t - event_time[event_id]) * 1000)
        else:
            tries.setdefault((path, event_id), []).append(t)
    a_started = min((ts[0] for ts in tries.values()), default=float("nan"))
    first_s = [ts[0] - max(event_time[e], a_started) for (_, e), ts in tries.items()]
    retry_late_s = [later - (earlier + timeout + cfg.fairness_retry_wait)
                    for ts in tries.values() for earlier, later in itertools.pairwise(ts)]
    b_ids = [e for e, p in zip(arrivals["ids"], paths, strict=True) if p == "/fast"]
    run.results["fairness"] = {
        "relays": cfg.relays, "relay_concurrency": cfg.relay_concurrency,
        "http_timeout_s": timeout, "retry_wait_s": cfg.fairness_retry_wait,
        "hanging_endpoints": FAIR_HANGING, "backlog_per_endpoint": cfg.fairness_backlog,
        "b_events": b_total, "b_delivered": len(set(b_ids)),
        "b_duplicates": len(b_ids) - len(set(b_ids)),
        "b_p50_ms": httpload.percentile(b_ms, 50), "b_p99_ms": httpload.percentile(b_ms, 99),
        "b_max_ms": max(b_ms) if b_ms else float("nan"),
        "a_attempts": sum(len(ts) for ts in tries.values()),
        "a_first_attempts_within_s": max(first_s) if first_s else float("nan"),
        "a_retries": len(retry_late_s),
        "a_retry_late_p50_s": httpload.percentile(retry_late_s, 50),
        "a_retry_late_p99_s": httpload.percentile(retry_late_s, 99),
        "a_retry_late_max_s": max(retry_late_s) if retry_late_s else float("nan"),
    }
    f = run.results["fairness"]
    run.say(f"fairness: B p50 {f['b_p50_ms']:.0f} ms, p99 {f['b_p99_ms']:.0f} ms, max "
            f"{f['b_max_ms']:.0f} ms ({f['b_delivered']}/{b_total}); A: first attempts within "
            f"{f['a_first_attempts_within_s']:.1f} s, retries late p50 "
            f"{f['a_retry_late_p50_s']:.2f} s, p99 {f['a_retry_late_p99_s']:.2f} s")


PHASES = {
    "api": phase_api,
    "pgbench": phase_pgbench,
    "wakeup": phase_wakeup,
    "handler": phase_handler,
    "pgqueuer_drain": phase_pgqueuer_drain,
    "webhooks": phase_webhooks,
    "pgqueuer_throughput": phase_pgqueuer_throughput,
    "e2e": phase_e2e,
    "fairness": phase_fairness,
}


async def run_all(run: Run) -> None:
    """All phases. A stop signal cancels this task (a KeyboardInterrupt raised inside a loop
    callback would be logged and swallowed) and terminates the children at once."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def interrupt(sig: signal.Signals) -> None:
        run.interrupted = sig.name
        procs.terminate_all()
        task.cancel()

    for sig in procs.STOP_SIGNALS:
        loop.add_signal_handler(sig, interrupt, sig)
    try:
        await setup(run)
        for name, phase in PHASES.items():
            if run.config.wants(name):
                await phase(run)
    finally:
        for sig in procs.STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        procs.install_handlers()
