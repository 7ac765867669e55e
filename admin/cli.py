"""`paymentsctl`: the operator's command line.

Exit codes (docs/operations.md): 0 success, 1 runtime failure, 2 bad usage. Every failure is
one line on stderr, `paymentsctl: error: …`; nothing here ever ends in a traceback, because the
person reading it is on call and the script calling it parses stderr.

Tables for people by default, `--json` for scripts. The database is `DATABASE_URL`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from importlib import metadata
from typing import NoReturn

import psycopg
from psycopg import conninfo

from admin import render
from admin.backlog import backlog
from admin.deadletters import UnknownConsumerError, consumer_exists, dead_letters
from admin.retention import PurgeCounts, parse_duration, purge
from db.settings import database_url
from outbox.redrive import Redriven, redrive

PROG = "paymentsctl"
CONNECT_TIMEOUT_SECONDS = 10
DEAD_ERROR_WIDTH = 60

Handler = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A runtime failure with a message fit for the operator: exit 1."""


class UsageError(Exception):
    """Bad usage found after parsing (a value from the environment): exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is one `--help` away)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        where = f"{command}: " if command else ""
        text = " ".join(f"{where}{message}".split())
        self.exit(2, f"{PROG}: error: {text} (see '{self.prog} --help')\n")


# --- argument types -----------------------------------------------------------------------------


def _rfc3339(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid RFC 3339 time {text!r}, e.g. 2026-11-27T00:00:00Z"
        ) from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"time {text!r} has no UTC offset; add Z or e.g. +01:00")
    return value


def _duration(text: str) -> timedelta:
    if re.match(r"\s*-\s*\d", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is negative: give an age, e.g. 7d, 12h or 30m"
        )
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


# --- plumbing -----------------------------------------------------------------------------------


def _conninfo() -> str:
    url = database_url()
    try:
        given = conninfo.conninfo_to_dict(url)
        defaults: dict[str, str | int] = {
            "application_name": PROG,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        }
        extra = {k: v for k, v in defaults.items() if k not in given}
        return conninfo.make_conninfo(url, **extra)
    except psycopg.ProgrammingError as exc:
        raise CommandError(f"invalid DATABASE_URL: {_one_line(exc)}") from None


def _connect() -> psycopg.Connection:
    info = _conninfo()
    try:
        return psycopg.connect(info, autocommit=True)
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot connect to the database: {_one_line(exc)}") from None


async def _connect_async() -> psycopg.AsyncConnection:
    info = _conninfo()
    try:
        return await psycopg.AsyncConnection.connect(info, autocommit=True)
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot connect to the database: {_one_line(exc)}") from None


class _Progress:
    """Progress on stderr, rewritten in place, only for a person watching a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
            self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


# --- commands -----------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from db.migrate import migrate

    url = database_url()
    try:
        migrate(url)
    except psycopg.OperationalError as exc:
        raise CommandError(f"cannot connect to the database: {exc}") from None
    with _connect() as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        name = conn.info.dbname
    _print(f"database {name} is at revision {row[0] if row else 'none'} (head)")
    return 0


def cmd_merchant_create(args: argparse.Namespace) -> int:
    from ledger.merchants import create_merchant

    with _connect() as conn, conn.transaction():
        key = create_merchant(conn, args.name)
    _print(render.to_json({"id": key.merchant_id, "api_key": key.api_key}))
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    from ledger.merchants import create_key

    with _connect() as conn, conn.transaction():
        found = conn.execute(
            "SELECT 1 FROM merchants WHERE id = %s FOR SHARE", (args.merchant_id,)
        ).fetchone()
        if found is None:
            raise CommandError(f"no merchant {args.merchant_id!r}")
        key = create_key(conn, args.merchant_id)
    _print(render.to_json({"id": key.id, "merchant_id": key.merchant_id, "api_key": key.api_key}))
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    from ledger.merchants import revoke_key

    with _connect() as conn, conn.transaction():
        revoke_key(conn, args.key_id)
        row = conn.execute(
            "SELECT id, merchant_id, revoked_at FROM api_keys WHERE id = %s", (args.key_id,)
        ).fetchone()
    if row is None:
        raise CommandError(f"no API key {args.key_id!r}")
    key_id, merchant_id, revoked_at = row
    out = {"id": key_id, "merchant_id": merchant_id, "revoked_at": render.rfc3339(revoked_at)}
    _print(render.to_json(out))
    return 0


