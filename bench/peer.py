"""The peer: pgqueuer (from PyPI) run the way its own benchmark runs it.

This follows pgqueuer's `tools/benchmark.py` (the script its CI runs on every push): the same two
strategies and the same defaults, 5 dequeue tasks each a `PgQueuer` on its own connection with
`batch_size=10`, jobs spread at random over two entrypoints (`syncfetch`, `asyncfetch`) that only
count, uvloop as the event loop.

- drain: enqueue `jobs` jobs in one call, then time the dequeuers in `drain` mode until empty.
- throughput: 1 enqueue task (batches of 10) and the 5 dequeuers run together for `seconds`;
  the rate is jobs processed per second.

Runs in its own process (`python -m bench.peer {drain,throughput} --dsn ...`) and prints one JSON
line, so its CPU is accounted like the relay's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import time
from contextlib import suppress
from itertools import count
from typing import Any

import orjson

DEQUEUE = 5
DEQUEUE_BATCH = 10
ENQUEUE = 1
ENQUEUE_BATCH = 10


async def _driver(kind: str, dsn: str) -> Any:
    from pgqueuer.db import AsyncpgDriver, PsycopgDriver

    if kind == "apg":
        import asyncpg

        return AsyncpgDriver(await asyncpg.connect(dsn=dsn))
    import psycopg

    return PsycopgDriver(await psycopg.AsyncConnection.connect(conninfo=dsn, autocommit=True))


async def install(dsn: str, driver: str) -> None:
    from pgqueuer.queries import Queries

    queries = Queries(await _driver(driver, dsn))
    await queries.install()


def _consumer(pgq: Any, counter: list[int]) -> None:
    from pgqueuer.models import Job

    @pgq.entrypoint("asyncfetch")
    async def asyncfetch(job: Job) -> None:
        counter[0] += 1

    # pgqueuer 1.x refuses sync entrypoints; its benchmark's "syncfetch" is async there too.
    @pgq.entrypoint("syncfetch")
    async def syncfetch(job: Job) -> None:
        counter[0] += 1


async def drain(dsn: str, driver: str, jobs: int) -> dict[str, Any]:
    from pgqueuer import PgQueuer
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    queries = Queries(await _driver(driver, dsn))
    await queries.clear_statistics_log()
    await queries.clear_queue()
    entrypoints = ["syncfetch", "asyncfetch"] * jobs
    await queries.enqueue(random.sample(entrypoints, k=jobs), [b"" for _ in range(jobs)],
                          [0] * jobs)
    pgqs = [PgQueuer(await _driver(driver, dsn)) for _ in range(DEQUEUE)]
    counter = [0]
    for pgq in pgqs:
        _consumer(pgq, counter)
    started = time.perf_counter()
    await asyncio.gather(*(
        pgq.run(batch_size=DEQUEUE_BATCH, mode=QueueExecutionMode.drain) for pgq in pgqs
    ))
    elapsed = time.perf_counter() - started
    return {"strategy": "drain", "driver": driver, "jobs": jobs, "processed": counter[0],
            "seconds": elapsed, "jobs_per_s": jobs / elapsed}


async def throughput(dsn: str, driver: str, seconds: float) -> dict[str, Any]:
    from pgqueuer import PgQueuer
    from pgqueuer.queries import Queries

    util = Queries(await _driver(driver, dsn))
    await util.clear_statistics_log()
    await util.clear_queue()
    shutdown = asyncio.Event()
    cnt = count()

    async def producer(queries: Any) -> None:
        entrypoints = ["syncfetch", "asyncfetch"] * ENQUEUE_BATCH
        while not shutdown.is_set():
            await queries.enqueue(
                random.sample(entrypoints, k=ENQUEUE_BATCH),
                [f"{next(cnt)}".encode() for _ in range(ENQUEUE_BATCH)],
                [0] * ENQUEUE_BATCH,
            )

    producers = [Queries(await _driver(driver, dsn)) for _ in range(ENQUEUE)]
    pgqs = [PgQueuer(await _driver(driver, dsn)) for _ in range(DEQUEUE)]
    counter = [0]
    for pgq in pgqs:
        _consumer(pgq, counter)

    async def timer() -> None:
        with suppress(TimeoutError):
            await asyncio.wait_for(shutdown.wait(), seconds)
        shutdown.set()
        for pgq in pgqs:
            pgq.shutdown.set()

    started = time.perf_counter()
    await asyncio.gather(
        *(pgq.run(batch_size=DEQUEUE_BATCH) for pgq in pgqs),
        *(producer(q) for q in producers),
        timer(),
    )
    elapsed = time.perf_counter() - started
    queued = sum(x.count for x in await util.queue_size())
    return {"strategy": "throughput", "driver": driver, "processed": counter[0],
            "enqueued": next(cnt), "left_in_queue": queued, "seconds": elapsed,
            "jobs_per_s": counter[0] / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer")
    parser.add_argument("strategy", choices=["install", "drain", "throughput"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--driver", choices=["apg", "psy"], default="apg")
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", help="write the result here (JSON) instead of stdout")
    args = parser.parse_args()
    logging.getLogger("pgqueuer").setLevel(logging.WARNING)
    if args.strategy == "install":
        coro: Any = install(args.dsn, args.driver)
    elif args.strategy == "drain":
        coro = drain(args.dsn, args.driver, args.jobs)
    else:
        coro = throughput(args.dsn, args.driver, args.seconds)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    if result is None:
        return
    if args.out:
        with open(args.out, "wb") as fh:
            fh.write(orjson.dumps(result))
    else:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    main()
