"""Bearer-key authentication. Keys are looked up by their SHA-256 hash and compared in constant
time; revoked keys are refused."""

from __future__ import annotations

from psycopg import AsyncConnection
from starlette.requests import Request

from api.errors import Unauthenticated
from ledger.merchants import KEY_PREFIX, hash_key, key_matches
from ledger.service import Merchant

_LOOKUP = """
SELECT k.key_hash, m.id, m.risk_max_amount, m.risk_max_payments_per_minute
FROM api_keys k JOIN merchants m ON m.id = k.merchant_id
WHERE k.key_hash = %s AND k.revoked_at IS NULL
"""


def bearer_key(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise Unauthenticated("Missing Authorization header: use 'Bearer sk_...'.")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key.startswith(KEY_PREFIX) or len(key) > 200:
        raise Unauthenticated("Malformed Authorization header: use 'Bearer sk_...'.")
    return key


async def authenticate(conn: AsyncConnection, api_key: str) -> Merchant:
    cur = await conn.execute(_LOOKUP, (hash_key(api_key),))
    row = await cur.fetchone()
    if row is None or not key_matches(row[0], api_key):
        raise unknown_key()
    return Merchant(row[1], row[2], row[3])


def unknown_key() -> Unauthenticated:
    return Unauthenticated("Unknown or revoked API key.")