def cmd_outbox_status(args: argparse.Namespace) -> int:
    with _connect() as conn:
        rows = backlog(conn)
    if args.json:
        _print(
            render.to_json(
                [
                    {
                        "consumer": r.consumer,
                        "kind": r.kind,
                        "merchant_id": r.merchant_id,
                        "enabled": r.enabled,
                        "pending": r.pending,
                        "in_flight": r.in_flight,
                        "dead": r.dead,
                        "delivered_5m": r.delivered_5m,
                        "oldest_pending_age": render.seconds(r.oldest_pending_age),
                    }
                    for r in rows
                ]
            )
        )
        return 0
    headers = [
        "CONSUMER",
        "KIND",
        "ENABLED",
        "PENDING",
        "IN FLIGHT",
        "DEAD",
        "DELIVERED 5M",
        "OLDEST PENDING",
    ]
    _print(
        render.table(
            headers,
            [
                [
                    r.consumer,
                    r.kind,
                    "yes" if r.enabled else "no",
                    r.pending,
                    r.in_flight,
                    r.dead,
                    r.delivered_5m,
                    render.age(r.oldest_pending_age),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_outbox_dead(args: argparse.Namespace) -> int:
    with _connect() as conn:
        if args.consumer is not None and not consumer_exists(conn, args.consumer):
            # As redrive: a mistyped name must not look like "nothing is dead".
            raise CommandError(str(UnknownConsumerError(args.consumer)))
        rows = dead_letters(conn, args.consumer, args.limit)
    if args.json:
        _print(
            render.to_json(
                [
                    {
                        "consumer": r.consumer,
                        "event": r.event,
                        "type": r.type,
                        "attempts": r.attempts,
                        "last_status_code": r.last_status_code,
                        "last_error": r.last_error,
                        "dead_since": render.rfc3339(r.dead_since),
                    }
                    for r in rows
                ]
            )
        )
        return 0
    if not rows:
        _print("no dead deliveries" + (f" for {args.consumer}" if args.consumer else ""))
        return 0
    headers = ["DEAD SINCE", "CONSUMER", "EVENT", "TYPE", "ATTEMPTS", "LAST STATUS", "LAST ERROR"]
    _print(
        render.table(
            headers,
            [
                [
                    render.rfc3339(r.dead_since),
                    r.consumer,
                    r.event,
                    r.type,
                    r.attempts,
                    r.last_status_code,
                    render.clip(r.last_error, DEAD_ERROR_WIDTH),
                ]
                for r in rows
            ],
        )
    )
    return 0


def cmd_outbox_redrive(args: argparse.Namespace) -> int:
    progress = _Progress()

    async def run() -> Redriven:
        async with await _connect_async() as conn:
            return await redrive(
                conn,
                args.consumer,
                since=args.since,
                batch_size=args.batch_size,
                progress=lambda n: progress.show(f"{n} redriven…"),
            )

    try:
        result = asyncio.run(run())
    except UnknownConsumerError as exc:
        raise CommandError(str(exc)) from None
    finally:
        progress.finish()
    if args.json:
        _print(render.to_json({"consumer": args.consumer, "redriven": result.requeued,
                               "out_of_order_subjects": result.out_of_order_subjects}))
    else:
        count, late = result.requeued, result.out_of_order_subjects
        noun = "delivery" if count == 1 else "deliveries"
        subjects = "subject" if late == 1 else "subjects"
        _print(f"{count} dead {noun} of {args.consumer} back to pending; {late} {subjects} will "
               "receive an event after a later one (out of order)")
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    import asyncio

    from admin.listen import Listener, ListenError

    if not args.api_key:
        raise UsageError("listen needs an API key: --api-key or PAYMENTS_API_KEY")
    listener = Listener(
        api=args.api, api_key=args.api_key, event_types=args.events or ["*"],
        forward_to=args.forward_to, port=args.port, as_json=args.json,
    )
    try:
        return asyncio.run(listener.run())
    except ListenError as exc:
        raise CommandError(str(exc)) from None


def _purge_summary(counts: PurgeCounts) -> str:
    return f"{counts.deliveries} deliveries, {counts.events} events, {counts.attempts} attempts"


def cmd_outbox_purge(args: argparse.Namespace) -> int:
    progress = _Progress()
    with _connect() as conn:
        try:
            counts = purge(
                conn,
                args.older_than,
                batch_size=args.batch_size,
                progress=lambda c: progress.show(f"purging: {_purge_summary(c)}…"),
            )
        finally:
            progress.finish()
    if args.json:
        out = {
            "deliveries": counts.deliveries,
            "events": counts.events,
            "attempts": counts.attempts,
        }
        _print(render.to_json(out))
    else:
        _print(f"{_purge_summary(counts)} purged")
    return 0


# --- the parser ---------------------------------------------------------------------------------


def _version() -> str:
    try:
        return metadata.version("payments-outbox")
    except metadata.PackageNotFoundError:
        return "unknown"


def _subcommands(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    return parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)


def _command(
    group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    handler: Handler | None = None,
    description: str | None = None,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = group.add_parser(
        name, help=help_text, description=description or help_text
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Operate the payments service: migrations, merchants and keys, the outbox; "
        "and receive its webhooks locally (listen).",
        epilog="The database is DATABASE_URL (default postgresql:///payments; libpq's PG* "
        "variables fill in what it leaves out, and `migrate` names the database after "
        "PGDATABASE, else USER, when the URL names none). `listen` takes the API key from "
        "PAYMENTS_API_KEY unless --api-key is given. Exit codes: 0 success, 1 runtime failure, "
        "2 bad usage.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = _subcommands(parser)

    _command(
        commands,
        "migrate",
        "create the database if missing and upgrade it to the newest schema",
        cmd_migrate,
        "Create the database if it is missing, then run every pending migration "
        "(alembic upgrade head). Safe to run again: an up-to-date database is left alone.",
    )

    merchant = _subcommands(_command(commands, "merchant", "manage merchants"))
    create = _command(
        merchant,
        "create",
        "create a merchant and its first API key",
        cmd_merchant_create,
        'Create a merchant and an API key; prints {"id": "mer_…", "api_key": "sk_…"}. '
        "The key is shown only here.",
    )
    create.add_argument("name", metavar="NAME", type=_name, help="the merchant's display name")

    key = _subcommands(_command(commands, "key", "manage API keys"))
    key_create = _command(
        key,
        "create",
        "create another API key for a merchant",
        cmd_key_create,
        'Create an API key; prints {"id": "key_…", "merchant_id": "mer_…", "api_key": "sk_…"}. '
        "The key is shown only here.",
    )
    key_create.add_argument("merchant_id", metavar="MERCHANT_ID", help="mer_… id")
    key_revoke = _command(
        key,
        "revoke",
        "revoke an API key",
        cmd_key_revoke,
        'Revoke an API key (requests with it get 401 from now on); prints {"id", "merchant_id", '
        '"revoked_at"}. Revoking a revoked key changes nothing.',
    )
    key_revoke.add_argument("key_id", metavar="KEY_ID", help="key_… id")

    outbox = _subcommands(_command(commands, "outbox", "inspect and repair event delivery"))
    status = _command(
        outbox,
        "status",
        "per consumer: pending, in flight, dead, delivered in 5 min, oldest pending age",
        cmd_outbox_status,
        "One row per consumer, from the view outbox.backlog. With --json, a list of objects; "
        "oldest_pending_age is in seconds.",
    )
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    dead = _command(
        outbox,
        "dead",
        "list dead-lettered deliveries, newest first",
        cmd_outbox_dead,
        "Deliveries that ran out of retries (the view outbox.dead_letters), newest first. "
        "With --json, a list of {consumer, event, type, attempts, last_status_code, "
        "last_error, dead_since}.",
    )
    dead.add_argument("--consumer", metavar="NAME", help="only this consumer's")
    dead.add_argument("--limit", metavar="N", type=_positive_int, help="at most N rows")
    dead.add_argument("--json", action="store_true", help="print JSON instead of a table")

    redrive_cmd = _command(
        outbox,
        "redrive",
        "put a consumer's dead deliveries back to pending",
        cmd_outbox_redrive,
        "Put the dead deliveries of one consumer back to pending, due now (parked until it is "
        "enabled, for a disabled endpoint), with their attempt count reset; prints how many, "
        "and how many subjects will receive a redriven event after a later event of theirs "
        "(out of order, docs/relay.md). Works in batches, each committed on its own.",
    )
    redrive_cmd.add_argument(
        "--consumer",
        metavar="NAME",
        required=True,
        help="consumer name (webhook endpoint id we_… or handler name)",
    )
    redrive_cmd.add_argument(
        "--since",
        metavar="RFC3339",
        type=_rfc3339,
        help="only deliveries dead since then, e.g. 2026-11-27T00:00:00Z",
    )
    redrive_cmd.add_argument(
        "--batch-size",
        metavar="N",
        type=_positive_int,
        default=1_000,
        help="rows per transaction (default 1000)",
    )
    redrive_cmd.add_argument("--json", action="store_true", help="print JSON")

    purge_cmd = _command(
        outbox,
        "purge",
        "delete delivered deliveries and fully delivered events older than a duration",
        cmd_outbox_purge,
        "Delete delivered deliveries acknowledged more than DURATION ago, events older than "
        "DURATION that have no delivery left, and their attempt logs; prints how many. Pending "
        "and dead deliveries, and their events, are never touched. Works in batches, each "
        "committed on its own.",
    )
    purge_cmd.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_duration,
        required=True,
        help="e.g. 7d, 12h, 30m, 45s, or 1d12h",
    )
    purge_cmd.add_argument(
        "--batch-size",
        metavar="N",
        type=_positive_int,
        default=5_000,
        help="rows per transaction (default 5000)",
    )
    purge_cmd.add_argument("--json", action="store_true", help="print JSON")

    listen = _command(
        commands,
        "listen",
        "receive webhooks here, verify and print them (as `stripe listen`)",
        cmd_listen,
        "Register a temporary webhook endpoint for the API key's merchant, through the API, "
        "pointing at a server on 127.0.0.1; verify the signature of every request the relay "
        "sends there and print its event (one line each; the body as JSON with --json), "
        "optionally forwarding it to your app. SIGINT (Ctrl-C) or SIGTERM removes the endpoint "
        "and exits 0. The API and the relay must allow loopback webhook URLs: "
        "OUTBOX_WEBHOOK_ALLOWED_NETWORKS=127.0.0.0/8 (deploy/run-local sets it).",
    )
    listen.add_argument(
        "--api", metavar="URL", default="http://127.0.0.1:8000",
        help="the payments API (default http://127.0.0.1:8000)",
    )
    listen.add_argument(
        "--api-key", metavar="KEY", default=os.environ.get("PAYMENTS_API_KEY"),
        help="the merchant's secret key sk_… (default: PAYMENTS_API_KEY)",
    )
    listen.add_argument(
        "--events", metavar="PATTERN", nargs="+",
        help="event types to receive: *, a prefix such as payment.*, or exact types "
        "(default *)",
    )
    listen.add_argument(
        "--forward-to", metavar="URL",
        help="also POST each verified request (same body and webhook-* headers) to this URL; "
        "its status is the relay's answer",
    )
    listen.add_argument(
        "--port", metavar="P", type=_port, default=0,
        help="the port on 127.0.0.1 to listen on (default: any free one)",
    )
    listen.add_argument("--json", action="store_true",
                        help="print each event's body as one JSON line")
    return parser


def _one_line(exc: BaseException) -> str:
    # A server error's primary message, without the LINE/caret context meant for a terminal.
    primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
    return " ".join((primary or str(exc)).split()) or type(exc).__name__


def _fail(message: str, code: int = 1) -> int:
    sys.stderr.write(f"{PROG}: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return code


# Options whose value may start with '-' ('--older-than -1h'): argparse would take the value for
# another option and say only "expected one argument"; given as '--older-than=-1h', the value
# reaches the option's own check and its message.
_DASHED_VALUES = ("--older-than", "--since")


def _attach_dashed_values(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        if args[i] in _DASHED_VALUES and i + 1 < len(args) and re.match(r"-\d", args[i + 1]):
            out.append(f"{args[i]}={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(_attach_dashed_values(argv))
    handler: Handler = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()
        return code
    except CommandError as exc:
        return _fail(str(exc))
    except UsageError as exc:
        return _fail(str(exc), 2)
    except psycopg.errors.UndefinedTable as exc:
        return _fail(f"database error: {_one_line(exc)} (has 'paymentsctl migrate' run?)")
    except psycopg.OperationalError as exc:
        return _fail(f"lost the database: {_one_line(exc)}")
    except psycopg.Error as exc:
        return _fail(f"database error: {_one_line(exc)}")
    except BrokenPipeError:
        # The reader went away (`| head`): not worth a message, and stdout must not be flushed
        # again at exit or Python prints its own complaint.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:
        return _fail(f"{_describe(exc)}")


def _describe(exc: Exception) -> str:
    # Alembic and SQLAlchemy wrap the driver's error; the driver's text is the useful part.
    orig = getattr(exc, "orig", None)
    if isinstance(orig, BaseException):
        return f"{type(orig).__name__}: {_one_line(orig)}"
    return f"{type(exc).__name__}: {_one_line(exc)}"


if __name__ == "__main__":
    sys.exit(main())
