"""Idempotency keys are kept at least 24 hours and removed after that by the retention purge."""

from __future__ import annotations

from datetime import timedelta

import psycopg

from admin.retention import purge_idempotency_keys
from ledger.merchants import NewKey


def _insert_key(conn: psycopg.Connection, merchant_id: str, key: str, age: str) -> None:
    conn.execute(
        "INSERT INTO idempotency_keys (merchant_id, key, route, request_hash, response_status,"
        " response_body, created_at) VALUES (%s, %s, 'POST /v1/accounts', '\\x00', 201, '{}',"
        " now() - %s::interval)",
        (merchant_id, key, age),
    )


def _keys(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT key FROM idempotency_keys").fetchall()}


def test_keys_older_than_a_day_go_and_younger_ones_stay(db_url: str, merchant: NewKey) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _insert_key(conn, merchant.merchant_id, "fresh", "1 hour")
        _insert_key(conn, merchant.merchant_id, "almost", "23 hours 50 minutes")
        for i in range(7):
            _insert_key(conn, merchant.merchant_id, f"old-{i}", "25 hours")
        assert purge_idempotency_keys(conn, batch_size=3) == 7
        assert _keys(conn) == {"fresh", "almost"}


def test_a_shorter_retention_is_raised_to_the_promised_day(
    db_url: str, merchant: NewKey
) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        _insert_key(conn, merchant.merchant_id, "two-hours", "2 hours")
        assert purge_idempotency_keys(conn, older_than=timedelta(minutes=1)) == 0
        assert _keys(conn) == {"two-hours"}
