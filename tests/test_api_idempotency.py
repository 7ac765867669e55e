"""Idempotency-Key on every POST (docs/api.md, Idempotency): replay, reuse, the racing case, stored
business failures, malformed requests not stored, key length 1..255."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import psycopg
import pytest

from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    assert_conserved,
    assert_problem,
    created,
    execute,
    live_server,
    new_merchant,
    scalar,
    snapshot,
    start_api,
    wait_for,
)


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


@pytest.fixture
def accts(api: Api) -> dict[str, Any]:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 300)
    return {"a": a["id"], "b": b["id"], "pay": pay["id"]}


def post_requests(f: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/v1/accounts", {"currency": "EUR", "metadata": {"n": "1"}}),
        ("/v1/deposits", {"account": f["a"], "amount": 11, "currency": "USD"}),
        ("/v1/payments", {"source": f["a"], "destination": f["b"], "amount": 7,
                          "currency": "USD", "description": "idem"}),
        (f"/v1/payments/{f['pay']}/refunds", {"amount": 5}),
        ("/v1/payouts", {"account": f["a"], "amount": 3, "currency": "USD"}),
        ("/v1/webhook_endpoints", {"url": "https://1.1.1.1/hooks", "event_types": ["*"]}),
    ]


def is_replay(resp: httpx.Response) -> bool:
    return resp.headers.get("Idempotent-Replayed") == "true"


@pytest.mark.parametrize("index", range(6), ids=["account", "deposit", "payment", "refund",
                                                 "payout", "webhook_endpoint"])
def test_replay_returns_the_first_response_and_writes_nothing(
    db_url: str, api: Api, accts: dict[str, Any], index: int
) -> None:
    path, body = post_requests(accts)[index]
    first = api.post(path, body, idem="key-1")
    assert first.status_code == 201, first.text
    assert not is_replay(first)
    after_first = snapshot(db_url)
    for _ in range(3):
        again = api.post(path, body, idem="key-1")
        assert again.status_code == first.status_code
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["content-type"].startswith("application/json")
    assert snapshot(db_url) == after_first
    assert_conserved(db_url)


def test_different_keys_execute_twice(db_url: str, api: Api, accts: dict[str, Any]) -> None:
    body = {"account": accts["a"], "amount": 10, "currency": "USD"}
    one = created(api.post("/v1/deposits", body, idem="k1"))
    two = created(api.post("/v1/deposits", body, idem="k2"))
    three = created(api.post("/v1/deposits", body))
    assert len({one["id"], two["id"], three["id"]}) == 3
    assert api.balance(accts["a"]) == 700 + 30
    assert_conserved(db_url)


def test_same_key_with_a_different_body_is_422(
    db_url: str, api: Api, accts: dict[str, Any]
) -> None:
    body = {"source": accts["a"], "destination": accts["b"], "amount": 10, "currency": "USD"}
    created(api.post("/v1/payments", body, idem="k"))
    before = snapshot(db_url)
    for changed in ({**body, "amount": 11}, {**body, "description": "x"},
                    {"source": accts["b"], "destination": accts["a"], "amount": 10,
                     "currency": "USD"}):
        assert_problem(api.post("/v1/payments", changed, idem="k"), 422,
                       "idempotency_key_reused")
    assert snapshot(db_url) == before
    # the original still replays
    assert is_replay(api.post("/v1/payments", body, idem="k"))


def test_same_key_on_a_different_route_is_422(
    db_url: str, api: Api, accts: dict[str, Any]
) -> None:
    created(api.post("/v1/deposits", {"account": accts["a"], "amount": 10, "currency": "USD"},
                     idem="shared"))
    before = snapshot(db_url)
    assert_problem(api.post("/v1/payouts", {"account": accts["a"], "amount": 10,
                                            "currency": "USD"}, idem="shared"),
                   422, "idempotency_key_reused")
    assert_problem(api.post("/v1/accounts", {"currency": "USD"}, idem="shared"),
                   422, "idempotency_key_reused")
    assert_problem(api.post(f"/v1/payments/{accts['pay']}/refunds", {}, idem="shared"),
                   422, "idempotency_key_reused")
    assert snapshot(db_url) == before


def test_refunds_of_two_payments_are_different_routes(
    db_url: str, api: Api, accts: dict[str, Any]
) -> None:
    other = api.payment(accts["a"], accts["b"], 50)
    created(api.post(f"/v1/payments/{accts['pay']}/refunds", {"amount": 1}, idem="r"))
    before = snapshot(db_url)
    assert_problem(api.post(f"/v1/payments/{other['id']}/refunds", {"amount": 1}, idem="r"),
                   422, "idempotency_key_reused")
    assert snapshot(db_url) == before


def test_keys_are_scoped_to_the_merchant(db_url: str, api: Api) -> None:
    other = api.as_key(new_merchant(db_url).api_key)
    mine = created(api.post("/v1/accounts", {"currency": "USD"}, idem="same"))
    theirs = other.post("/v1/accounts", {"currency": "USD"}, idem="same")
    assert theirs.status_code == 201
    assert not is_replay(theirs)
    assert theirs.json()["id"] != mine["id"]
    # and each still replays its own
    assert api.post("/v1/accounts", {"currency": "USD"}, idem="same").json() == mine
    assert other.post("/v1/accounts", {"currency": "USD"}, idem="same").json() == theirs.json()


def test_failed_payment_402_is_stored_and_replayed(
    db_url: str, api: Api, accts: dict[str, Any]
) -> None:
    body = {"source": accts["b"], "destination": accts["a"], "amount": 301, "currency": "USD"}
    first = api.post("/v1/payments", body, idem="poor")
    problem = assert_problem(first, 402, "insufficient_funds")
    assert problem["payment"]["status"] == "failed"
    after_first = snapshot(db_url)
    # even once the balance would allow it, the stored failure is what comes back
    api.deposit(accts["b"], 1_000)
    after_deposit = snapshot(db_url)
    again = api.post("/v1/payments", body, idem="poor")
    assert again.status_code == 402
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["content-type"].startswith("application/problem+json")
    assert snapshot(db_url) == after_deposit
    assert after_first["payments"] == after_deposit["payments"]
    assert len(api.events("payment.failed")) == 1
    assert_conserved(db_url)


def test_risk_declined_402_is_replayed(
    db_url: str, api: Api, accts: dict[str, Any], merchant: NewKey
) -> None:
    execute(db_url, "UPDATE merchants SET risk_max_amount = 10 WHERE id = %s",
            (merchant.merchant_id,))
    body = {"source": accts["a"], "destination": accts["b"], "amount": 11, "currency": "USD"}
    first = api.post("/v1/payments", body, idem="risky")
    assert_problem(first, 402, "risk_declined")
    before = snapshot(db_url)
    again = api.post("/v1/payments", body, idem="risky")
    assert (again.status_code, again.json()) == (402, first.json())
    assert is_replay(again)
    assert snapshot(db_url) == before


def test_refund_exceeding_the_payment_is_replayed(
    db_url: str, api: Api, accts: dict[str, Any]
) -> None:
    """A refusal decided under the payment's lock, i.e. after execution began."""
    path = f"/v1/payments/{accts['pay']}/refunds"
    first = api.post(path, {"amount": 301}, idem="too-much")
    assert_problem(first, 409, "refund_exceeds_payment")
    before = snapshot(db_url)
    again = api.post(path, {"amount": 301}, idem="too-much")
    assert (again.status_code, again.json()) == (409, first.json())
    assert is_replay(again)
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    ("raw", "ctype"),
    [(b"{", "application/json"),
     (b'{"account": "x"}', "application/json"),
     (b'{"amount": 1.5}', "application/json"),
     (b'{"account": 1, "amount": 10, "currency": "usd"}', "application/json"),
     (b"account=x", "application/x-www-form-urlencoded")],
)
def test_malformed_requests_are_not_stored(
    db_url: str, api: Api, accts: dict[str, Any], raw: bytes, ctype: str
) -> None:
    before = snapshot(db_url)
    bad = api.post("/v1/deposits", content=raw, idem="fix-me", headers={"Content-Type": ctype})
    assert bad.status_code in (400, 415), bad.text
    assert snapshot(db_url) == before
    good = api.post("/v1/deposits", {"account": accts["a"], "amount": 10, "currency": "USD"},
                    idem="fix-me")
    assert good.status_code == 201, good.text
    assert not is_replay(good)


