"""Accounts, entries, deposits, payments, refunds and payouts. Validation here; money moves in
ledger.service."""

from __future__ import annotations

from typing import Any

import orjson
from psycopg import AsyncConnection
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api import idempotency, uow, validate
from api.auth import unknown_key
from api.http import json_body
from api.lists import fetch_one, fetch_page
from ledger import objects, service
from ledger.ids import new_id
from ledger.merchants import hash_key
from ledger.service import Merchant

Result = tuple[int, Any]

_ACCOUNT_COLUMNS = "id, currency, balance, created_at, metadata"
_PAYMENT_COLUMNS = (
    "id, source_id, destination_id, amount, amount_refunded, currency, status, failure_code,"
    " description, metadata, created_at"
)


def _account(row: tuple[Any, ...]) -> dict[str, Any]:
    return objects.account(row[0], row[1], row[2], row[3], row[4])


def _payment(row: tuple[Any, ...]) -> dict[str, Any]:
    return objects.payment(*row)


def _entry(row: tuple[Any, ...]) -> dict[str, Any]:
    return objects.entry(*row)


# --- accounts -----------------------------------------------------------------------------------


async def create_account(request: Request) -> Response:
    body = await json_body(request)
    validate.only(body, "currency", "metadata")
    currency = validate.currency(validate.required(body, "currency"))
    metadata = validate.metadata(body)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 201, await service.create_account(conn, merchant, currency, metadata)

    return await uow.write(request, body, run)


async def get_account(request: Request) -> Response:
    account_id = request.path_params["id"]

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        row = await fetch_one(
            conn,
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts"
            " WHERE id = %s AND merchant_id = %s AND kind = 'customer'",
            (account_id, merchant.id),
            f"No such account: {account_id}",
        )
        return 200, _account(row)

    return await uow.read(request, run)


async def list_accounts(request: Request) -> Response:
    lp = validate.list_params(request.query_params)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 200, await fetch_page(
            conn,
            f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE merchant_id = %s"
            " AND kind = 'customer'",
            [merchant.id],
            lp,
            _account,
        )

    return await uow.read(request, run)


async def list_entries(request: Request) -> Response:
    account_id = request.path_params["id"]
    lp = validate.list_params(request.query_params)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        await fetch_one(
            conn,
            "SELECT 1 FROM accounts WHERE id = %s AND merchant_id = %s AND kind = 'customer'",
            (account_id, merchant.id),
            f"No such account: {account_id}",
        )
        return 200, await fetch_page(
            conn,
            "SELECT id, account_id, amount, balance_after, currency, ref, created_at"
            " FROM ledger_entries WHERE account_id = %s",
            [account_id],
            lp,
            _entry,
        )

    return await uow.read(request, run)


# --- money movements ----------------------------------------------------------------------------


def _movement_fields(body: dict[str, Any]) -> tuple[str, int, str]:
    validate.only(body, "account", "amount", "currency")
    account_id = validate.object_id(validate.required(body, "account"), "account")
    amount = validate.amount(validate.required(body, "amount"))
    currency = validate.currency(validate.required(body, "currency"))
    return account_id, amount, currency


async def create_deposit(request: Request) -> Response:
    body = await json_body(request)
    account_id, amount, currency = _movement_fields(body)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 201, await service.create_deposit(conn, merchant, account_id, amount, currency)

    return await uow.write(request, body, run)


async def create_payout(request: Request) -> Response:
    body = await json_body(request)
    account_id, amount, currency = _movement_fields(body)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 201, await service.create_payout(conn, merchant, account_id, amount, currency)

    return await uow.write(request, body, run)


# POST /v1/payments is one statement (api_create_payment, db/migrations/versions/0003): it
# authenticates, reserves or replays the idempotency key, runs ledger_create_payment, and renders
# and stores the response, all in its own transaction. Validation stays here, before it.
_CREATE_PAYMENT = """
SELECT http_status, body, replayed, merchant
FROM api_create_payment(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


async def create_payment(request: Request) -> Response:
    body = await json_body(request)
    validate.only(body, "source", "destination", "amount", "currency", "description", "metadata")
    source = validate.object_id(validate.required(body, "source"), "source")
    destination = validate.object_id(validate.required(body, "destination"), "destination")
    amount = validate.amount(validate.required(body, "amount"))
    currency = validate.currency(validate.required(body, "currency"))
    description = validate.optional_text(body, "description")
    metadata = validate.metadata(body)

    api_key, key, route, digest = uow.write_request(request, body)
    params = (
        hash_key(api_key), key, route, digest if key else None,
        source, destination, amount, currency, description, orjson.dumps(metadata).decode(),
        new_id("pay"), [new_id("ent"), new_id("ent")], [new_id("evt") for _ in range(3)],
    )

    async def once() -> Response:
        async with uow.pool_of(request).connection() as conn:
            cur = await conn.execute(_CREATE_PAYMENT, params)
            row = await cur.fetchone()
        assert row is not None
        status, raw, replayed, merchant = row
        if status == 401:
            raise unknown_key()
        request.state.merchant = Merchant(merchant)
        if status == 409:
            raise idempotency.in_use()
        if status == 422:
            raise idempotency.reused()
        return uow.respond(status, bytes(raw), replayed)

    return await uow.retrying(once)


async def get_payment(request: Request) -> Response:
    payment_id = request.path_params["id"]

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        row = await fetch_one(
            conn,
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = %s AND merchant_id = %s",
            (payment_id, merchant.id),
            f"No such payment: {payment_id}",
        )
        return 200, _payment(row)

    return await uow.read(request, run)


async def list_payments(request: Request) -> Response:
    lp = validate.list_params(request.query_params)

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 200, await fetch_page(
            conn,
            f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE merchant_id = %s",
            [merchant.id],
            lp,
            _payment,
        )

    return await uow.read(request, run)


async def create_refund(request: Request) -> Response:
    payment_id = request.path_params["id"]
    body = await json_body(request)
    validate.only(body, "amount")
    amount = validate.amount(body["amount"]) if body.get("amount") is not None else None

    async def run(conn: AsyncConnection, merchant: Merchant) -> Result:
        return 201, await service.create_refund(conn, merchant, payment_id, amount)

    return await uow.write(request, body, run)


routes = [
    Route("/v1/accounts", create_account, methods=["POST"]),
    Route("/v1/accounts", list_accounts, methods=["GET"]),
    Route("/v1/accounts/{id}", get_account, methods=["GET"]),
    Route("/v1/accounts/{id}/entries", list_entries, methods=["GET"]),
    Route("/v1/deposits", create_deposit, methods=["POST"]),
    Route("/v1/payments", create_payment, methods=["POST"]),
    Route("/v1/payments", list_payments, methods=["GET"]),
    Route("/v1/payments/{id}", get_payment, methods=["GET"]),
    Route("/v1/payments/{id}/refunds", create_refund, methods=["POST"]),
    Route("/v1/payouts", create_payout, methods=["POST"]),
]
