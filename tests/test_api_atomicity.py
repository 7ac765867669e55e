"""Atomicity: a failure injected after the ledger write and before (or at) commit leaves no entry,
no balance change, no business row, no event, no delivery and no idempotency key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import ledger.service
from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    assert_conserved,
    check_chains,
    created,
    execute,
    snapshot,
    start_api,
)

_FAIL_FUNCTION = """
CREATE OR REPLACE FUNCTION public.test_fail_marked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.type = TG_ARGV[0] AND (TG_ARGV[1] = '' OR NEW.data->>'description' = TG_ARGV[1]) THEN
        RAISE EXCEPTION 'injected failure on %', NEW.type;
    END IF;
    RETURN NEW;
END $$
"""


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    execute(db_url, _FAIL_FUNCTION)
    with start_api(db_url, merchant) as client:
        yield client


def fail_events(db_url: str, event_type: str, description: str = "", *,
                at_commit: bool = False) -> None:
    """Make the insert of the matching event fail: immediately (a BEFORE trigger, i.e. after the
    ledger entries and balances were written), or at COMMIT (a deferred constraint trigger)."""
    if at_commit:
        execute(db_url,
                "CREATE CONSTRAINT TRIGGER test_fail AFTER INSERT ON outbox.events "
                "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                f"EXECUTE FUNCTION public.test_fail_marked('{event_type}', '{description}')")
    else:
        execute(db_url,
                "CREATE TRIGGER test_fail BEFORE INSERT ON outbox.events FOR EACH ROW "
                f"EXECUTE FUNCTION public.test_fail_marked('{event_type}', '{description}')")


def heal(db_url: str) -> None:
    execute(db_url, "DROP TRIGGER IF EXISTS test_fail ON outbox.events")


def assert_server_failure(resp: Any) -> None:
    assert resp.status_code >= 500, f"{resp.status_code} {resp.text}"
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert {"type", "title", "status", "detail", "code"} <= set(body)
    assert "Traceback" not in resp.text
    assert "injected failure" not in resp.text  # no internals leak


@pytest.fixture
def setup(api: Api) -> dict[str, Any]:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 400)
    return {"a": a["id"], "b": b["id"], "pay": pay["id"]}


@pytest.mark.parametrize("at_commit", [False, True], ids=["before-commit", "at-commit"])
@pytest.mark.parametrize(
    ("event_type", "request_"),
    [
        ("deposit.succeeded", lambda s: ("/v1/deposits", {"account": s["a"], "amount": 50,
                                                          "currency": "USD"})),
        ("payment.succeeded", lambda s: ("/v1/payments", {
            "source": s["a"], "destination": s["b"], "amount": 50, "currency": "USD"})),
        ("payment.failed", lambda s: ("/v1/payments", {
            "source": s["b"], "destination": s["a"], "amount": 5_000, "currency": "USD"})),
        ("refund.succeeded", lambda s: (f"/v1/payments/{s['pay']}/refunds", {"amount": 50})),
        ("payment.refunded", lambda s: (f"/v1/payments/{s['pay']}/refunds", {})),
        ("account.balance_changed", lambda s: ("/v1/payouts", {"account": s["a"], "amount": 50,
                                                               "currency": "USD"})),
        ("payout.paid", lambda s: ("/v1/payouts", {"account": s["a"], "amount": 50,
                                                   "currency": "USD"})),
        ("account.created", lambda s: ("/v1/accounts", {"currency": "GBP"})),
    ],
    ids=["deposit", "payment", "failed-payment", "refund", "full-refund", "payout-balance",
         "payout", "account"],
)
def test_failure_after_the_ledger_write_leaves_nothing(
    db_url: str, api: Api, setup: dict[str, Any], event_type: str, request_: Any,
    at_commit: bool,
) -> None:
    path, body = request_(setup)
    before = snapshot(db_url)
    fail_events(db_url, event_type, at_commit=at_commit)
    resp = api.post(path, body, idem="retry-me")
    assert_server_failure(resp)
    heal(db_url)
    assert snapshot(db_url) == before
    assert_conserved(db_url)
    # the key was not stored: the same request now runs for real
    again = api.post(path, body, idem="retry-me")
    assert again.status_code in (201, 402), again.text
    assert again.headers.get("Idempotent-Replayed") != "true"
    assert snapshot(db_url) != before
    # sequences stay gap-free after the rolled-back attempt
    check_chains(api, [setup["a"], setup["b"]])
    assert_conserved(db_url)


def test_only_the_marked_payment_fails(db_url: str, api: Api, setup: dict[str, Any]) -> None:
    fail_events(db_url, "payment.succeeded", "explode")
    before = snapshot(db_url)
    assert_server_failure(api.pay(setup["a"], setup["b"], 10, description="explode"))
    assert snapshot(db_url) == before
    ok = api.payment(setup["a"], setup["b"], 10, description="fine")
    assert ok["status"] == "succeeded"
    assert api.balance(setup["a"]) == 590
    assert api.balance(setup["b"]) == 410
    assert_conserved(db_url)


def test_exception_in_publish_rolls_back(
    db_url: str, api: Api, setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """publish() runs last in every movement written in Python; make it write its events, then
    raise. (A payment is one statement, api_create_payment: the trigger-made failures above
    cover it.)"""
    real = ledger.service.publish

    async def publish_then_fail(*args: Any, **kwargs: Any) -> Any:
        await real(*args, **kwargs)
        raise RuntimeError("injected failure after publish")

    before = snapshot(db_url)
    monkeypatch.setattr(ledger.service, "publish", publish_then_fail)
    responses = [
        api.post("/v1/deposits", {"account": setup["a"], "amount": 10, "currency": "USD"}),
        api.refund(setup["pay"], 10),
        api.payout(setup["a"], 10),
    ]
    monkeypatch.setattr(ledger.service, "publish", real)
    for resp in responses:
        assert_server_failure(resp)
    assert snapshot(db_url) == before
    assert_conserved(db_url)
    # the pool is healthy afterwards
    assert created(api.refund(setup["pay"], 10))["amount"] == 10
    assert_conserved(db_url)
