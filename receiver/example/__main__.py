"""`python -m receiver.example [--host H] [--port P] [--path /webhooks]`: the example receiver
under uvicorn, configured from the environment (receiver/settings.py). It migrates the
receiver's tables and its own at start-up, then serves `POST <path>` and `GET /healthz`.
Exit 2 with one line on stderr for bad configuration, 1 when the database cannot be reached.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import psycopg
import uvicorn
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from receiver.asgi import create_app
from receiver.backfill import EventsApi
from receiver.example import effects
from receiver.inbox import Inbox
from receiver.migrate import migrate
from receiver.settings import ReceiverSettings, SettingsError

PROG = "python -m receiver.example"


async def _healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


def build_app(settings: ReceiverSettings, *, path: str = "/webhooks") -> Starlette:
    """The example's app: the library's webhook route with the example's handlers."""
    pool = AsyncConnectionPool(settings.database_url, min_size=1, max_size=20, open=False)
    events = None
    if settings.events_url is not None and settings.api_key is not None:
        events = EventsApi(settings.events_url, settings.api_key)
    inbox = Inbox(
        pool, settings.secrets, effects.apply, late_handler=effects.apply_late, events=events
    )
    return create_app(inbox, path=path, routes=[Route("/healthz", _healthz)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="The example webhook receiver.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--path", default="/webhooks")
    args = parser.parse_args(argv)
    try:
        settings = ReceiverSettings.from_env()
        if not settings.secrets:
            raise SettingsError("RECEIVER_WEBHOOK_SECRETS is required (the endpoint's whsec_…)")
        app = build_app(settings, path=args.path)
    except (SettingsError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    try:
        migrate(settings.database_url)
        effects.create_tables(settings.database_url)
    except psycopg.Error as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
