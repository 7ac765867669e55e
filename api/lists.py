"""Stripe-style cursor pagination over time-ordered ids, newest first."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.sql import Composable

from api.http import page
from api.validate import ListParams


async def fetch_page(
    conn: AsyncConnection,
    select: str,
    params: Sequence[Any],
    lp: ListParams,
    render: Callable[[tuple[Any, ...]], dict[str, Any]],
    id_column: str = "id",
) -> dict[str, Any]:
    """`select` is `SELECT … FROM … WHERE …` (no ORDER BY/LIMIT); rows go through `render`."""
    column = sql.Identifier(*id_column.split("."))
    query: Composable = sql.SQL(select)
    args = list(params)
    if lp.ending_before:
        query = sql.SQL("{} AND {} > %s ORDER BY {} ASC LIMIT %s").format(query, column, column)
        args += [lp.ending_before, lp.limit + 1]
    elif lp.starting_after:
        query = sql.SQL("{} AND {} < %s ORDER BY {} DESC LIMIT %s").format(query, column, column)
        args += [lp.starting_after, lp.limit + 1]
    else:
        query = sql.SQL("{} ORDER BY {} DESC LIMIT %s").format(query, column)
        args += [lp.limit + 1]
    cur = await conn.execute(query, args)
    rows = await cur.fetchall()
    return page([render(r) for r in rows], lp.limit, reverse=bool(lp.ending_before))
