"""One unit of work per request: authenticate, run the handler in one transaction, commit or roll
back in this one place.

Writes retry serialization failures and deadlocks inside the service (the client never sees them)
and carry the idempotency protocol; a database that cannot be reached becomes 503 `unavailable`.
`POST /v1/payments` is the exception: the same protocol runs inside one SQL statement
(`api_create_payment`, api/routes_ledger.py), with the same retries around it (`retrying`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import psycopg
from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.requests import Request
from starlette.responses import Response

from api import idempotency
from api.auth import authenticate, bearer_key
from api.errors import InvalidRequest, LedgerError, Unavailable, problem
from api.http import JSONResponse
from ledger.service import Merchant

Handler = Callable[[AsyncConnection, Merchant], Awaitable[tuple[int, Any]]]
MAX_ATTEMPTS = 8
_RETRYABLE = (errors.SerializationFailure, errors.DeadlockDetected)


def pool_of(request: Request) -> AsyncConnectionPool:
    pool: AsyncConnectionPool = request.app.state.pool
    return pool


def _unstorable(exc: psycopg.DataError) -> InvalidRequest:
    """Values PostgreSQL refuses (NUL characters, numbers out of range) are the client's."""
    if isinstance(exc, errors.NumericValueOutOfRange):
        return InvalidRequest("The amount would overflow a balance.", param="amount")
    return InvalidRequest("The request has a value that cannot be stored (e.g. a NUL character).")


async def authenticated(request: Request) -> Merchant:
    """Authenticate on its own, for requests that must not do anything else first (a URL check
    that resolves names) or that were refused before reaching the database."""
    api_key = bearer_key(request)
    try:
        async with pool_of(request).connection() as conn:
            merchant = await authenticate(conn, api_key)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise Unavailable("The database cannot be reached; retry shortly.") from exc
    request.state.merchant = merchant
    return merchant


async def read(request: Request, handler: Handler) -> Response:
    api_key = bearer_key(request)
    try:
        async with pool_of(request).connection() as conn:
            merchant = await authenticate(conn, api_key)
            request.state.merchant = merchant
            status, payload = await handler(conn, merchant)
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise Unavailable("The database cannot be reached; retry shortly.") from exc
    except psycopg.DataError as exc:
        raise _unstorable(exc) from exc
    return respond(status, orjson.dumps(payload))


def write_request(request: Request, body: dict[str, Any]) -> tuple[str, str | None, str, bytes]:
    """What every write checks before touching the database: (API key, Idempotency-Key or None,
    route, request hash; empty without a key)."""
    api_key = bearer_key(request)
    key = idempotency.validate_key(request.headers.get("idempotency-key"))
    route = f"{request.method} {request.url.path}"
    digest = idempotency.request_hash(route, body) if key else b""
    return api_key, key, route, digest


async def write(request: Request, body: dict[str, Any], handler: Handler) -> Response:
    api_key, key, route, digest = write_request(request, body)
    return await retrying(lambda: _write_once(request, api_key, key, route, digest, handler))


async def retrying(attempt_once: Callable[[], Awaitable[Response]]) -> Response:
    """Run one write attempt, again after a serialization failure or a deadlock (the client
    never sees those), and turn database trouble into 503 and unstorable values into 400."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return await attempt_once()
        except _RETRYABLE:
            await asyncio.sleep(random.uniform(0, 0.005 * 2**attempt))
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise Unavailable("The database cannot be reached; retry shortly.") from exc
        except errors.ReadOnlySqlTransaction as exc:
            raise Unavailable("The database is read-only right now; retry later.") from exc
        except psycopg.DataError as exc:
            raise _unstorable(exc) from exc
    raise Unavailable("The request kept conflicting with others; retry shortly.")


async def _write_once(
    request: Request,
    api_key: str,
    key: str | None,
    route: str,
    digest: bytes,
    handler: Handler,
) -> Response:
    # Pipeline mode: statements whose results are not needed yet go out together, so a payment
    # costs four round trips (BEGIN+auth, idempotency, locks, writes+COMMIT) instead of a dozen.
    async with pool_of(request).connection() as conn, conn.pipeline():
        async with conn.transaction():
            merchant = await authenticate(conn, api_key)
            request.state.merchant = merchant
            if key is None:
                status, payload = await handler(conn, merchant)
                return respond(status, orjson.dumps(payload))
            stored = await idempotency.begin(conn, merchant.id, key, route, digest)
            if stored is not None:
                return _replay(stored)
            try:
                async with conn.transaction():  # a savepoint: a refusal keeps the key
                    status, payload = await handler(conn, merchant)
            except LedgerError as exc:
                status, payload = exc.status, problem(exc)
            raw = orjson.dumps(payload)
            await idempotency.finish(conn, merchant.id, key, route, digest, status, raw)
    return respond(status, raw)


def respond(status: int, raw: bytes, replayed: bool = False) -> Response:
    """A JSON response from rendered bytes; 4xx/5xx bodies are problem+json."""
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    if status == 204:
        return Response(status_code=204, headers=headers)
    if status >= 400:
        return Response(raw, status, headers=headers, media_type="application/problem+json")
    return JSONResponse(raw, status_code=status, headers=headers)


def _replay(stored: idempotency.Stored) -> Response:
    return respond(stored.status, stored.body, replayed=True)
