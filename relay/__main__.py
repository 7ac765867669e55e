"""`outbox-relay`: the relay daemon (docs/relay.md, docs/operations.md).

Exit status: 0 after a clean stop (SIGTERM or SIGINT), 1 when it failed, 2 for bad usage or
configuration. A second SIGINT exits at once (130), leaving leases to expire.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from relay import logs
from relay.settings import DEFAULT_RETRY_SCHEDULE, Settings, SettingsError

log = logging.getLogger("relay")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"outbox-relay: {message}", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-relay",
        description="Deliver outbox events to webhook endpoints and handler consumers "
        "(docs/relay.md). Runs until SIGTERM or SIGINT.",
        epilog="Environment (docs/operations.md): DATABASE_URL, the PostgreSQL URL (default "
        "postgresql:///payments; libpq's PG* variables fill in what it leaves out); "
        f"OUTBOX_RETRY_SCHEDULE, seconds before each attempt ({DEFAULT_RETRY_SCHEDULE}); "
        "OUTBOX_HTTP_TIMEOUT, seconds per "
        "attempt (15); OUTBOX_LEASE_SECONDS, how long a claim lasts (60); "
        "OUTBOX_WEBHOOK_ALLOWED_NETWORKS, CIDRs webhook URLs may resolve into although private "
        "or loopback, http:// only there (none); OUTBOX_PURGE_INTERVAL, how often to purge, 0 "
        "or off for never (1h); OUTBOX_RETENTION, what the purge keeps (7d); "
        "OUTBOX_SHUTDOWN_GRACE, seconds in-flight attempts get after SIGTERM (20). Set by "
        "systemd: NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID. Exit codes: 0 after a clean "
        "stop, 1 failure, 2 bad usage or configuration, 130 after a second SIGINT.",
    )
    parser.add_argument("--concurrency", type=int, default=32, metavar="N",
                        help="webhook attempts in flight at once (default 32)")
    parser.add_argument("--batch-size", type=int, default=100, metavar="N",
                        help="deliveries claimed per query (default 100)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="P",
                        help="serve Prometheus metrics on this port (default: none)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="H",
                        help="the address the metrics listen on (default 127.0.0.1; the series "
                        "name every webhook endpoint, so open it only to the operators' network, "
                        "e.g. 0.0.0.0 behind a firewall)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text (default) or json: one JSON object per line")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env(
            concurrency=args.concurrency,
            batch_size=args.batch_size,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            log_format=args.log_format,
        )
    except SettingsError as exc:
        print(f"outbox-relay: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.setup(settings.log_format)
    try:
        code = _loop_runner()(_run(settings))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop where it is installed (it comes with uvicorn[standard]): the relay is one event loop
    that spends its time in socket callbacks, and uvloop's run them at about half the cost."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _run(settings: Settings) -> int:
    from relay.worker import Relay

    relay = Relay(settings)
    if settings.metrics_port is not None:
        try:
            relay.metrics.serve(settings.metrics_host, settings.metrics_port)
        except OSError as exc:
            print(f"outbox-relay: cannot serve metrics on {settings.metrics_host} port "
                  f"{settings.metrics_port}: {exc}", file=sys.stderr)
            return 2
    loop = asyncio.get_running_loop()
    interrupts = 0

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            log.warning("second interrupt: exiting now, leases will expire")
            logging.shutdown()
            os._exit(130)
        log.info("SIGINT: stopping (interrupt again to exit at once)")
        relay.stop()

    def on_sigterm() -> None:
        if not relay.stopping:
            log.info("SIGTERM: stopping")
        relay.stop()

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    return await relay.run()


if __name__ == "__main__":
    main()
