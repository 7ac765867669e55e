"""`python -m bench [--quick] [--json PATH]`: run every benchmark, print the table, clean up."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench import database, machine, procs, report
from bench.run import PHASES, Config, Run, run_all

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmarks side by side: the API against pgbench running the same "
        "transaction, the relay against pgqueuer, end-to-end webhook latency, and one "
        "merchant's latency beside another's hanging endpoints (fairness). Creates and drops "
        "its own databases on the local PostgreSQL (DATABASE_URL's server).",
    )
    p.add_argument("--quick", action="store_true", help="shorter phases (under 5 minutes)")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="write the table here")
    p.add_argument("--base-url", default=None,
                   help="libpq URL of the server (any database; default postgresql:///postgres)")
    p.add_argument("--api-workers", type=int, help="uvicorn workers (default 2)")
    p.add_argument("--concurrency", type=int, help="client connections / pgbench clients (32)")
    p.add_argument("--accounts", type=int, help="accounts payments are drawn from (1000)")
    p.add_argument("--seconds", type=float, dest="api_seconds", help="API and pgbench phases")
    p.add_argument("--jobs", type=int, help="handler backlog = pgqueuer drain jobs")
    p.add_argument("--webhook-backlog", type=int, help="webhook deliveries to drain")
    p.add_argument("--relays", type=int, help="relay processes (default 1)")
    p.add_argument("--relay-concurrency", type=int, help="outbox-relay --concurrency (32)")
    p.add_argument("--relay-batch", type=int, help="outbox-relay --batch-size (100)")
    p.add_argument("--only", action="append", choices=sorted(PHASES),
                   help="run only this phase (repeatable); set-up always runs")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="attach py-spy (must be installed) to the API workers and relays during "
                   "their phases and write folded stacks to DIR")
    p.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()) / "payments-bench",
                   help="child process logs (default $TMPDIR/payments-bench, outside the tree)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {
        "api_workers": args.api_workers, "concurrency": args.concurrency,
        "accounts": args.accounts, "api_seconds": args.api_seconds, "jobs": args.jobs,
        "webhook_backlog": args.webhook_backlog, "relays": args.relays,
        "relay_concurrency": args.relay_concurrency, "relay_batch": args.relay_batch,
        "profile_dir": args.profile, "log_dir": args.log_dir,
        "only": frozenset(args.only) if args.only else None,
    }
    if args.base_url:
        overrides["base_url"] = args.base_url
    cfg = Config.make(args.quick, **overrides)
    if cfg.profile_dir is not None:
        cfg.profile_dir.mkdir(parents=True, exist_ok=True)
    procs.install_handlers()
    run = Run(cfg)
    started = time.monotonic()
    server = database.server_facts(cfg.base_url)
    if server.get("fsync") != "on" or server.get("synchronous_commit") not in ("on", "remote_apply",
                                                                                "remote_write"):
        print("bench: refusing to run with fsync or synchronous_commit off: figures are "
              "published with durability on", file=sys.stderr)
        return 2
    meta = {
        "machine": machine.describe(server),
        "date": machine.now_iso(),
        "commit": machine.git_commit(ROOT),
    }
    failed: BaseException | None = None
    try:
        _run(run)
        if run.interrupted:
            raise KeyboardInterrupt(run.interrupted)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nbench: interrupted, cleaning up", file=sys.stderr)
        failed = KeyboardInterrupt()
    except Exception as exc:
        failed = exc
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if run.relays is not None:
            run.relays.stop()
        procs.stop_all()
        database.drop_all(cfg.base_url)
    if failed is not None:
        run.notes.append(f"run incomplete: {type(failed).__name__}: {failed}")
    ncpu = os.cpu_count() or 1
    busy = {name: u["loadavg_1m"] for name, u in run.usage.items() if u["loadavg_1m"] > ncpu}
    if busy:
        run.notes.append(
            f"the machine was busy (1-minute load average above {ncpu}) during "
            f"{len(busy)} of {len(run.usage)} phases, up to {max(busy.values()):.1f}: "
            "absolute figures are noisy; see usage.*")
    config = {k: (str(v) if isinstance(v, Path | frozenset) else v)
              for k, v in dataclasses.asdict(cfg).items()}
    config["wall_seconds"] = round(time.monotonic() - started, 1)
    doc = report.build(meta, run.results, run.usage, config, run.notes)
    table = report.markdown(doc)
    print()
    print(table)
    if args.json:
        options = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
        args.json.write_bytes(orjson.dumps(doc, option=options))
        print(f"wrote {args.json}")
    if args.markdown:
        args.markdown.write_text(table)
    if isinstance(failed, KeyboardInterrupt):
        return 130
    return 1 if failed is not None else 0


def _run(run: Run) -> None:
    try:
        import uvloop

        uvloop.run(run_all(run))
    except ImportError:
        asyncio.run(run_all(run))


if __name__ == "__main__":
    sys.exit(main())
