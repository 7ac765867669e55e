"""Accounts and their ledger entries through the HTTP API (docs/api.md)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ledger.merchants import NewKey
from tests.apihelpers import (
    CURRENCIES,
    Api,
    assert_conserved,
    assert_problem,
    created,
    is_rfc3339_utc,
    start_api,
)

ACCOUNT_FIELDS = {"id", "object", "currency", "balance", "created_at", "metadata"}
ENTRY_FIELDS = {"id", "account", "amount", "balance_after", "currency", "ref", "created_at"}


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


def test_create_account_returns_the_account(api: Api) -> None:
    resp = api.post("/v1/accounts", {"currency": "USD", "metadata": {"customer": "c_42"}})
    acct = created(resp)
    assert resp.headers["content-type"].startswith("application/json")
    assert ACCOUNT_FIELDS <= set(acct)
    assert acct["id"].startswith("acct_")
    assert acct["object"] == "account"
    assert acct["currency"] == "USD"
    assert acct["balance"] == 0
    assert acct["metadata"] == {"customer": "c_42"}
    assert is_rfc3339_utc(acct["created_at"])


def test_metadata_defaults_to_an_empty_object(api: Api) -> None:
    assert api.account("EUR")["metadata"] == {}


@pytest.mark.parametrize("currency", CURRENCIES)
def test_every_required_currency_is_accepted(api: Api, currency: str) -> None:
    acct = api.account(currency)
    assert acct["currency"] == currency
    assert api.get(f"/v1/accounts/{acct['id']}").json()["currency"] == currency


def test_ids_are_unique(api: Api) -> None:
    ids = {api.account()["id"] for _ in range(20)}
    assert len(ids) == 20


def test_retrieve_account(api: Api) -> None:
    acct = api.account("GBP", {"a": "b"})
    resp = api.get(f"/v1/accounts/{acct['id']}")
    assert resp.status_code == 200
    assert resp.json() == acct


def test_retrieve_unknown_account_is_404(api: Api) -> None:
    assert_problem(api.get("/v1/accounts/acct_doesnotexist"), 404, "not_found")


def test_balance_follows_deposits_and_payments(db_url: str, api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    assert a["balance"] == 1_000
    api.payment(a["id"], b["id"], 400)
    assert api.balance(a["id"]) == 600
    assert api.balance(b["id"]) == 400
    assert_conserved(db_url)


def test_list_accounts_newest_first_with_pagination(api: Api) -> None:
    ids = [api.account()["id"] for _ in range(15)]
    newest_first = list(reversed(ids))

    first = api.get("/v1/accounts")
    assert first.status_code == 200
    page = first.json()
    assert page["object"] == "list"
    assert [a["id"] for a in page["data"]] == newest_first[:10]  # default limit 10
    assert page["has_more"] is True
    assert all(a["object"] == "account" for a in page["data"])

    second = api.get("/v1/accounts", {"starting_after": newest_first[9]}).json()
    assert [a["id"] for a in second["data"]] == newest_first[10:]
    assert second["has_more"] is False

    everything = api.get("/v1/accounts", {"limit": 100}).json()
    assert [a["id"] for a in everything["data"]] == newest_first
    assert everything["has_more"] is False

    one = api.get("/v1/accounts", {"limit": 1}).json()
    assert [a["id"] for a in one["data"]] == newest_first[:1]
    assert one["has_more"] is True


def test_list_accounts_ending_before(api: Api) -> None:
    ids = [api.account()["id"] for _ in range(8)]
    newest_first = list(reversed(ids))
    # Stripe: the page just newer than the cursor, still listed newest first.
    page = api.get("/v1/accounts", {"ending_before": newest_first[5], "limit": 3}).json()
    assert [a["id"] for a in page["data"]] == newest_first[2:5]
    assert page["has_more"] is True
    page = api.get("/v1/accounts", {"ending_before": newest_first[2], "limit": 3}).json()
    assert [a["id"] for a in page["data"]] == newest_first[:2]
    assert page["has_more"] is False


def test_list_shows_only_customer_accounts(api: Api) -> None:
    """Deposits and payouts create the merchant's funding and settlement system accounts; they are
    internal and not listed (the contract's accounts are those created by POST /v1/accounts)."""
    a = api.funded_account(500)
    api.payout(a["id"], 100)
    b = api.account("EUR")
    listed = [x["id"] for x in api.list_all("/v1/accounts")]
    assert listed == [b["id"], a["id"]]


def test_entries_of_an_account(db_url: str, api: Api) -> None:
    a = api.account()
    b = api.account()
    dep = api.deposit(a["id"], 500)
    pay = api.payment(a["id"], b["id"], 200)
    po = created(api.payout(a["id"], 50))

    resp = api.get(f"/v1/accounts/{a['id']}/entries")
    assert resp.status_code == 200
    page = resp.json()
    assert page["object"] == "list"
    assert page["has_more"] is False
    entries = page["data"]
    assert [(e["amount"], e["balance_after"], e["ref"]) for e in entries] == [
        (-50, 250, po["id"]),
        (-200, 300, pay["id"]),
        (500, 500, dep["id"]),
    ]
    for e in entries:
        assert ENTRY_FIELDS <= set(e)
        assert e["account"] == a["id"]
        assert e["currency"] == "USD"
        assert is_rfc3339_utc(e["created_at"])
    assert len({e["id"] for e in entries}) == 3

    b_entries = api.get(f"/v1/accounts/{b['id']}/entries").json()["data"]
    assert [(e["amount"], e["balance_after"], e["ref"]) for e in b_entries] == [
        (200, 200, pay["id"])
    ]
    assert_conserved(db_url)


def test_entries_pagination(api: Api) -> None:
    a = api.account()
    for amount in range(1, 8):
        api.deposit(a["id"], amount)
    first = api.get(f"/v1/accounts/{a['id']}/entries", {"limit": 3}).json()
    assert [e["amount"] for e in first["data"]] == [7, 6, 5]
    assert first["has_more"] is True
    second = api.get(
        f"/v1/accounts/{a['id']}/entries",
        {"limit": 3, "starting_after": first["data"][-1]["id"]},
    ).json()
    assert [e["amount"] for e in second["data"]] == [4, 3, 2]
    assert second["has_more"] is True
    every = api.list_all(f"/v1/accounts/{a['id']}/entries")
    assert [e["amount"] for e in every] == [7, 6, 5, 4, 3, 2, 1]
    assert sum(e["amount"] for e in every) == api.balance(a["id"])


def test_entries_of_an_account_without_movements(api: Api) -> None:
    a = api.account()
    page = api.get(f"/v1/accounts/{a['id']}/entries").json()
    assert page == {"object": "list", "data": [], "has_more": False}


def test_entries_of_unknown_account_is_404(api: Api) -> None:
    assert_problem(api.get("/v1/accounts/acct_nope/entries"), 404, "not_found")


def test_account_without_currency_is_refused(api: Api) -> None:
    assert_problem(api.post("/v1/accounts", {}), 400, "invalid_request", "currency")


def test_account_metadata_must_be_an_object(api: Api) -> None:
    assert_problem(
        api.post("/v1/accounts", {"currency": "USD", "metadata": "x"}),
        400, "invalid_request", "metadata",
    )
