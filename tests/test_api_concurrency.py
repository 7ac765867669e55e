"""Concurrency through a real server: 16 clients make 600 random payments among 12 accounts over
HTTP (uvicorn on 127.0.0.1). No 5xx, no negative balance, the total is conserved, and every
account's balance equals the sum of its ledger entries read back through the API."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import httpx

from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    assert_conserved,
    check_chains,
    live_server,
    scalar,
)

CLIENTS = 16
PAYMENTS = 600
ACCOUNTS = 12
START_BALANCE = 5_000


async def test_600_random_payments_from_16_clients(db_url: str, merchant: NewKey) -> None:
    auth = {"Authorization": f"Bearer {merchant.api_key}"}
    with live_server(db_url) as base:
        async with httpx.AsyncClient(base_url=base, headers=auth, timeout=120) as setup:
            accounts = []
            for _ in range(ACCOUNTS):
                resp = await setup.post("/v1/accounts", json={"currency": "USD"})
                assert resp.status_code == 201, resp.text
                accounts.append(resp.json()["id"])
                resp = await setup.post("/v1/deposits", json={
                    "account": accounts[-1], "amount": START_BALANCE, "currency": "USD"})
                assert resp.status_code == 201, resp.text

        todo = list(range(PAYMENTS))
        statuses: Counter[int] = Counter()
        problems: list[str] = []
        created_ids: list[str] = []

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            async with httpx.AsyncClient(base_url=base, headers=auth, timeout=120) as http:
                while todo:
                    todo.pop()
                    source, destination = rng.sample(accounts, 2)
                    resp = await http.post("/v1/payments", json={
                        "source": source, "destination": destination,
                        "amount": rng.randint(1, 2_500), "currency": "USD"})
                    statuses[resp.status_code] += 1
                    if resp.status_code == 201:
                        created_ids.append(resp.json()["id"])
                    elif resp.status_code == 402:
                        assert resp.json()["code"] == "insufficient_funds", resp.text
                    else:
                        problems.append(f"{resp.status_code} {resp.text}")

        await asyncio.gather(*(client(seed) for seed in range(CLIENTS)))

        assert problems == [], problems[:5]
        assert sum(statuses.values()) == PAYMENTS
        assert not any(code >= 500 for code in statuses), statuses
        assert statuses[201] > PAYMENTS // 4, statuses  # enough real contention to mean something

        # read everything back through a plain client against the same server
        with httpx.Client(base_url=base, timeout=120) as http:
            api = Api(http, merchant.api_key)
            balances = {a: api.balance(a) for a in accounts}
            assert all(b >= 0 for b in balances.values()), balances
            assert sum(balances.values()) == ACCOUNTS * START_BALANCE
            for acct, balance in balances.items():
                entries = api.list_all(f"/v1/accounts/{acct}/entries")
                assert sum(e["amount"] for e in entries) == balance, acct
                running = 0
                for e in reversed(entries):  # oldest first
                    running += e["amount"]
                    assert e["balance_after"] == running, (acct, e)
                    assert e["balance_after"] >= 0
            listed = api.list_all("/v1/payments")
            assert len(listed) == PAYMENTS
            assert Counter(p["status"] for p in listed) == Counter(
                {"succeeded": statuses[201], "failed": statuses[402]})
            assert {p["id"] for p in listed if p["status"] == "succeeded"} == set(created_ids)
            check_chains(api, accounts)

    assert scalar(db_url, "SELECT count(*) FROM payments") == PAYMENTS
    assert_conserved(db_url)