def test_unauthenticated_requests_are_not_stored(
    db_url: str, api: Api, accts: dict[str, Any]
) -> None:
    body = {"account": accts["a"], "amount": 10, "currency": "USD"}
    before = snapshot(db_url)
    bad = api.as_key("sk_wrong").post("/v1/deposits", body, idem="k")
    assert_problem(bad, 401, "unauthenticated")
    assert snapshot(db_url) == before
    assert not is_replay(created_resp := api.post("/v1/deposits", body, idem="k"))
    assert created_resp.status_code == 201


def test_key_of_255_characters_is_accepted(db_url: str, api: Api) -> None:
    key = "k" * 255
    first = api.post("/v1/accounts", {"currency": "USD"}, idem=key)
    assert first.status_code == 201
    again = api.post("/v1/accounts", {"currency": "USD"}, idem=key)
    assert is_replay(again) and again.json() == first.json()


def test_key_of_one_character_is_accepted(api: Api) -> None:
    first = api.post("/v1/accounts", {"currency": "USD"}, idem="x")
    assert first.status_code == 201
    assert is_replay(api.post("/v1/accounts", {"currency": "USD"}, idem="x"))


@pytest.mark.parametrize("key", ["", "k" * 256, "k" * 1000])
def test_key_outside_1_to_255_characters_is_refused(db_url: str, api: Api, key: str) -> None:
    before = snapshot(db_url)
    assert_problem(api.post("/v1/accounts", {"currency": "USD"}, idem=key), 400,
                   "invalid_request")
    assert snapshot(db_url) == before


