"""Every error of the contract's table: RFC 9457 problem+json with {type, title, status, detail,
code, param?}, never a 500, and nothing written by a refused request."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from api.app import create_app
from ledger.merchants import NewKey
from tests.apihelpers import (
    MAX_AMOUNT,
    Api,
    assert_conserved,
    assert_problem,
    execute,
    free_port,
    snapshot,
    start_api,
)


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


@pytest.fixture
def funded(api: Api) -> dict[str, Any]:
    """Two USD accounts, the first holding 1000, and a payment of 100 between them."""
    a = api.funded_account(1_100)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 100)
    return {"a": a["id"], "b": b["id"], "pay": pay["id"]}


def money_requests(f: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A valid request on every money-moving route."""
    return [
        ("/v1/deposits", {"account": f["a"], "amount": 10, "currency": "USD"}),
        ("/v1/payments", {"source": f["a"], "destination": f["b"], "amount": 10,
                          "currency": "USD"}),
        ("/v1/payouts", {"account": f["a"], "amount": 10, "currency": "USD"}),
    ]


# --- 400 invalid_request --------------------------------------------------------------------------

BAD_AMOUNTS = [0, -1, MAX_AMOUNT + 1, 10**30, 1.0, 1.5, 100.0, "100", "1e3", True, False, None,
               [1], {"value": 1}]


@pytest.mark.parametrize("amount", BAD_AMOUNTS, ids=repr)
def test_bad_amount_is_refused_on_every_route(
    db_url: str, api: Api, funded: dict[str, Any], amount: Any
) -> None:
    before = snapshot(db_url)
    for path, body in money_requests(funded):
        assert_problem(api.post(path, {**body, "amount": amount}), 400, "invalid_request",
                       "amount")
    if amount is not None:  # an explicit null refund amount may mean "the default"
        assert_problem(api.refund(funded["pay"], amount), 400, "invalid_request", "amount")
    assert snapshot(db_url) == before


def test_amount_with_a_fraction_written_as_a_float_literal(
    db_url: str, api: Api, funded: dict[str, Any]
) -> None:
    """`1.0` and `1e2` in the raw body are floats, not integers."""
    before = snapshot(db_url)
    for literal in ("1.0", "1e2", "1E2", "10.00"):
        raw = f'{{"account": "{funded["a"]}", "amount": {literal}, "currency": "USD"}}'
        resp = api.post("/v1/deposits", content=raw.encode(),
                        headers={"Content-Type": "application/json"})
        assert_problem(resp, 400, "invalid_request", "amount")
    assert snapshot(db_url) == before


def test_amount_bounds_are_inclusive(db_url: str, api: Api) -> None:
    a = api.account()
    api.deposit(a["id"], 1)
    api.deposit(a["id"], MAX_AMOUNT - 1)
    assert api.balance(a["id"]) == MAX_AMOUNT
    assert_conserved(db_url)


@pytest.mark.parametrize("currency", ["usd", "Usd", "XYZ", "US", "USDD", "", 840, None, True,
                                      ["USD"]], ids=repr)
def test_bad_currency_is_refused(
    db_url: str, api: Api, funded: dict[str, Any], currency: Any
) -> None:
    before = snapshot(db_url)
    assert_problem(api.post("/v1/accounts", {"currency": currency}), 400, "invalid_request",
                   "currency")
    for path, body in money_requests(funded):
        assert_problem(api.post(path, {**body, "currency": currency}), 400, "invalid_request",
                       "currency")
    assert snapshot(db_url) == before


@pytest.mark.parametrize("field", ["account", "amount", "currency"])
def test_missing_deposit_field(db_url: str, api: Api, funded: dict[str, Any], field: str) -> None:
    body = {"account": funded["a"], "amount": 10, "currency": "USD"}
    del body[field]
    before = snapshot(db_url)
    assert_problem(api.post("/v1/deposits", body), 400, "invalid_request", field)
    assert snapshot(db_url) == before


