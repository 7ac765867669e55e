"""API keys: stored hashed, several per merchant, revocable with `paymentsctl key revoke`, rotated
without a failed request; anything that is not a live key answers 401 (docs/api.md, Authentication).

Keys are made and revoked by the installed `paymentsctl`, as an operator would, against the
database the API serves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from ledger.merchants import NewKey, hash_key
from tests.apihelpers import Api, assert_problem, live_server, query, start_api


def _paymentsctl() -> str:
    beside_python = Path(sys.executable).parent / "paymentsctl"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("paymentsctl")
    if found is None:
        pytest.fail("paymentsctl is not installed: pip install -e .")
    return found


def ctl(db_url: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [_paymentsctl(), *args],
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"paymentsctl {' '.join(args)}: {result.stderr}"
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def every_row_as_text(db_url: str) -> Iterator[tuple[str, str]]:
    """(table, row as text) for every row of every table of the service's schemas."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema IN ('public', 'outbox') AND table_type = 'BASE TABLE'"
        ).fetchall()
        assert len(tables) >= 10, tables
        for schema, table in tables:
            rows = conn.execute(
                sql.SQL("SELECT t::text FROM {}.{} t").format(
                    sql.Identifier(schema), sql.Identifier(table)
                )
            ).fetchall()
            for (text,) in rows:
                yield f"{schema}.{table}", text


def test_keys_are_stored_hashed_and_never_in_clear(db_url: str) -> None:
    first = ctl(db_url, "merchant", "create", "Hashed Ltd")
    second = ctl(db_url, "key", "create", first["id"])
    keys = [first["api_key"], second["api_key"]]
    assert keys[0] != keys[1]
    for key in keys:
        assert key.startswith("sk_") and len(key) >= 40, "keys must carry enough entropy"
        secret = key.removeprefix("sk_")
        for table, row in every_row_as_text(db_url):
            # The whole key, its secret part, and any 12-character slice of it.
            assert secret not in row, f"{table} holds an API key in clear: {row}"
            slices = {secret[i:i + 12] for i in range(0, len(secret) - 12)}
            assert not any(s in row for s in slices), f"{table} holds part of a key: {row}"
    rows = query(db_url, "SELECT id, key_hash, key_hint FROM api_keys WHERE merchant_id = %s"
                         " ORDER BY id", (first["id"],))
    assert len(rows) == 2
    stored = {bytes(r[1]) for r in rows}
    assert stored == {hash_key(k) for k in keys}, "the stored value is the SHA-256 of the key"
    assert {r[2] for r in rows} == {k[-4:] for k in keys}, "only a four-character hint is kept"


def test_several_keys_of_one_merchant_all_work(db_url: str) -> None:
    merchant = ctl(db_url, "merchant", "create", "Many Keys Ltd")
    keys = [merchant["api_key"]] + [ctl(db_url, "key", "create", merchant["id"])["api_key"]
                                    for _ in range(2)]
    with start_api(db_url, _as_merchant(merchant["id"], keys[0])) as api:
        account = api.account()["id"]
        for key in keys:
            resp = api.as_key(key).get(f"/v1/accounts/{account}")
            assert resp.status_code == 200, resp.text
            assert resp.json()["id"] == account, "every key sees the same merchant"


def test_revoked_key_is_refused_on_the_next_request_and_the_other_keeps_working(
    db_url: str,
) -> None:
    merchant = ctl(db_url, "merchant", "create", "Revoking Ltd")
    old = merchant["api_key"]
    new = ctl(db_url, "key", "create", merchant["id"])
    old_id = query(db_url, "SELECT id FROM api_keys WHERE key_hash = %s", (hash_key(old),))[0][0]
    with start_api(db_url, _as_merchant(merchant["id"], old)) as api:
        account = api.account()["id"]
        assert api.get("/v1/accounts").status_code == 200
        revoked = ctl(db_url, "key", "revoke", old_id)
        assert revoked["id"] == old_id and revoked["revoked_at"]
        # The same client, pool and connection: nothing may remember the key was good.
        body = assert_problem(api.get("/v1/accounts"), 401, "unauthenticated")
        assert old not in json.dumps(body)
        assert_problem(api.post("/v1/accounts", {"currency": "USD"}), 401, "unauthenticated")
        resp = api.as_key(new["api_key"]).get(f"/v1/accounts/{account}")
        assert resp.status_code == 200, resp.text
        # Revoking again changes nothing and does not bring the key back.
        assert ctl(db_url, "key", "revoke", old_id)["revoked_at"] == revoked["revoked_at"]
        assert_problem(api.get("/v1/accounts"), 401, "unauthenticated")


