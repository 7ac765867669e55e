"""`python -m receiver`: the receiver's operator commands.

    python -m receiver migrate [--database-url URL]
    python -m receiver purge --older-than DAYS [--database-url URL]

The database is `--database-url`, else `RECEIVER_DATABASE_URL`, else `postgresql:///receiver`.
Exit codes: 0 success, 1 runtime failure, 2 bad usage; a failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import psycopg

from receiver import store
from receiver.migrate import migrate
from receiver.settings import DEFAULT_DATABASE_URL

PROG = "python -m receiver"
_PURGE_BATCH = 5_000


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{PROG} --help')\n")


def _days(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days, got {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of days, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="The webhook receiver's database commands.")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("RECEIVER_DATABASE_URL") or DEFAULT_DATABASE_URL,
        help="the receiver's PostgreSQL (default: $RECEIVER_DATABASE_URL)",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands.add_parser("migrate", help="create or update the receiver's tables (idempotent)")
    purge = commands.add_parser(
        "purge", help="delete inbox rows of events applied more than --older-than days ago"
    )
    purge.add_argument("--older-than", type=_days, required=True, metavar="DAYS")
    return parser


async def _purge(url: str, days: float) -> int:
    total = 0
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        while True:
            deleted = await store.purge_applied(conn, days * 86_400, _PURGE_BATCH)
            total += deleted
            if deleted < _PURGE_BATCH:
                return total


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "migrate":
            applied = migrate(args.database_url)
            print(f"applied {', '.join(applied)}" if applied else "up to date")
        else:
            print(f"purged {asyncio.run(_purge(args.database_url, args.older_than))}")
    except psycopg.Error as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