def test_key_is_stored_with_the_write(db_url: str, api: Api, accts: dict[str, Any]) -> None:
    before = scalar(db_url, "SELECT count(*) FROM idempotency_keys")
    created(api.post("/v1/deposits", {"account": accts["a"], "amount": 1, "currency": "USD"},
                     idem="stored"))
    assert scalar(db_url, "SELECT count(*) FROM idempotency_keys") == before + 1


# --- racing -------------------------------------------------------------------------------------


def lock_waiters(db_url: str) -> int:
    n: int = scalar(
        db_url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock'",
    )
    return n


def check_one_executed(responses: list[httpx.Response]) -> httpx.Response:
    """Exactly one response executed; each other one is 409 in_use or a replay of it."""
    executed = [r for r in responses if r.status_code == 201 and not is_replay(r)]
    assert len(executed) == 1, [(r.status_code, r.text) for r in responses]
    winner = executed[0]
    for r in responses:
        if r is winner:
            continue
        if r.status_code == 409:
            assert_problem(r, 409, "idempotency_key_in_use")
        else:
            assert r.status_code == 201, r.text
            assert is_replay(r)
            assert r.json() == winner.json()
    return winner


def test_identical_request_while_the_first_still_runs(
    db_url: str, api: Api, accts: dict[str, Any], merchant: NewKey
) -> None:
    """The first request is held inside its transaction (its accounts are locked by another
    session); the second arrives meanwhile and gets 409, or waits and gets the replay."""
    body = {"source": accts["a"], "destination": accts["b"], "amount": 100, "currency": "USD"}
    headers = {"Authorization": f"Bearer {merchant.api_key}", "Idempotency-Key": "race-1"}
    payments_before = scalar(db_url, "SELECT count(*) FROM payments")
    with live_server(db_url) as base, httpx.Client(base_url=base, timeout=60) as http, \
            ThreadPoolExecutor(2) as pool:

        def send() -> httpx.Response:
            return http.post("/v1/payments", json=body, headers=headers)

        blocker = psycopg.connect(db_url)
        try:
            blocker.execute("SELECT 1 FROM accounts WHERE id = ANY(%s) FOR UPDATE",
                            ([accts["a"], accts["b"]],))
            first: Future[httpx.Response] = pool.submit(send)
            wait_for(lambda: lock_waiters(db_url) >= 1, what="the first request to block")
            second = pool.submit(send)
            wait_for(lambda: second.done() or lock_waiters(db_url) >= 2,
                     what="the second request to answer or block")
            if second.done():
                assert_problem(second.result(), 409, "idempotency_key_in_use")
        finally:
            blocker.rollback()
            blocker.close()
        responses = [first.result(), second.result()]
        winner = check_one_executed(responses)
        assert winner is responses[0]
        replay = http.post("/v1/payments", json=body, headers=headers)
        assert replay.status_code == 201 and is_replay(replay)
        assert replay.json() == winner.json()
    assert scalar(db_url, "SELECT count(*) FROM payments") == payments_before + 1
    assert api.balance(accts["a"]) == 600
    assert api.balance(accts["b"]) == 400
    assert_conserved(db_url)


@pytest.mark.parametrize("n", [12])
def test_many_identical_requests_at_once(
    db_url: str, api: Api, accts: dict[str, Any], merchant: NewKey, n: int
) -> None:
    body = {"account": accts["a"], "amount": 25, "currency": "USD"}
    headers = {"Authorization": f"Bearer {merchant.api_key}", "Idempotency-Key": "stampede"}
    deposits_before = scalar(db_url, "SELECT count(*) FROM deposits")
    barrier = threading.Barrier(n)
    with live_server(db_url) as base, ThreadPoolExecutor(n) as pool:

        def send() -> httpx.Response:
            with httpx.Client(base_url=base, timeout=60) as http:
                http.get("/healthz")  # connect before the barrier
                barrier.wait()
                return http.post("/v1/deposits", json=body, headers=headers)

        futures: list[Future[httpx.Response]] = [pool.submit(send) for _ in range(n)]
        responses = [f.result() for f in futures]
    check_one_executed(responses)
    assert scalar(db_url, "SELECT count(*) FROM deposits") == deposits_before + 1
    assert api.balance(accts["a"]) == 700 + 25
    assert_conserved(db_url)