@pytest.mark.parametrize("field", ["source", "destination", "amount", "currency"])
def test_missing_payment_field(db_url: str, api: Api, funded: dict[str, Any], field: str) -> None:
    body = {"source": funded["a"], "destination": funded["b"], "amount": 10, "currency": "USD"}
    del body[field]
    before = snapshot(db_url)
    assert_problem(api.post("/v1/payments", body), 400, "invalid_request", field)
    assert snapshot(db_url) == before


@pytest.mark.parametrize("field", ["account", "amount", "currency"])
def test_missing_payout_field(db_url: str, api: Api, funded: dict[str, Any], field: str) -> None:
    body = {"account": funded["a"], "amount": 10, "currency": "USD"}
    del body[field]
    before = snapshot(db_url)
    assert_problem(api.post("/v1/payouts", body), 400, "invalid_request", field)
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [("source", 123), ("destination", None), ("description", 5), ("metadata", "x"),
     ("metadata", [1]), ("source", ["acct_x"])],
)
def test_wrong_typed_payment_field(
    db_url: str, api: Api, funded: dict[str, Any], field: str, value: Any
) -> None:
    body = {"source": funded["a"], "destination": funded["b"], "amount": 10, "currency": "USD",
            field: value}
    before = snapshot(db_url)
    assert_problem(api.post("/v1/payments", body), 400, "invalid_request", field)
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    "raw",
    [b"{", b'{"currency": "USD"', b"not json", b'{"currency": "USD",}', b"\xff\xfe\x00",
     b"[1, 2]", b'"USD"', b"null", b"42"],
    ids=repr,
)
def test_malformed_or_non_object_json(db_url: str, api: Api, raw: bytes) -> None:
    before = snapshot(db_url)
    for path in ("/v1/accounts", "/v1/deposits", "/v1/payments", "/v1/payouts",
                 "/v1/webhook_endpoints"):
        resp = api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_problem(resp, 400, "invalid_request")
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    "limit", ["0", "101", "-1", "abc", "1.5", "10x", "1e1", "\u00b2", "\u0661\u0660"]
)
def test_bad_limit(api: Api, funded: dict[str, Any], limit: str) -> None:
    paths = ["/v1/accounts", f"/v1/accounts/{funded['a']}/entries", "/v1/payments",
             "/v1/events", "/v1/webhook_endpoints"]
    for path in paths:
        assert_problem(api.get(path, {"limit": limit}), 400, "invalid_request", "limit")


@pytest.mark.parametrize("limit", ["1", "100"])
def test_limit_bounds_are_inclusive(api: Api, limit: str) -> None:
    for path in ("/v1/accounts", "/v1/payments", "/v1/events", "/v1/webhook_endpoints"):
        resp = api.get(path, {"limit": limit})
        assert resp.status_code == 200, resp.text


