"""The example receiver's effects, in its own schema `receiver_example`:

- `balances`: each account's balance as its events tell it. An `account.balance_changed` whose
  `balance` is not the previous balance plus its `delta` is refused (the handler raises, nothing
  is written, the sender retries): a duplicate or a reordering would break that chain at once.
- `applied`: one row per event handed to a handler, in the order they were applied (`position`),
  late events flagged.

`apply` and `apply_late` are the `Inbox` handlers. A late `account.balance_changed` is logged
but not added to the balance: the chain has moved on past it.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import AsyncConnection

from receiver.event import ReceivedEvent

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS receiver_example;
CREATE TABLE IF NOT EXISTS receiver_example.balances (
    account  text PRIMARY KEY,
    currency text NOT NULL,
    balance  bigint NOT NULL,
    sequence bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS receiver_example.applied (
    position   bigserial PRIMARY KEY,
    event_id   text NOT NULL,
    type       text NOT NULL,
    subject    text NOT NULL,
    sequence   bigint NOT NULL,
    late       boolean NOT NULL DEFAULT false,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


class ChainBroken(Exception):
    """A balance event that does not follow from the account's previous balance."""


def create_tables(url: str) -> None:
    with psycopg.connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('receiver_example', 0))")
        conn.execute(SCHEMA)


async def _log(conn: AsyncConnection[Any], event: ReceivedEvent, *, late: bool) -> None:
    await conn.execute(
        "INSERT INTO receiver_example.applied (event_id, type, subject, sequence, late)"
        " VALUES (%s, %s, %s, %s, %s)",
        (event.id, event.type, event.subject, event.sequence, late),
    )


async def apply(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
    await _log(conn, event, late=False)
    data = event.data if isinstance(event.data, dict) else {}
    if event.type == "account.created":
        await conn.execute(
            "INSERT INTO receiver_example.balances (account, currency, balance, sequence)"
            " VALUES (%s, %s, %s, %s)",
            (event.subject, data["currency"], data["balance"], event.sequence),
        )
    elif event.type == "account.balance_changed":
        cur = await conn.execute(
            "SELECT balance, sequence FROM receiver_example.balances WHERE account = %s",
            (event.subject,),
        )
        row = await cur.fetchone()
        if row is None or row[1] + 1 != event.sequence:
            # Events before this one were skipped (gone from the sender): start again from here.
            await conn.execute(
                "INSERT INTO receiver_example.balances (account, currency, balance, sequence)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT (account) DO UPDATE"
                " SET balance = EXCLUDED.balance, sequence = EXCLUDED.sequence",
                (event.subject, data["currency"], data["balance"], event.sequence),
            )
            return
        if row[0] + data["delta"] != data["balance"]:
            raise ChainBroken(
                f"{event.subject} #{event.sequence}: {row[0]} + {data['delta']} is not"
                f" {data['balance']}"
            )
        await conn.execute(
            "UPDATE receiver_example.balances SET balance = %s, sequence = %s WHERE account = %s",
            (data["balance"], event.sequence, event.subject),
        )


async def apply_late(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
    await _log(conn, event, late=True)
