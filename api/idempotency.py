"""Idempotency keys, reserved in the transaction of the write they protect.

A transaction-scoped advisory lock on (merchant, key) marks a request in progress: a second
request with the same key that cannot take the lock answers 409 `idempotency_key_in_use`. The
stored row (route, body hash, response) is written in the same transaction as the effect, so a
key exists exactly when its effect committed; a rollback leaves neither.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from psycopg import AsyncConnection

from api.errors import IdempotencyKeyInUse, IdempotencyKeyReused, InvalidRequest

MAX_KEY_LENGTH = 255

_BEGIN = """
SELECT l.locked, k.route, k.request_hash, k.response_status, k.response_body
FROM (SELECT pg_try_advisory_xact_lock(hashtextextended(%(lock)s, 0)) AS locked) AS l
LEFT JOIN idempotency_keys k ON k.merchant_id = %(merchant)s AND k.key = %(key)s
"""

_FINISH = """
INSERT INTO idempotency_keys (merchant_id, key, route, request_hash, response_status,
                              response_body)
VALUES (%s, %s, %s, %s, %s, %s)
"""


@dataclass(frozen=True, slots=True)
class Stored:
    status: int
    body: bytes


def validate_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise InvalidRequest(
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters.", param="Idempotency-Key"
        )
    return value


def request_hash(route: str, body: dict[str, Any]) -> bytes:
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(route.encode() + b"\n" + canonical).digest()


async def begin(
    conn: AsyncConnection, merchant_id: str, key: str, route: str, digest: bytes
) -> Stored | None:
    """Reserve the key for this transaction. Returns the stored response to replay, or None when
    the request should run. Raises 409 when it is running elsewhere, 422 on a different request."""
    cur = await conn.execute(
        _BEGIN, {"lock": f"{merchant_id}:{key}", "merchant": merchant_id, "key": key}
    )
    row = await cur.fetchone()
    assert row is not None
    locked, stored_route, stored_hash, status, body = row
    if stored_route is not None:
        if stored_route != route or bytes(stored_hash) != digest:
            raise reused()
        return Stored(status, bytes(body))
    if not locked:
        raise in_use()
    return None


def reused() -> IdempotencyKeyReused:
    return IdempotencyKeyReused(
        "This Idempotency-Key was used with a different request.", param="Idempotency-Key"
    )


def in_use() -> IdempotencyKeyInUse:
    return IdempotencyKeyInUse(
        "A request with this Idempotency-Key is still being processed; retry later.",
        param="Idempotency-Key",
    )


async def finish(
    conn: AsyncConnection,
    merchant_id: str,
    key: str,
    route: str,
    digest: bytes,
    status: int,
    body: bytes,
) -> None:
    await conn.execute(_FINISH, (merchant_id, key, route, digest, status, body))
