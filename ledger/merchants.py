"""Merchants and their API keys. Keys are shown once and stored as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import psycopg

from ledger.ids import new_id

KEY_PREFIX = "sk_"


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class NewKey:
    id: str
    merchant_id: str
    api_key: str


def create_merchant(conn: psycopg.Connection, name: str) -> NewKey:
    """Create a merchant and its first key, in the caller's transaction."""
    merchant_id = new_id("mer")
    conn.execute("INSERT INTO merchants (id, name) VALUES (%s, %s)", (merchant_id, name))
    return create_key(conn, merchant_id)


def create_key(conn: psycopg.Connection, merchant_id: str) -> NewKey:
    api_key = generate_key()
    key_id = new_id("key")
    conn.execute(
        "INSERT INTO api_keys (id, merchant_id, key_hash, key_hint) VALUES (%s, %s, %s, %s)",
        (key_id, merchant_id, hash_key(api_key), api_key[-4:]),
    )
    return NewKey(key_id, merchant_id, api_key)


def revoke_key(conn: psycopg.Connection, key_id: str) -> bool:
    cur = conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = %s AND revoked_at IS NULL", (key_id,)
    )
    return cur.rowcount == 1


def key_matches(stored_hash: bytes, api_key: str) -> bool:
    return hmac.compare_digest(stored_hash, hash_key(api_key))
