"""`payments-api`: serve the HTTP API with uvicorn."""

from __future__ import annotations

import argparse
import ssl
import sys

import uvicorn

from api.logs import log_config


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="payments-api",
        description="Serve the payments HTTP API (docs/api.md) with uvicorn until SIGTERM or "
        "SIGINT.",
        epilog="Environment: DATABASE_URL, the PostgreSQL URL (default postgresql:///payments; "
        "libpq's PG* variables fill in what it leaves out); OUTBOX_WEBHOOK_ALLOWED_NETWORKS, "
        "comma-separated CIDRs that webhook URLs may resolve into although private or "
        "loopback, http:// only there (default: none); PROMETHEUS_MULTIPROC_DIR, an empty "
        "directory for the request metrics of several workers (default: unset). Exit codes: 0 "
        "after SIGTERM, 1 runtime failure, 2 bad usage.",
    )
    parser.add_argument("--host", default="127.0.0.1", metavar="H",
                        help="the address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, metavar="P",
                        help="the TCP port to listen on (default 8000)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="worker processes, each with its own database pool (default 1)")
    parser.add_argument("--ssl-certfile", metavar="F",
                        help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--ssl-keyfile", metavar="F", help="the certificate's private key (PEM)")
    parser.add_argument("--log-level", default="info", metavar="L",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="critical, error, warning, info (default) or debug")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 < args.port < 65536:
        parser.error("--port must be between 1 and 65535")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    from api.routes_webhooks import endpoints_per_merchant

    try:
        endpoints_per_merchant()
    except ValueError as exc:
        parser.error(str(exc))
    if args.ssl_certfile:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                args.ssl_certfile, args.ssl_keyfile
            )
        except (OSError, ssl.SSLError) as exc:
            # The arguments are well-formed; the files are not usable: a runtime failure.
            sys.stderr.write(f"payments-api: error: cannot load the certificate and key: {exc}\n")
            raise SystemExit(1) from None
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        log_config=log_config(args.log_level),
        access_log=False,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        proxy_headers=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
