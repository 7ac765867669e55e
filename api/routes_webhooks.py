"""Webhook endpoints: each one is also an outbox consumer (named by its id) that receives the
merchant's events matching its `event_types`. The signing secret is shown only at creation and
when it is rotated; a rotation keeps the old secret valid for an overlap window, during which the
relay signs every request with both (Standard Webhooks allows several signatures).

A merchant may have at most OUTBOX_WEBHOOK_ENDPOINTS_PER_MERCHANT endpoints (16 by default, as
Stripe allows per account): the relay shares its slots between merchants first and then between a
merchant's endpoints (docs/relay.md), and the cap bounds what one merchant costs every claim."""

from __future__ import annotations

import os
from typing import Any

from psycopg import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import uow, validate
from api.errors import InvalidRequest, WebhookEndpointLimit
from api.http import json_body
from api.lists import fetch_one, fetch_page
from ledger.ids import new_id
from ledger.service import Merchant
from outbox.consumers import delete_consumer, disable_consumer, enable_consumer
from outbox.envelope import rfc3339
from outbox.redrive import redrive
from outbox.signing import new_secret
from outbox.urlguard import UrlRefused, check_url_async

Result = tuple[int, Any]
_COLUMNS = "id, url, event_types, description, status, created_at"
DELIVERY_STATUSES = ("pending", "delivered", "dead")
ROTATION_OVERLAP_DEFAULT = 24 * 3600
ROTATION_OVERLAP_MAX = 7 * 24 * 3600
ENDPOINTS_PER_MERCHANT_VARIABLE = "OUTBOX_WEBHOOK_ENDPOINTS_PER_MERCHANT"
ENDPOINTS_PER_MERCHANT_DEFAULT = 16


def _endpoint(row: tuple[Any, ...], secret: str | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "id": row[0],
        "object": "webhook_endpoint",
        "url": row[1],
        "event_types": list(row[2]),
        "description": row[3],
        "status": row[4],
        "created_at": rfc3339(row[5]),
    }
    if secret is not None:
        obj["secret"] = secret
    return obj


