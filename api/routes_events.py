"""The events API: the merchant's outbox events in their CloudEvents envelope, newest first,
filtered by `type` and by `subject`."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import uow, validate
from api.errors import InvalidRequest
from api.lists import fetch_one, fetch_page
from ledger.service import Merchant
from outbox.envelope import Event

Result = tuple[int, Any]
_COLUMNS = "id, type, subject, sequence, time, data"


def _event(row: tuple[Any, ...]) -> dict[str, Any]:
    return Event(*row).envelope()


async def get_event(request: Request) -> Response:
    event_id = request.path_params["id"]

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        row = await fetch_one(
            conn,
            f"SELECT {_COLUMNS} FROM outbox.events WHERE id = %s AND merchant_id = %s",
            (event_id, merchant.id),
            f"No such event: {event_id}",
        )
        return 200, _event(row)

    return await uow.read(request, run)


async def list_events(request: Request) -> Response:
    lp = validate.list_params(request.query_params)
    type_ = request.query_params.get("type")
    where = "merchant_id = %s"
    params: list[Any] = []
    if type_ is not None:
        patterns = validate.event_types([type_], "type") if type_ else []
        if not patterns:
            raise InvalidRequest("type must be an event type or a prefix such as payment.*",
                                 param="type")
        pattern = patterns[0]
        if pattern == "*":
            pass
        elif pattern.endswith(".*"):
            where += " AND type LIKE %s"
            params.append(pattern[:-1].replace("_", "\\_") + "%")
        else:
            where += " AND type = %s"
            params.append(pattern)
    subject = request.query_params.get("subject")
    if subject is not None:
        # The subject's events: the unique index on (subject, sequence) finds them.
        where += " AND subject = %s"
        params.append(validate.object_id(subject, "subject"))

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 200, await fetch_page(
            conn,
            f"SELECT {_COLUMNS} FROM outbox.events WHERE {where}",
            [merchant.id, *params],
            lp,
            _event,
        )

    return await uow.read(request, run)


routes = [
    Route("/v1/events", list_events, methods=["GET"]),
    Route("/v1/events/{id}", get_event, methods=["GET"]),
]