def test_rotation_under_traffic_fails_no_request(db_url: str) -> None:
    """The rotation an operator does: create the new key, move the clients, revoke the old one,
    while requests keep flowing. Every request made with the key in use succeeds."""
    merchant = ctl(db_url, "merchant", "create", "Rotating Ltd")
    current = {"key": merchant["api_key"]}
    results: list[tuple[str, int]] = []
    stop = threading.Event()

    def traffic(base: str) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            while not stop.is_set():
                key = current["key"]
                resp = client.get("/v1/accounts", headers={"Authorization": f"Bearer {key}"})
                results.append((key, resp.status_code))

    with live_server(db_url) as base:
        worker = threading.Thread(target=traffic, args=(base,), daemon=True)
        worker.start()
        try:
            _wait_for_results(results, 20)
            new = ctl(db_url, "key", "create", merchant["id"])
            current["key"] = new["api_key"]
            served_with_new = len(results) + 20
            _wait_for_results(results, served_with_new)
            old_id = query(db_url, "SELECT id FROM api_keys WHERE key_hash = %s",
                           (hash_key(merchant["api_key"]),))[0][0]
            ctl(db_url, "key", "revoke", old_id)
            _wait_for_results(results, len(results) + 20)
        finally:
            stop.set()
            worker.join(30)
        with httpx.Client(base_url=base, timeout=10) as client:
            old = client.get("/v1/accounts",
                             headers={"Authorization": f"Bearer {merchant['api_key']}"})
            assert old.status_code == 401
    failed = [(k[-4:], s) for k, s in results if s != 200]
    assert not failed, f"requests failed during rotation: {failed[:10]}"
    assert {k for k, _ in results} == {merchant["api_key"], new["api_key"]}


def _wait_for_results(results: list[Any], count: int) -> None:
    deadline = time.monotonic() + 30
    while len(results) < count:
        assert time.monotonic() < deadline, "the traffic thread made no progress"
        time.sleep(0.01)


# Everything here is "missing, malformed or unknown" in the contract's words: 401, never 400 or
# 500, never the presented value echoed back.
BAD_AUTHORIZATION: list[tuple[str, bytes | None]] = [
    ("missing", None),
    ("empty", b""),
    ("scheme only", b"Bearer"),
    ("scheme and space", b"Bearer "),
    ("prefix only", b"Bearer sk_"),
    ("unknown key", b"Bearer sk_" + b"A" * 43),
    ("basic scheme", b"Basic c2tfdGVzdDo="),
    ("key without scheme", b"sk_" + b"A" * 43),
    ("wrong prefix", b"Bearer pk_" + b"A" * 43),
    ("upper-case prefix", b"Bearer SK_" + b"A" * 43),
    ("two keys", b"Bearer sk_aaaa sk_bbbb"),
    ("very long key", b"Bearer sk_" + b"A" * 10_000),
    ("non-ASCII key", "Bearer sk_ключ".encode()),
    ("latin-1 bytes", b"Bearer sk_\xe9\xe8"),
    ("SQL in key", b"Bearer sk_' OR '1'='1"),
    ("percent-encoded", b"Bearer sk_%41%41%41"),
    ("the hash of a real key", b""),  # filled in the test: hex of a stored hash
    ("a real key plus a character", b""),
    ("a real key minus its last character", b""),
    ("a real key in another case", b""),
]


def test_missing_malformed_and_unknown_keys_are_401(db_url: str) -> None:
    merchant = ctl(db_url, "merchant", "create", "Keyed Ltd")
    real: str = merchant["api_key"]
    derived = {
        "the hash of a real key": b"Bearer sk_" + hash_key(real).hex().encode(),
        "a real key plus a character": f"Bearer {real}x".encode(),
        "a real key minus its last character": f"Bearer {real[:-1]}".encode(),
        "a real key in another case": f"Bearer {real.swapcase()}".encode(),
    }
    with start_api(db_url, _as_merchant(merchant["id"], real)) as api:
        account = api.account()["id"]
        for what, header in BAD_AUTHORIZATION:
            header = derived.get(what, header)
            for method, path in (("GET", f"/v1/accounts/{account}"), ("GET", "/v1/accounts"),
                                 ("POST", "/v1/accounts")):
                headers = {} if header is None else {"Authorization": header}
                resp = api.client.request(
                    method, path, headers=headers,
                    json={"currency": "USD"} if method == "POST" else None,
                )
                assert resp.status_code == 401, f"{what}: {method} {path} -> {resp.text}"
                body = assert_problem(resp, 401, "unauthenticated")
                credential = (header or b"").partition(b" ")[2].decode("latin-1")
                if len(credential) > 8:
                    assert credential not in json.dumps(body), f"{what}: the key is echoed"
        # None of them created anything; the real key still works.
        assert len(Api(api.client, real).get("/v1/accounts").json()["data"]) == 1


def _as_merchant(merchant_id: str, api_key: str) -> NewKey:
    return NewKey("", merchant_id, api_key)