def _allowed_networks() -> str:
    return os.environ.get("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "")


def endpoints_per_merchant() -> int:
    """The cap on a merchant's webhook endpoints, from the environment. Raises ValueError with a
    readable message when the value is not a whole number >= 1 (`payments-api` checks it before
    it serves)."""
    raw = os.environ.get(ENDPOINTS_PER_MERCHANT_VARIABLE, "").strip()
    if not raw:
        return ENDPOINTS_PER_MERCHANT_DEFAULT
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ValueError(f"{ENDPOINTS_PER_MERCHANT_VARIABLE}={raw!r} must be a whole number >= 1")
    return int(raw)


async def _check_url(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 2048:
        raise InvalidRequest("url must be an https:// URL.", param="url")
    try:
        await check_url_async(value, _allowed_networks())
    except UrlRefused as exc:
        raise InvalidRequest(f"url is not allowed: {exc}", param="url") from None
    return value


async def _owned(conn: AsyncConnection, merchant: Merchant, endpoint_id: str) -> tuple[Any, ...]:
    return await fetch_one(
        conn,
        f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE id = %s AND merchant_id = %s",
        (endpoint_id, merchant.id),
        f"No such webhook endpoint: {endpoint_id}",
    )


async def create_endpoint(request: Request) -> Response:
    await uow.authenticated(request)  # before the URL check resolves any name
    body = await json_body(request)
    validate.only(body, "url", "event_types", "description")
    url = await _check_url(validate.required(body, "url"))
    event_types = validate.event_types(validate.required(body, "event_types"))
    description = validate.optional_text(body, "description")

    limit = endpoints_per_merchant()

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        # The merchant's row lock serialises its endpoint creations, so two at once cannot both
        # see room for one. NO KEY UPDATE: the key-share locks of the merchant's payments (their
        # foreign keys) do not conflict with it.
        await conn.execute(
            "SELECT 1 FROM merchants WHERE id = %s FOR NO KEY UPDATE", (merchant.id,)
        )
        cur = await conn.execute(
            "SELECT count(*) FROM webhook_endpoints WHERE merchant_id = %s", (merchant.id,)
        )
        row = await cur.fetchone()
        if row is not None and row[0] >= limit:
            raise WebhookEndpointLimit(
                f"A merchant may have at most {limit} webhook endpoints; delete one first."
            )
        endpoint_id = new_id("we")
        secret = new_secret()
        cur = await conn.execute(
            "INSERT INTO webhook_endpoints (id, merchant_id, url, event_types, description, secret)"
            f" VALUES (%s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
            (endpoint_id, merchant.id, url, event_types, description, secret),
        )
        row = await cur.fetchone()
        assert row is not None
        await conn.execute(
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
            " VALUES (%s, 'webhook', %s, %s)",
            (endpoint_id, merchant.id, event_types),
        )
        return 201, _endpoint(row, secret)

    return await uow.write(request, body, run)


async def get_endpoint(request: Request) -> Response:
    endpoint_id = request.path_params["id"]

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 200, _endpoint(await _owned(conn, merchant, endpoint_id))

    return await uow.read(request, run)


async def list_endpoints(request: Request) -> Response:
    lp = validate.list_params(request.query_params)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 200, await fetch_page(
            conn,
            f"SELECT {_COLUMNS} FROM webhook_endpoints WHERE merchant_id = %s",
            [merchant.id],
            lp,
            _endpoint,
        )

    return await uow.read(request, run)


async def update_endpoint(request: Request) -> Response:
    endpoint_id = request.path_params["id"]
    await uow.authenticated(request)  # before the URL check resolves any name
    body = await json_body(request)
    validate.only(body, "url", "event_types", "status", "description")
    url = await _check_url(body["url"]) if "url" in body else None
    event_types = validate.event_types(body["event_types"]) if "event_types" in body else None
    status = body.get("status")
    if "status" in body and status not in ("enabled", "disabled"):
        raise InvalidRequest('status must be "enabled" or "disabled".', param="status")
    description = validate.optional_text(body, "description")

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        before = await _owned(conn, merchant, endpoint_id)
        cur = await conn.execute(
            "UPDATE webhook_endpoints SET url = coalesce(%s, url),"
            " event_types = coalesce(%s, event_types),"
            " description = CASE WHEN %s THEN %s ELSE description END"
            f" WHERE id = %s RETURNING {_COLUMNS}",
            (url, event_types, "description" in body, description, endpoint_id),
        )
        row = await cur.fetchone()
        assert row is not None
        if event_types is not None:
            await conn.execute(
                "UPDATE outbox.consumers SET event_types = %s WHERE name = %s",
                (event_types, endpoint_id),
            )
        if status == "disabled" and before[4] != "disabled":
            await disable_consumer(conn, endpoint_id, "disabled through the API")
        elif status == "enabled" and before[4] != "enabled":
            await enable_consumer(conn, endpoint_id)
        return 200, _endpoint(await _owned(conn, merchant, endpoint_id))

    return await uow.write(request, body, run)


async def delete_endpoint(request: Request) -> Response:
    endpoint_id = request.path_params["id"]

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        await _owned(conn, merchant, endpoint_id)
        # Also the deliveries of publishers still committing: it waits for them.
        await delete_consumer(conn, endpoint_id)
        await conn.execute("DELETE FROM webhook_endpoints WHERE id = %s", (endpoint_id,))
        return 204, None

    return await uow.write(request, {}, run)


def _delivery(row: tuple[Any, ...]) -> dict[str, Any]:
    event, status, attempts, code, error, next_at, delivered_at = row
    return {
        "object": "webhook_delivery",
        "event": event,
        "status": status,
        "attempts": attempts,
        "last_status_code": code,
        "last_error": error,
        # NULL while parked (endpoint disabled): there is no next attempt until it is enabled.
        "next_attempt_at": rfc3339(next_at) if status == "pending" and next_at else None,
        "delivered_at": rfc3339(delivered_at) if delivered_at else None,
    }


async def list_deliveries(request: Request) -> Response:
    endpoint_id = request.path_params["id"]
    lp = validate.list_params(request.query_params)
    status = request.query_params.get("status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise InvalidRequest("status must be pending, delivered or dead.", param="status")

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        await _owned(conn, merchant, endpoint_id)
        where = "consumer = %s" + (" AND status = %s" if status else "")
        params = [endpoint_id] + ([status] if status else [])
        return 200, await fetch_page(
            conn,
            "SELECT event_id, status, attempts, last_status_code, last_error,"
            f" CASE WHEN isfinite(next_attempt_at) THEN next_attempt_at END, delivered_at"
            f" FROM outbox.deliveries WHERE {where}",
            params,
            lp,
            _delivery,
            id_column="event_id",
        )

    return await uow.read(request, run)


async def recover(request: Request) -> Response:
    endpoint_id = request.path_params["id"]
    body = await json_body(request)
    validate.only(body, "since")
    since = validate.timestamp(validate.required(body, "since"), "since")

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        await _owned(conn, merchant, endpoint_id)
        # The batches commit on a connection of their own, so that a million dead deliveries
        # never become one transaction; this request's transaction keeps the Idempotency-Key
        # reserved meanwhile and records the answer.
        async with uow.pool_of(request).connection() as batches:
            result = await redrive(batches, endpoint_id, since)
        return 202, {"requeued": result.requeued,
                     "out_of_order_subjects": result.out_of_order_subjects}

    return await uow.write(request, body, run)


def _expires_in(body: dict[str, Any]) -> int:
    value = body.get("expires_in")
    if value is None:
        return ROTATION_OVERLAP_DEFAULT
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not 0 <= value <= ROTATION_OVERLAP_MAX
    ):
        raise InvalidRequest(
            f"expires_in must be an integer number of seconds from 0 to {ROTATION_OVERLAP_MAX}.",
            param="expires_in",
        )
    return value


async def rotate_secret(request: Request) -> Response:
    endpoint_id = request.path_params["id"]
    body = await json_body(request)
    validate.only(body, "expires_in")
    expires_in = _expires_in(body)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        secret = new_secret()
        # The current secret becomes the previous one (replacing any earlier previous secret),
        # valid for `expires_in` more seconds; 0 retires it at once. In one statement, so two
        # concurrent rotations serialise on the row and neither loses the other's secret.
        row = await fetch_one(
            conn,
            "UPDATE webhook_endpoints SET"
            " previous_secret = CASE WHEN %(overlap)s > 0 THEN secret END,"
            " previous_secret_expires_at ="
            "   CASE WHEN %(overlap)s > 0 THEN now() + %(overlap)s * interval '1 second' END,"
            " secret = %(secret)s"
            f" WHERE id = %(id)s AND merchant_id = %(merchant)s RETURNING {_COLUMNS}",
            {"overlap": expires_in, "secret": secret, "id": endpoint_id,
             "merchant": merchant.id},
            f"No such webhook endpoint: {endpoint_id}",
        )
        return 200, _endpoint(row, secret)

    return await uow.write(request, body, run)


routes = [
    Route("/v1/webhook_endpoints", create_endpoint, methods=["POST"]),
    Route("/v1/webhook_endpoints", list_endpoints, methods=["GET"]),
    Route("/v1/webhook_endpoints/{id}", get_endpoint, methods=["GET"]),
    Route("/v1/webhook_endpoints/{id}", update_endpoint, methods=["PATCH"]),
    Route("/v1/webhook_endpoints/{id}", delete_endpoint, methods=["DELETE"]),
    Route("/v1/webhook_endpoints/{id}/deliveries", list_deliveries, methods=["GET"]),
    Route("/v1/webhook_endpoints/{id}/recover", recover, methods=["POST"]),
    Route("/v1/webhook_endpoints/{id}/rotate_secret", rotate_secret, methods=["POST"]),
]
