"""A receiver built with the library, with faults injected, for the chaos test: the example's
handlers (receiver/example/effects.py) behind `receiver.asgi`, run as its own process.

    python -m tests.support.chaos_receiver --port P --plan plan.json --markers markers.log

Configuration as for the example (RECEIVER_* variables). Faults, each after the handler has
written its effects, which must then be rolled back:
- events in the plan's `stall` list, the first time the handler runs for them in a webhook
  request: the handler writes `stall <id>` to the markers file and sleeps, so the test can
  SIGKILL the process in the middle of a handler;
- on the first webhook attempt of an event (attempts are counted per webhook-id in the
  receiver's database, so a restart does not repeat them), one event in 7 (by a hash of its
  id): the handler raises, the answer is 500;
- one event in 11: the handler sleeps past the relay's timeout (`--slow` seconds), then commits,
  so the relay retries an event that was applied.
Events in the plan's `blocked` list are answered 503 with `Retry-After: 0` before the library
sees them, on every attempt, so they go dead quickly; the test empties the list to let them in.
Backfill and catching up are never faulted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from receiver.asgi import create_app
from receiver.backfill import EventsApi
from receiver.event import ReceivedEvent
from receiver.example import effects
from receiver.inbox import Inbox
from receiver.migrate import migrate
from receiver.settings import ReceiverSettings

ATTEMPT: contextvars.ContextVar[int | None] = contextvars.ContextVar("attempt", default=None)


class InjectedFailure(Exception):
    pass


class Plan:
    """The test's plan file, read again whenever it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = 0
        self._plan: dict[str, list[str]] = {}

    def get(self, key: str) -> list[str]:
        stamp = self.path.stat().st_mtime_ns
        if stamp != self._stamp:
            self._plan = json.loads(self.path.read_text())
            self._stamp = stamp
        return self._plan.get(key, [])


def _marks(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _mark(path: Path, line: str) -> None:
    with open(path, "a") as out:
        out.write(line + "\n")


def chaotic(inner: Any, plan: Plan, markers: Path, slow: float) -> Any:
    async def handler(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
        await inner(conn, event)
        attempt = ATTEMPT.get()
        if attempt is None:
            return  # caught up in the background, not a webhook request
        if event.id in plan.get("stall") and f"stall {event.id}" not in _marks(markers):
            _mark(markers, f"stall {event.id}")
            await asyncio.sleep(600)
        if attempt != 1:
            return
        digest = zlib.crc32(event.id.encode())
        if digest % 7 == 0:
            raise InjectedFailure(event.id)
        if digest % 11 == 1:
            await asyncio.sleep(slow)

    return handler


class CountAttempts:
    """ASGI middleware: numbers each webhook request per webhook-id, answers 503 for blocked
    events, and passes the attempt number to the handler."""

    def __init__(self, app: ASGIApp, pool: AsyncConnectionPool[Any], plan: Plan) -> None:
        self.app = app
        self.pool = pool
        self.plan = plan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/webhooks":
            await self.app(scope, receive, send)
            return
        webhook_id = dict(scope["headers"]).get(b"webhook-id", b"").decode()
        async with self.pool.connection() as conn:
            await conn.set_autocommit(True)
            row = await (await conn.execute(
                "INSERT INTO chaos_attempts (webhook_id, n) VALUES (%s, 1)"
                " ON CONFLICT (webhook_id) DO UPDATE SET n = chaos_attempts.n + 1 RETURNING n",
                (webhook_id,),
            )).fetchone()
        assert row is not None
        if webhook_id in self.plan.get("blocked"):
            response: Response = JSONResponse({"error": "blocked"}, 503, {"Retry-After": "0"})
            await response(scope, receive, send)
            return
        token = ATTEMPT.set(row[0])
        try:
            await self.app(scope, receive, send)
        finally:
            ATTEMPT.reset(token)


async def _healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "pid": os.getpid()})


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--markers", type=Path, required=True)
    parser.add_argument("--slow", type=float, default=2.0)
    args = parser.parse_args()
    settings = ReceiverSettings.from_env()
    migrate(settings.database_url)
    effects.create_tables(settings.database_url)
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS chaos_attempts"
                     " (webhook_id text PRIMARY KEY, n integer NOT NULL)")

    plan = Plan(args.plan)
    pool = AsyncConnectionPool(settings.database_url, min_size=2, max_size=40, open=False)
    chaos_pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=10, open=False)
    assert settings.events_url is not None and settings.api_key is not None
    inbox = Inbox(
        pool,
        settings.secrets,
        chaotic(effects.apply, plan, args.markers, args.slow),
        late_handler=effects.apply_late,
        events=EventsApi(settings.events_url, settings.api_key),
        poll_interval=0.2,
    )
    app = create_app(inbox, path="/webhooks", routes=[Route("/healthz", _healthz)])

    async def serve() -> None:
        async with chaos_pool:
            config = uvicorn.Config(
                CountAttempts(app, chaos_pool, plan), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, lifespan="on",
            )
            await uvicorn.Server(config).serve()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