# --- 401 unauthenticated ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic c2tfeDo=", "sk_live_abc", "Bearer sk_unknown",
     "Bearer not_a_key", "Token sk_x", "Bearer  sk_x y"],
)
def test_bad_key_is_401(
    db_url: str, api: Api, funded: dict[str, Any], authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    before = snapshot(db_url)
    gets = ["/v1/accounts", f"/v1/accounts/{funded['a']}", f"/v1/payments/{funded['pay']}",
            "/v1/events", "/v1/webhook_endpoints", "/v1/reports/daily?day=2026-01-01"]
    for path in gets:
        assert_problem(api.client.get(path, headers=headers), 401, "unauthenticated")
    for path, body in [("/v1/accounts", {"currency": "USD"}), *money_requests(funded)]:
        resp = api.client.post(path, json=body, headers=headers)
        assert_problem(resp, 401, "unauthenticated")
    assert snapshot(db_url) == before


def test_revoked_key_is_401(db_url: str, api: Api, merchant: NewKey) -> None:
    assert api.get("/v1/accounts").status_code == 200
    execute(db_url, "UPDATE api_keys SET revoked_at = now() WHERE id = %s", (merchant.id,))
    assert_problem(api.get("/v1/accounts"), 401, "unauthenticated")
    assert_problem(api.post("/v1/accounts", {"currency": "USD"}), 401, "unauthenticated")


def test_another_merchants_key_prefix_is_not_enough(api: Api, merchant: NewKey) -> None:
    assert_problem(api.as_key(merchant.api_key[:-1]).get("/v1/accounts"), 401,
                   "unauthenticated")
    assert_problem(api.as_key(merchant.api_key + "x").get("/v1/accounts"), 401,
                   "unauthenticated")


# --- 402, 404, 409 --------------------------------------------------------------------------------


def test_insufficient_funds_402(db_url: str, api: Api, funded: dict[str, Any]) -> None:
    body = assert_problem(api.pay(funded["b"], funded["a"], 101), 402, "insufficient_funds")
    assert body["payment"]["status"] == "failed"
    assert_problem(api.payout(funded["b"], 101), 402, "insufficient_funds")
    assert_conserved(db_url)


def test_risk_declined_402(db_url: str, api: Api, funded: dict[str, Any],
                           merchant: NewKey) -> None:
    execute(db_url, "UPDATE merchants SET risk_max_amount = 5 WHERE id = %s",
            (merchant.merchant_id,))
    body = assert_problem(api.pay(funded["a"], funded["b"], 6), 402, "risk_declined")
    assert body["payment"]["failure_code"] == "risk_declined"
    assert_conserved(db_url)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/accounts/acct_0000000000000000000000000"),
     ("GET", "/v1/accounts/acct_0000000000000000000000000/entries"),
     ("GET", "/v1/payments/pay_0000000000000000000000000"),
     ("POST", "/v1/payments/pay_0000000000000000000000000/refunds"),
     ("GET", "/v1/events/evt_0000000000000000000000000"),
     ("GET", "/v1/webhook_endpoints/we_0000000000000000000000000"),
     ("PATCH", "/v1/webhook_endpoints/we_0000000000000000000000000"),
     ("DELETE", "/v1/webhook_endpoints/we_0000000000000000000000000"),
     ("GET", "/v1/webhook_endpoints/we_0000000000000000000000000/deliveries"),
     ("POST", "/v1/webhook_endpoints/we_0000000000000000000000000/recover"),
     ("GET", "/v1/accounts/garbage"),
     ("GET", "/v1/payments/acct_wrongprefix")],
)
def test_unknown_id_is_404(db_url: str, api: Api, method: str, path: str) -> None:
    before = snapshot(db_url)
    body: dict[str, Any] = {}
    if path.endswith("/recover"):
        body = {"since": "2020-01-01T00:00:00Z"}
    if method == "PATCH":
        body = {"status": "disabled"}
    resp = api.client.request(method, path, headers=api.headers(),
                              json=body if method in ("POST", "PATCH") else None)
    assert_problem(resp, 404, "not_found")
    assert snapshot(db_url) == before


def test_unknown_account_in_a_body_is_404_naming_the_field(
    db_url: str, api: Api, funded: dict[str, Any]
) -> None:
    before = snapshot(db_url)
    assert_problem(api.post("/v1/deposits", {"account": "acct_nope", "amount": 1,
                                             "currency": "USD"}), 404, "not_found", "account")
    assert_problem(api.payout("acct_nope", 1), 404, "not_found", "account")
    assert_problem(api.pay("acct_nope", funded["b"], 1), 404, "not_found", "source")
    assert_problem(api.pay(funded["a"], "acct_nope", 1), 404, "not_found", "destination")
    assert snapshot(db_url) == before


def test_refund_exceeds_payment_409(db_url: str, api: Api, funded: dict[str, Any]) -> None:
    before = snapshot(db_url)
    assert_problem(api.refund(funded["pay"], 101), 409, "refund_exceeds_payment")
    assert snapshot(db_url) == before


