"""Health, readiness, metrics, OpenAPI and the daily report."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from psycopg import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import uow, validate
from api.errors import Unavailable
from api.http import exact_integer, json_response
from api.metrics import exposition
from api.openapi import document
from ledger.service import Merchant

Result = tuple[int, Any]


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        async with uow.pool_of(request).connection(timeout=2) as conn:
            await conn.execute("SELECT 1")
    except Exception as exc:
        raise Unavailable("The database does not answer.") from exc
    return json_response({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text: request metrics, process metrics, and the outbox backlog read now (a
    database that does not answer sets payments_api_database_up to 0, the rest is served)."""
    body = await exposition(getattr(request.app.state, "pool", None))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


async def openapi(request: Request) -> Response:
    return json_response(document())


async def daily_report(request: Request) -> Response:
    day = validate.day(request.query_params.get("day"))

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        cur = await conn.execute(
            "SELECT currency, payments_count, payments_amount, refunds_amount, deposits_amount,"
            " payouts_amount FROM daily_reports WHERE merchant_id = %s AND day = %s"
            " ORDER BY currency",
            (merchant.id, day),
        )
        currencies = {
            row[0]: {
                "payments_count": row[1],
                "payments_amount": exact_integer(row[2]),
                "refunds_amount": exact_integer(row[3]),
                "deposits_amount": exact_integer(row[4]),
                "payouts_amount": exact_integer(row[5]),
            }
            for row in await cur.fetchall()
        }
        return 200, {"object": "daily_report", "day": day.isoformat(), "currencies": currencies}

    return await uow.read(request, run)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
    Route("/v1/reports/daily", daily_report, methods=["GET"]),
]
