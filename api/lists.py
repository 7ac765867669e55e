"""Reading what a response shows: one object by id (404 when it is not the merchant's), or a
Stripe-style page over time-ordered ids, newest first."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.sql import Composable

from api.errors import NotFound
from api.http import page
from api.validate import ListParams


async def fetch_one(
    conn: AsyncConnection, query: str, params: Sequence[Any] | Mapping[str, Any], missing: str
) -> tuple[Any, ...]:
    """The first row of `query`, or NotFound(`missing`) naming the path's id: another
    merchant's object answers exactly like one that does not exist."""
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    if row is None:
        raise NotFound(missing, param="id")
    return tuple(row)


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
