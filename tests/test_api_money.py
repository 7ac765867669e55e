"""Deposits, payments, refunds and payouts through the HTTP API, with their ledger entries.
Every test that moves money ends by checking conservation over all accounts."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.merchants import NewKey
from tests.apihelpers import (
    MAX_AMOUNT,
    Api,
    assert_conserved,
    assert_problem,
    created,
    execute,
    is_rfc3339_utc,
    query,
    scalar,
    snapshot,
    start_api,
)

PAYMENT_FIELDS = {
    "id", "object", "source", "destination", "amount", "amount_refunded", "currency", "status",
    "failure_code", "description", "metadata", "created_at",
}


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


def entries_of(db_url: str, ref: str) -> list[tuple[str, int]]:
    return query(db_url, "SELECT account_id, amount FROM ledger_entries WHERE ref = %s "
                         "ORDER BY amount", (ref,))


def system_account(db_url: str, merchant_id: str, kind: str, currency: str = "USD") -> str:
    acct_id: str = scalar(
        db_url,
        "SELECT id FROM accounts WHERE merchant_id = %s AND kind = %s AND currency = %s",
        (merchant_id, kind, currency),
    )
    return acct_id


# --- deposits -----------------------------------------------------------------------------------


def test_deposit(db_url: str, api: Api, merchant: NewKey) -> None:
    a = api.account()
    resp = api.post("/v1/deposits", {"account": a["id"], "amount": 2_500, "currency": "USD"})
    dep = created(resp)
    assert set(dep) >= {"id", "object", "account", "amount", "currency", "status", "created_at"}
    assert dep["id"].startswith("dep_")
    assert dep["object"] == "deposit"
    assert dep["account"] == a["id"]
    assert dep["amount"] == 2_500
    assert dep["currency"] == "USD"
    assert dep["status"] == "succeeded"
    assert is_rfc3339_utc(dep["created_at"])
    assert api.balance(a["id"]) == 2_500
    funding = system_account(db_url, merchant.merchant_id, "funding")
    assert entries_of(db_url, dep["id"]) == [(funding, -2_500), (a["id"], 2_500)]
    assert_conserved(db_url)


def test_deposit_of_the_maximum_amount(db_url: str, api: Api) -> None:
    a = api.account()
    api.deposit(a["id"], MAX_AMOUNT)
    assert api.balance(a["id"]) == MAX_AMOUNT
    assert_conserved(db_url)


def test_deposits_in_several_currencies_are_conserved_separately(db_url: str, api: Api) -> None:
    for currency, amount in (("USD", 100), ("EUR", 200), ("JPY", 300), ("GBP", 1), ("CNY", 9)):
        a = api.account(currency)
        api.deposit(a["id"], amount, currency)
        assert api.balance(a["id"]) == amount
    assert_conserved(db_url)


# --- payments -----------------------------------------------------------------------------------


def test_payment(db_url: str, api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    resp = api.pay(a["id"], b["id"], 300, description="Order 17", metadata={"order": "17"})
    pay = created(resp)
    assert PAYMENT_FIELDS <= set(pay)
    assert pay["id"].startswith("pay_")
    assert pay["object"] == "payment"
    assert pay["source"] == a["id"]
    assert pay["destination"] == b["id"]
    assert pay["amount"] == 300
    assert pay["amount_refunded"] == 0
    assert pay["currency"] == "USD"
    assert pay["status"] == "succeeded"
    assert pay["failure_code"] is None
    assert pay["description"] == "Order 17"
    assert pay["metadata"] == {"order": "17"}
    assert is_rfc3339_utc(pay["created_at"])
    assert api.balance(a["id"]) == 700
    assert api.balance(b["id"]) == 300
    assert entries_of(db_url, pay["id"]) == [(a["id"], -300), (b["id"], 300)]
    assert_conserved(db_url)


def test_payment_defaults(db_url: str, api: Api) -> None:
    a = api.funded_account(10)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 10)
    assert pay["description"] is None
    assert pay["metadata"] == {}
    assert api.balance(a["id"]) == 0
    assert_conserved(db_url)


def test_retrieve_payment(db_url: str, api: Api) -> None:
    a = api.funded_account(100)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 60, description="x")
    resp = api.get(f"/v1/payments/{pay['id']}")
    assert resp.status_code == 200
    assert resp.json() == pay
    assert_conserved(db_url)


def test_retrieve_unknown_payment_is_404(api: Api) -> None:
    assert_problem(api.get("/v1/payments/pay_nope"), 404, "not_found")


def test_list_payments_newest_first(db_url: str, api: Api) -> None:
    a = api.funded_account(100)
    b = api.account()
    ids = [api.payment(a["id"], b["id"], i)["id"] for i in range(1, 13)]
    failed = api.pay(a["id"], b["id"], 10_000)
    assert failed.status_code == 402
    ids.append(failed.json()["payment"]["id"])
    newest_first = list(reversed(ids))
    page = api.get("/v1/payments").json()
    assert page["object"] == "list"
    assert [p["id"] for p in page["data"]] == newest_first[:10]
    assert page["has_more"] is True
    rest = api.get("/v1/payments", {"starting_after": newest_first[9]}).json()
    assert [p["id"] for p in rest["data"]] == newest_first[10:]
    assert rest["has_more"] is False
    assert [p["id"] for p in api.list_all("/v1/payments")] == newest_first
    assert page["data"][0]["status"] == "failed"
    assert_conserved(db_url)


def test_payment_larger_than_the_balance_is_recorded_as_failed(db_url: str, api: Api) -> None:
    a = api.funded_account(100)
    b = api.account()
    resp = api.pay(a["id"], b["id"], 101, description="too much")
    body = assert_problem(resp, 402, "insufficient_funds")
    pay = body["payment"]
    assert PAYMENT_FIELDS <= set(pay)
    assert pay["id"].startswith("pay_")
    assert pay["status"] == "failed"
    assert pay["failure_code"] == "insufficient_funds"
    assert pay["amount"] == 101
    assert pay["amount_refunded"] == 0
    assert pay["source"] == a["id"] and pay["destination"] == b["id"]
    assert pay["description"] == "too much"
    assert api.get(f"/v1/payments/{pay['id']}").json() == pay
    assert api.balance(a["id"]) == 100
    assert api.balance(b["id"]) == 0
    assert entries_of(db_url, pay["id"]) == []
    failed = api.events("payment.failed")
    assert [e["subject"] for e in failed] == [pay["id"]]
    assert failed[0]["data"] == pay
    assert api.events("payment.succeeded") == []
    assert_conserved(db_url)


def test_payment_above_the_risk_limit_is_declined(
    db_url: str, api: Api, merchant: NewKey
) -> None:
    execute(db_url, "UPDATE merchants SET risk_max_amount = 500 WHERE id = %s",
            (merchant.merchant_id,))
    a = api.funded_account(10_000)
    b = api.account()
    ok = api.payment(a["id"], b["id"], 500)
    assert ok["status"] == "succeeded"
    resp = api.pay(a["id"], b["id"], 501)
    pay = assert_problem(resp, 402, "risk_declined")["payment"]
    assert pay["status"] == "failed"
    assert pay["failure_code"] == "risk_declined"
    assert api.get(f"/v1/payments/{pay['id']}").json()["status"] == "failed"
    assert api.balance(a["id"]) == 9_500
    assert entries_of(db_url, pay["id"]) == []
    assert [e["subject"] for e in api.events("payment.failed")] == [pay["id"]]
    assert_conserved(db_url)


def test_payments_per_minute_risk_rule(db_url: str, api: Api, merchant: NewKey) -> None:
    execute(db_url, "UPDATE merchants SET risk_max_payments_per_minute = 3 WHERE id = %s",
            (merchant.merchant_id,))
    a = api.funded_account(10_000)
    other = api.funded_account(10_000)
    b = api.account()
    for _ in range(3):
        api.payment(a["id"], b["id"], 1)
    resp = api.pay(a["id"], b["id"], 1)
    pay = assert_problem(resp, 402, "risk_declined")["payment"]
    assert pay["failure_code"] == "risk_declined"
    # the rule counts per source account
    assert api.payment(other["id"], b["id"], 1)["status"] == "succeeded"
    assert api.balance(a["id"]) == 9_997
    assert_conserved(db_url)


def test_payment_between_different_currencies_is_refused(db_url: str, api: Api) -> None:
    usd = api.funded_account(100)
    eur = api.account("EUR")
    before = snapshot(db_url)
    assert_problem(api.pay(usd["id"], eur["id"], 10, "USD"), 400, "currency_mismatch")
    assert_problem(api.pay(usd["id"], eur["id"], 10, "EUR"), 400, "currency_mismatch")
    assert snapshot(db_url) == before
    assert_conserved(db_url)


def test_payment_to_itself_is_refused(db_url: str, api: Api) -> None:
    a = api.funded_account(100)
    before = snapshot(db_url)
    assert_problem(api.pay(a["id"], a["id"], 10), 400, "invalid_request")
    assert snapshot(db_url) == before


def test_payment_from_unknown_account_is_404(db_url: str, api: Api) -> None:
    b = api.account()
    before = snapshot(db_url)
    assert_problem(api.pay("acct_nope", b["id"], 10), 404, "not_found", "source")
    assert_problem(api.pay(b["id"], "acct_nope", 10), 404, "not_found", "destination")
    assert snapshot(db_url) == before


# --- refunds ------------------------------------------------------------------------------------


def test_full_refund_by_default(db_url: str, api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 400)
    resp = api.refund(pay["id"])
    ref = created(resp)
    assert set(ref) >= {"id", "object", "payment", "amount", "currency", "status", "created_at"}
    assert ref["id"].startswith("re_")
    assert ref["object"] == "refund"
    assert ref["payment"] == pay["id"]
    assert ref["amount"] == 400
    assert ref["currency"] == "USD"
    assert ref["status"] == "succeeded"
    assert is_rfc3339_utc(ref["created_at"])
    assert api.balance(a["id"]) == 1_000
    assert api.balance(b["id"]) == 0
    after = api.get(f"/v1/payments/{pay['id']}").json()
    assert after["amount_refunded"] == 400
    assert after["status"] == "succeeded"
    assert entries_of(db_url, ref["id"]) == [(b["id"], -400), (a["id"], 400)]
    assert_conserved(db_url)


def test_refund_without_a_body(db_url: str, api: Api) -> None:
    a = api.funded_account(50)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 50)
    resp = api.client.post(f"/v1/payments/{pay['id']}/refunds", headers=api.headers())
    assert created(resp)["amount"] == 50
    assert_conserved(db_url)


def test_partial_and_repeated_refunds(db_url: str, api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 1_000)
    assert created(api.refund(pay["id"], 300))["amount"] == 300
    assert api.get(f"/v1/payments/{pay['id']}").json()["amount_refunded"] == 300
    assert created(api.refund(pay["id"], 600))["amount"] == 600
    # the default is what remains
    assert created(api.refund(pay["id"]))["amount"] == 100
    assert api.get(f"/v1/payments/{pay['id']}").json()["amount_refunded"] == 1_000
    before = snapshot(db_url)
    assert_problem(api.refund(pay["id"], 1), 409, "refund_exceeds_payment")
    assert_problem(api.refund(pay["id"]), 409, "refund_exceeds_payment")
    assert snapshot(db_url) == before
    assert api.balance(a["id"]) == 1_000
    assert api.balance(b["id"]) == 0
    assert_conserved(db_url)


def test_refund_larger_than_the_payment_is_refused(db_url: str, api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 200)
    api.refund(pay["id"], 150)
    before = snapshot(db_url)
    assert_problem(api.refund(pay["id"], 51), 409, "refund_exceeds_payment", "amount")
    assert snapshot(db_url) == before
    assert api.get(f"/v1/payments/{pay['id']}").json()["amount_refunded"] == 150
    assert_conserved(db_url)


def test_refund_of_unknown_payment_is_404(db_url: str, api: Api) -> None:
    before = snapshot(db_url)
    assert_problem(api.refund("pay_nope", 1), 404, "not_found")
    assert snapshot(db_url) == before


def test_refund_of_a_failed_payment_is_refused(db_url: str, api: Api) -> None:
    a = api.funded_account(10)
    b = api.account()
    failed = api.pay(a["id"], b["id"], 20).json()["payment"]
    before = snapshot(db_url)
    resp = api.refund(failed["id"])
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert snapshot(db_url) == before
    assert_conserved(db_url)


def test_refund_when_the_destination_has_spent_the_money(db_url: str, api: Api) -> None:
    """Customer balances never go below zero, not even for a refund."""
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 600)
    created(api.payout(b["id"], 500))
    before = snapshot(db_url)
    resp = api.refund(pay["id"], 200)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert snapshot(db_url) == before
    assert created(api.refund(pay["id"], 100))["amount"] == 100
    assert api.balance(b["id"]) == 0
    assert_conserved(db_url)


# --- payouts ------------------------------------------------------------------------------------


def test_payout(db_url: str, api: Api, merchant: NewKey) -> None:
    a = api.funded_account(1_000)
    resp = api.payout(a["id"], 400)
    po = created(resp)
    assert set(po) >= {"id", "object", "account", "amount", "currency", "status", "created_at"}
    assert po["id"].startswith("po_")
    assert po["object"] == "payout"
    assert po["account"] == a["id"]
    assert po["amount"] == 400
    assert po["currency"] == "USD"
    assert po["status"] == "paid"
    assert is_rfc3339_utc(po["created_at"])
    assert api.balance(a["id"]) == 600
    settlement = system_account(db_url, merchant.merchant_id, "settlement")
    assert entries_of(db_url, po["id"]) == [(a["id"], -400), (settlement, 400)]
    assert_conserved(db_url)


def test_payout_of_the_whole_balance(db_url: str, api: Api) -> None:
    a = api.funded_account(77)
    created(api.payout(a["id"], 77))
    assert api.balance(a["id"]) == 0
    assert_conserved(db_url)


def test_payout_larger_than_the_balance_is_refused(db_url: str, api: Api) -> None:
    a = api.funded_account(100)
    before = snapshot(db_url)
    assert_problem(api.payout(a["id"], 101), 402, "insufficient_funds")
    assert snapshot(db_url) == before
    assert api.balance(a["id"]) == 100
    assert_conserved(db_url)


def test_payout_currency_mismatch(db_url: str, api: Api) -> None:
    a = api.funded_account(100)
    before = snapshot(db_url)
    assert_problem(api.payout(a["id"], 10, "EUR"), 400, "currency_mismatch")
    assert snapshot(db_url) == before


# --- everything together --------------------------------------------------------------------------


def test_a_day_of_business(db_url: str, api: Api) -> None:
    alice = api.funded_account(10_000)
    bob = api.funded_account(5_000)
    carol = api.account()
    p1 = api.payment(alice["id"], carol["id"], 2_000)
    p2 = api.payment(bob["id"], carol["id"], 4_000)
    created(api.refund(p1["id"], 500))
    created(api.payout(carol["id"], 1_000))
    assert api.pay(bob["id"], alice["id"], 1_001).status_code == 402
    created(api.refund(p2["id"]))
    assert [api.balance(x["id"]) for x in (alice, bob, carol)] == [8_500, 5_000, 500]
    for acct in (alice, bob, carol):
        entries = api.list_all(f"/v1/accounts/{acct['id']}/entries")
        assert sum(e["amount"] for e in entries) == api.balance(acct["id"])
    assert_conserved(db_url)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["deposit", "pay", "refund", "payout"]),
        st.integers(0, 2),
        st.integers(0, 2),
        st.integers(1, 3_000),
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=_OPS)
def test_random_movements_match_a_model(db_url: str, api: Api, ops: list) -> None:
    """Random deposits, payments, refunds and payouts on three fresh accounts agree with a simple
    model; a refused movement changes nothing."""
    accts = [api.account()["id"] for _ in range(3)]
    model = [0, 0, 0]
    payments: list[tuple[str, int, int, int]] = []  # id, source, destination, refundable
    for op, i, j, amount in ops:
        if op == "deposit":
            api.deposit(accts[i], amount)
            model[i] += amount
        elif op == "pay" and i != j:
            resp = api.pay(accts[i], accts[j], amount)
            if model[i] >= amount:
                payments.append((created(resp)["id"], i, j, amount))
                model[i] -= amount
                model[j] += amount
            else:
                assert_problem(resp, 402, "insufficient_funds")
        elif op == "payout":
            resp = api.payout(accts[i], amount)
            if model[i] >= amount:
                created(resp)
                model[i] -= amount
            else:
                assert_problem(resp, 402, "insufficient_funds")
        elif op == "refund" and payments:
            k = amount % len(payments)
            pay_id, src, dst, left = payments[k]
            want = min(left, amount, model[dst])
            if want > 0:
                assert created(api.refund(pay_id, want))["amount"] == want
                payments[k] = (pay_id, src, dst, left - want)
                model[dst] -= want
                model[src] += want
            elif left == 0:
                assert_problem(api.refund(pay_id, 1), 409, "refund_exceeds_payment")
    assert [api.balance(a) for a in accts] == model
    assert_conserved(db_url)


# --- balances at the edge of their range --------------------------------------------------------

BALANCE_MAX = 2**63 - 1  # accounts.balance is a bigint


def move_by_hand(db_url: str, lines: list[tuple[str, int]]) -> None:
    """Ledger lines (account, signed amount) that sum to zero, written the way the ledger writes
    them (entries with balance_after, and the balances): a history that took many movements."""
    from ledger.ids import new_id

    assert sum(delta for _, delta in lines) == 0
    ref = new_id("dep")
    for account, delta in lines:
        execute(
            db_url,
            "WITH a AS (UPDATE accounts SET balance = balance + %(d)s WHERE id = %(a)s"
            " RETURNING currency, balance)"
            " INSERT INTO ledger_entries (id, account_id, amount, balance_after, currency, ref)"
            " SELECT %(id)s, %(a)s, %(d)s, a.balance, a.currency, %(ref)s FROM a",
            {"a": account, "d": delta, "id": new_id("ent"), "ref": ref},
        )


@pytest.mark.parametrize("idem", [None, "edge"], ids=["no key", "Idempotency-Key"])
@pytest.mark.parametrize(
    "case",
    ["deposit: the account", "deposit: the funding account", "payment: the destination",
     "refund: the payer", "payout: the settlement account"],
)
def test_a_balance_that_would_leave_its_range_is_a_clear_400(
    db_url: str, api: Api, merchant: NewKey, case: str, idem: str | None
) -> None:
    """Customer balances grow without bound with deposits and payments, system accounts with the
    merchant's whole volume (funding goes negative). A movement that would take one past what a
    balance can hold is refused like bad input: 400 `invalid_request` on `amount`, nothing
    written, no event, never a 500 (with an Idempotency-Key too, on the payment's SQL path as on
    the others)."""
    big = MAX_AMOUNT
    account = api.account()["id"]
    funding = system_account(db_url, merchant.merchant_id, "funding")
    settlement = system_account(db_url, merchant.merchant_id, "settlement")
    if case == "deposit: the account":
        move_by_hand(db_url, [(funding, -(edge := BALANCE_MAX - big + 1)), (account, edge)])
        path, body = "/v1/deposits", {"account": account, "amount": big, "currency": "USD"}
    elif case == "deposit: the funding account":
        other = api.account()["id"]
        move_by_hand(db_url, [(funding, -(2**62)), (other, 2**62)])
        move_by_hand(db_url, [(funding, -(2**62 - big + 1)), (account, 2**62 - big + 1)])
        path, body = "/v1/deposits", {"account": api.account()["id"], "amount": big,
                                      "currency": "USD"}
    elif case == "payment: the destination":
        source = api.funded_account(big)["id"]
        move_by_hand(db_url, [(funding, -(edge := BALANCE_MAX - big + 1)), (account, edge)])
        path, body = "/v1/payments", {"source": source, "destination": account, "amount": big,
                                      "currency": "USD"}
    elif case == "refund: the payer":
        api.deposit(account, big)
        payment = api.payment(account, api.account()["id"], big)
        move_by_hand(db_url, [(funding, -(edge := BALANCE_MAX - big + 1)), (account, edge)])
        path, body = f"/v1/payments/{payment['id']}/refunds", {}
    else:
        api.deposit(account, big)
        move_by_hand(db_url, [(funding, -(BALANCE_MAX - big)), (settlement, BALANCE_MAX - big)])
        move_by_hand(db_url, [(funding, -1), (settlement, 1)])
        path, body = "/v1/payouts", {"account": account, "amount": big, "currency": "USD"}
    assert_conserved(db_url)
    before = snapshot(db_url)

    for _ in range(2):  # and again (with the same key): the same answer, still nothing written
        problem = assert_problem(api.post(path, body, idem=idem), 400, "invalid_request",
                                 "amount")
        assert "balance" in problem["detail"], problem
        assert snapshot(db_url) == before
    assert_conserved(db_url)