def test_currency_mismatch_400(db_url: str, api: Api, funded: dict[str, Any]) -> None:
    eur = api.account("EUR")
    before = snapshot(db_url)
    assert_problem(api.post("/v1/deposits", {"account": eur["id"], "amount": 1,
                                             "currency": "USD"}), 400, "currency_mismatch")
    assert_problem(api.pay(funded["a"], eur["id"], 1), 400, "currency_mismatch")
    assert_problem(api.payout(funded["a"], 1, "GBP"), 400, "currency_mismatch")
    assert snapshot(db_url) == before


# --- 413 and 415 ----------------------------------------------------------------------------------


def test_body_over_64_kib_is_413(db_url: str, api: Api, funded: dict[str, Any]) -> None:
    before = snapshot(db_url)
    padding = "x" * (64 * 1024)
    body = {"currency": "USD", "metadata": {"pad": padding}}
    raw = json.dumps(body).encode()
    assert len(raw) > 64 * 1024
    for path in ("/v1/accounts", "/v1/deposits", "/v1/payments", "/v1/payouts",
                 f"/v1/payments/{funded['pay']}/refunds", "/v1/webhook_endpoints"):
        resp = api.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert_problem(resp, 413, "payload_too_large")
    assert snapshot(db_url) == before


def test_body_one_byte_over_the_limit_is_413(db_url: str, api: Api) -> None:
    head = b'{"currency": "USD", "metadata": {"pad": "'
    tail = b'"}}'
    raw = head + b"x" * (64 * 1024 + 1 - len(head) - len(tail)) + tail
    assert len(raw) == 64 * 1024 + 1
    before = snapshot(db_url)
    resp = api.post("/v1/accounts", content=raw, headers={"Content-Type": "application/json"})
    assert_problem(resp, 413, "payload_too_large")
    assert snapshot(db_url) == before


def test_chunked_body_over_64_kib_is_413(db_url: str, api: Api) -> None:
    """No Content-Length: the limit holds on what is actually read."""
    before = snapshot(db_url)

    def chunks() -> Iterator[bytes]:
        yield b'{"currency": "USD", "metadata": {"pad": "'
        for _ in range(80):
            yield b"x" * 1024
        yield b'"}}'

    resp = api.client.post("/v1/accounts", content=chunks(),
                           headers=api.headers(extra={"Content-Type": "application/json"}))
    assert_problem(resp, 413, "payload_too_large")
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/xml", "text/json", None],
)
def test_non_json_content_type_is_415(
    db_url: str, api: Api, funded: dict[str, Any], content_type: str | None
) -> None:
    before = snapshot(db_url)
    raw = json.dumps({"currency": "USD"}).encode()
    for path, body in [("/v1/accounts", {"currency": "USD"}), *money_requests(funded)]:
        raw = json.dumps(body).encode()
        extra = {} if content_type is None else {"Content-Type": content_type}
        resp = api.client.post(path, content=raw, headers=api.headers(extra=extra))
        assert_problem(resp, 415, "unsupported_media_type")
    assert snapshot(db_url) == before


