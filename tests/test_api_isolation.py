"""Tenant isolation: another merchant's object answers 404 exactly as if it did not exist, on every
route, and lists never show another merchant's objects."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    assert_conserved,
    assert_problem,
    created,
    execute,
    new_merchant,
    snapshot,
    start_api,
)


@dataclass
class World:
    mine: Api
    theirs: Api
    acct: str  # the other merchant's funded USD account
    acct2: str  # the other merchant's second USD account
    pay: str  # the other merchant's payment
    evt: str  # one of the other merchant's events
    we: str  # the other merchant's webhook endpoint
    my_acct: str  # my funded USD account
    my_acct2: str


@pytest.fixture
def world(db_url: str, merchant: NewKey) -> Iterator[World]:
    with start_api(db_url, merchant) as mine:
        theirs = mine.as_key(new_merchant(db_url, "Rival").api_key)
        acct = theirs.funded_account(1_000)["id"]
        acct2 = theirs.account()["id"]
        pay = theirs.payment(acct, acct2, 100)["id"]
        we = created(theirs.post("/v1/webhook_endpoints",
                                 {"url": "https://1.1.1.1/theirs", "event_types": ["*"]}))["id"]
        theirs.payment(acct, acct2, 1)  # a delivery row for their endpoint
        evt = theirs.events()[0]["id"]
        my_acct = mine.funded_account(1_000)["id"]
        my_acct2 = mine.account()["id"]
        yield World(mine, theirs, acct, acct2, pay, evt, we, my_acct, my_acct2)


def test_foreign_account_is_404_like_a_missing_one(db_url: str, world: World) -> None:
    w = world
    before = snapshot(db_url)
    for path in (f"/v1/accounts/{w.acct}", f"/v1/accounts/{w.acct}/entries"):
        foreign = assert_problem(w.mine.get(path), 404, "not_found")
        missing = assert_problem(w.mine.get(path.replace(w.acct, "acct_missing")), 404,
                                 "not_found")
        assert foreign.keys() == missing.keys()
        assert foreign["title"] == missing["title"]
        assert foreign["type"] == missing["type"]
    assert snapshot(db_url) == before


def test_foreign_accounts_cannot_be_moved(db_url: str, world: World) -> None:
    w = world
    before = snapshot(db_url)
    assert_problem(w.mine.post("/v1/deposits", {"account": w.acct, "amount": 5,
                                                "currency": "USD"}), 404, "not_found", "account")
    assert_problem(w.mine.payout(w.acct, 5), 404, "not_found", "account")
    # stealing: their account as source, mine as destination
    assert_problem(w.mine.pay(w.acct, w.my_acct, 5), 404, "not_found", "source")
    # gifting: mine as source, theirs as destination
    assert_problem(w.mine.pay(w.my_acct, w.acct, 5), 404, "not_found", "destination")
    # both foreign
    assert_problem(w.mine.pay(w.acct, w.acct2, 5), 404, "not_found")
    assert snapshot(db_url) == before
    assert w.theirs.balance(w.acct) == 899
    assert_conserved(db_url)


def test_foreign_payment_is_404(db_url: str, world: World) -> None:
    w = world
    before = snapshot(db_url)
    assert_problem(w.mine.get(f"/v1/payments/{w.pay}"), 404, "not_found")
    assert_problem(w.mine.refund(w.pay), 404, "not_found")
    assert_problem(w.mine.refund(w.pay, 1), 404, "not_found")
    assert snapshot(db_url) == before
    assert w.theirs.get(f"/v1/payments/{w.pay}").json()["amount_refunded"] == 0


def test_foreign_event_is_404(db_url: str, world: World) -> None:
    w = world
    assert_problem(w.mine.get(f"/v1/events/{w.evt}"), 404, "not_found")
    assert w.theirs.get(f"/v1/events/{w.evt}").status_code == 200


def test_foreign_webhook_endpoint_is_404_on_every_route(db_url: str, world: World) -> None:
    w = world
    execute(db_url, "UPDATE outbox.deliveries SET status = 'dead', dead_since = now() "
                    "WHERE consumer = %s", (w.we,))
    before = snapshot(db_url)
    base = f"/v1/webhook_endpoints/{w.we}"
    assert_problem(w.mine.get(base), 404, "not_found")
    assert_problem(w.mine.patch(base, {"status": "disabled"}), 404, "not_found")
    assert_problem(w.mine.patch(base, {"url": "https://1.1.1.1/mine"}), 404, "not_found")
    assert_problem(w.mine.get(f"{base}/deliveries"), 404, "not_found")
    assert_problem(w.mine.post(f"{base}/recover", {"since": "2000-01-01T00:00:00Z"}), 404,
                   "not_found")
    assert_problem(w.mine.delete(base), 404, "not_found")
    assert snapshot(db_url) == before
    theirs = w.theirs.get(base).json()
    assert theirs["status"] == "enabled"
    assert theirs["url"] == "https://1.1.1.1/theirs"


def test_lists_never_show_another_merchants_objects(db_url: str, world: World) -> None:
    w = world
    my_we = created(w.mine.post("/v1/webhook_endpoints",
                                {"url": "https://1.1.1.1/mine", "event_types": ["*"]}))
    my_pay = w.mine.payment(w.my_acct, w.my_acct2, 10)["id"]
    w.theirs.payment(w.acct, w.acct2, 2)
    assert [a["id"] for a in w.mine.list_all("/v1/accounts")] == [w.my_acct2, w.my_acct]
    assert [p["id"] for p in w.mine.list_all("/v1/payments")] == [my_pay]
    assert [e["id"] for e in w.mine.list_all("/v1/webhook_endpoints")] == [my_we["id"]]
    my_events = w.mine.events()
    their_events = w.theirs.events()
    assert my_events and their_events
    assert not {e["id"] for e in my_events} & {e["id"] for e in their_events}
    my_objects = {w.my_acct, w.my_acct2, my_pay}
    assert {e["subject"] for e in my_events if e["type"] != "deposit.succeeded"} <= my_objects
    assert all(e["subject"] not in (w.acct, w.acct2, w.pay) for e in my_events)
    assert all(e["data"].get("account") not in (w.acct, w.acct2) for e in my_events)
    for t in ("payment.succeeded", "account.created", "account.balance_changed"):
        assert all(e["type"] == t for e in w.mine.events(t))
        assert not {e["id"] for e in w.mine.events(t)} & {e["id"] for e in w.theirs.events(t)}
    # the other side sees only its own too
    assert set(a["id"] for a in w.theirs.list_all("/v1/accounts")) == {w.acct, w.acct2}
    assert my_pay not in {p["id"] for p in w.theirs.list_all("/v1/payments")}
    # my endpoint received deliveries of my events only
    deliveries = w.mine.get(f"/v1/webhook_endpoints/{my_we['id']}/deliveries",
                            {"limit": 100}).json()["data"]
    delivered = {d["event"] for d in deliveries}
    assert delivered  # the payment's three events
    assert delivered <= {e["id"] for e in my_events}


def test_foreign_cursor_does_not_leak(world: World) -> None:
    """A foreign id as a list cursor is not a way to read another merchant's data."""
    w = world
    for path, cursor in (("/v1/accounts", w.acct), ("/v1/payments", w.pay),
                         ("/v1/events", w.evt), ("/v1/webhook_endpoints", w.we)):
        for param in ("starting_after", "ending_before"):
            resp = w.mine.get(path, {param: cursor})
            assert resp.status_code in (200, 400, 404), resp.text
            if resp.status_code == 200:
                ids = {x["id"] for x in resp.json()["data"]}
                theirs = {x["id"] for x in w.theirs.list_all(path)}
                assert not ids & theirs


def test_reports_are_per_merchant(db_url: str, world: World) -> None:
    w = world
    execute(
        db_url,
        "INSERT INTO daily_reports (merchant_id, day, currency, payments_count, payments_amount) "
        "SELECT merchant_id, '2026-03-04', 'USD', 7, 700 FROM accounts WHERE id = %s",
        (w.acct,),
    )
    mine = w.mine.get("/v1/reports/daily", {"day": "2026-03-04"})
    assert mine.status_code == 200
    assert mine.json()["currencies"] == {}
    theirs = w.theirs.get("/v1/reports/daily", {"day": "2026-03-04"}).json()
    assert theirs["currencies"]["USD"]["payments_count"] == 7