def test_json_with_charset_is_accepted(db_url: str, api: Api) -> None:
    resp = api.post("/v1/accounts", content=b'{"currency": "USD"}',
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert resp.status_code == 201, resp.text


# --- 503 unavailable ------------------------------------------------------------------------------


def test_database_unreachable_is_503_with_retry_after(merchant: NewKey) -> None:
    """Nothing listens on the port: readiness and every data route answer 503 `unavailable`."""
    dead_url = f"postgresql://postgres@127.0.0.1:{free_port()}/payments?connect_timeout=1"
    with TestClient(create_app(dead_url), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 503
        headers = {"Authorization": f"Bearer {merchant.api_key}"}
        for resp in (
            client.get("/v1/accounts", headers=headers),
            client.post("/v1/accounts", json={"currency": "USD"}, headers=headers),
        ):
            assert_problem(resp, 503, "unavailable")
            assert int(resp.headers["Retry-After"]) >= 0


# --- never a 500 ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"source": {"$ne": 1}, "destination": "x", "amount": 1, "currency": "USD"},
        {"source": "a" * 10_000, "destination": "b", "amount": 1, "currency": "USD"},
        {"source": "acct_\u0000", "destination": "acct_x", "amount": 1, "currency": "USD"},
        {"source": "acct_x'; DROP TABLE accounts; --", "destination": "acct_y", "amount": 1,
         "currency": "USD"},
        {"source": "\U0001f600", "destination": "acct_y", "amount": 1, "currency": "USD"},
        {"amount": 2**64, "currency": "USD", "source": "acct_a", "destination": "acct_b"},
        {"amount": -(2**63), "currency": "USD", "source": "acct_a", "destination": "acct_b"},
        {"amount": 1, "currency": "USD", "source": "acct_a", "destination": "acct_b",
         "metadata": {"deep": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]}},
    ],
)
def test_hostile_payment_bodies_never_500(db_url: str, api: Api, body: dict[str, Any]) -> None:
    before = snapshot(db_url)
    resp = api.post("/v1/payments", body)
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert "Traceback" not in resp.text
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    "raw",
    [b'{"source": "\\ud800", "destination": "acct_y", "amount": 1, "currency": "USD"}',
     b'{"source": "acct_\\u0000", "destination": "acct_y", "amount": 1, "currency": "USD"}',
     b'{"source": "a", "source": "b", "destination": "c", "amount": 1, "currency": "USD"}',
     b'{"amount": 1' + b" " * 60_000 + b"}",
     b"[" * 10_000 + b"]" * 10_000],
    ids=["lone-surrogate", "nul-escape", "duplicate-member", "whitespace", "deep-nesting"],
)
def test_hostile_raw_json_never_500(db_url: str, api: Api, raw: bytes) -> None:
    before = snapshot(db_url)
    resp = api.post("/v1/payments", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    "path",
    ["/v1/accounts/%00", "/v1/accounts/" + "a" * 5000, "/v1/payments/%27%3B--",
     "/v1/events/%F0%9F%98%80", "/v1/accounts?starting_after=%00",
     "/v1/events?type=%00", "/v1/payments?ending_before=" + "z" * 3000],
)
def test_hostile_paths_never_500(api: Api, path: str) -> None:
    resp = api.get(path)
    assert resp.status_code < 500, resp.text
    assert "Traceback" not in resp.text


# --- 422 idempotency_key_reused (409 in use: see test_api_idempotency.py) ---------------------


def test_idempotency_key_reused_422(db_url: str, api: Api, funded: dict[str, Any]) -> None:
    body = {"account": funded["a"], "amount": 10, "currency": "USD"}
    assert api.post("/v1/deposits", body, idem="once").status_code == 201
    before = snapshot(db_url)
    assert_problem(api.post("/v1/deposits", {**body, "amount": 11}, idem="once"), 422,
                   "idempotency_key_reused")
    assert_problem(api.post("/v1/payouts", body, idem="once"), 422, "idempotency_key_reused")
    assert snapshot(db_url) == before


# --- fuzz -----------------------------------------------------------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    # Text a JSON client can send: UTF-8 encodable (no lone surrogates), no NUL.
    | st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8"), max_size=8), inner,
                      max_size=3),
    max_leaves=8,
)
_FIELDS = ["source", "destination", "account", "amount", "currency", "description",
           "metadata", "url", "event_types", "since", "status"]


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    path=st.sampled_from(["/v1/accounts", "/v1/deposits", "/v1/payments", "/v1/payouts",
                          "/v1/webhook_endpoints"]),
    body=st.dictionaries(st.sampled_from(_FIELDS), _JSON, max_size=6),
)
def test_random_json_bodies_never_500(
    db_url: str, api: Api, funded: dict[str, Any], path: str, body: dict[str, Any]
) -> None:
    """Whatever JSON object arrives, the answer is a success or a problem, never a 5xx; a refused
    request writes nothing."""
    before = snapshot(db_url)
    resp = api.post(path, body)
    assert resp.status_code < 500, resp.text
    assert "Traceback" not in resp.text
    if resp.status_code >= 400:
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert snapshot(db_url) == before
    else:
        assert resp.status_code == 201
        assert_conserved(db_url)
