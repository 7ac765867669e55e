"""Operations routes: health, readiness, metrics, the OpenAPI document, and the daily report (read
from daily_reports, which the `reports` consumer maintains; rows are inserted directly here)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    assert_problem,
    execute,
    new_merchant,
    start_api,
)

PROMISED_ROUTES = {
    ("post", "/v1/accounts"),
    ("get", "/v1/accounts"),
    ("get", "/v1/accounts/{}"),
    ("get", "/v1/accounts/{}/entries"),
    ("post", "/v1/deposits"),
    ("post", "/v1/payments"),
    ("get", "/v1/payments"),
    ("get", "/v1/payments/{}"),
    ("post", "/v1/payments/{}/refunds"),
    ("post", "/v1/payouts"),
    ("get", "/v1/events"),
    ("get", "/v1/events/{}"),
    ("post", "/v1/webhook_endpoints"),
    ("get", "/v1/webhook_endpoints"),
    ("get", "/v1/webhook_endpoints/{}"),
    ("patch", "/v1/webhook_endpoints/{}"),
    ("delete", "/v1/webhook_endpoints/{}"),
    ("get", "/v1/webhook_endpoints/{}/deliveries"),
    ("post", "/v1/webhook_endpoints/{}/recover"),
    ("get", "/v1/reports/daily"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
}
REPORT_FIELDS = ("payments_count", "payments_amount", "refunds_amount", "deposits_amount",
                 "payouts_amount")


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


def test_healthz(api: Api) -> None:
    resp = api.client.get("/healthz")
    assert resp.status_code == 200


def test_readyz_when_the_database_answers(api: Api) -> None:
    resp = api.client.get("/readyz")
    assert resp.status_code == 200


def test_metrics_are_prometheus_text(api: Api) -> None:
    a = api.funded_account(10)
    api.get(f"/v1/accounts/{a['id']}")
    resp = api.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(resp.text))
    assert families, "no metrics at all"
    assert any(f.samples for f in families)
    for line in resp.text.splitlines():
        if line.startswith("# "):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* ", line), line
    assert "Traceback" not in resp.text


def test_openapi_31_documents_every_route(api: Api) -> None:
    resp = api.client.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/json")
    doc = resp.json()
    assert re.match(r"^3\.1\.\d+$", doc["openapi"]), doc["openapi"]
    assert doc["info"]["title"] and doc["info"]["version"]
    documented = set()
    for path, item in doc["paths"].items():
        normalised = re.sub(r"\{[^}]+\}", "{}", path)
        for method, operation in item.items():
            if method in ("get", "post", "patch", "delete", "put"):
                documented.add((method, normalised))
                assert operation.get("responses"), (method, path)
    missing = PROMISED_ROUTES - documented
    assert not missing, f"routes missing from openapi.json: {sorted(missing)}"


def test_ops_routes_need_no_key(api: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert api.client.get(path).status_code == 200, path


# --- reports --------------------------------------------------------------------------------------


def report(body: dict[str, object]) -> dict[str, object]:
    """The contract's members (an extra `object` member, Stripe style, is fine)."""
    return {k: body[k] for k in ("day", "currencies")}


def insert_report(db_url: str, merchant_id: str, day: str, currency: str, *values: int) -> None:
    execute(
        db_url,
        "INSERT INTO daily_reports (merchant_id, day, currency, payments_count, payments_amount,"
        " refunds_amount, deposits_amount, payouts_amount) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (merchant_id, day, currency, *values),
    )


def test_daily_report_reads_the_table(db_url: str, api: Api, merchant: NewKey) -> None:
    insert_report(db_url, merchant.merchant_id, "2026-03-04", "USD", 3, 4_500, 200, 10_000, 700)
    insert_report(db_url, merchant.merchant_id, "2026-03-04", "JPY", 1, 999, 0, 5_000, 0)
    insert_report(db_url, merchant.merchant_id, "2026-03-05", "USD", 9, 9, 9, 9, 9)
    other = new_merchant(db_url)
    insert_report(db_url, other.merchant_id, "2026-03-04", "EUR", 5, 5, 5, 5, 5)
    resp = api.get("/v1/reports/daily", {"day": "2026-03-04"})
    assert resp.status_code == 200, resp.text
    assert report(resp.json()) == {
        "day": "2026-03-04",
        "currencies": {
            "USD": dict(zip(REPORT_FIELDS, (3, 4_500, 200, 10_000, 700), strict=True)),
            "JPY": dict(zip(REPORT_FIELDS, (1, 999, 0, 5_000, 0), strict=True)),
        },
    }


def test_daily_report_is_not_computed_on_the_fly(db_url: str, api: Api) -> None:
    """Movements alone do not show in the report until the reports consumer has applied them."""
    a = api.funded_account(1_000)
    api.payment(a["id"], api.account()["id"], 10)
    today = api.get(f"/v1/accounts/{a['id']}").json()["created_at"][:10]
    resp = api.get("/v1/reports/daily", {"day": today})
    assert resp.status_code == 200
    assert report(resp.json()) == {"day": today, "currencies": {}}


def test_daily_report_of_an_empty_day(api: Api) -> None:
    resp = api.get("/v1/reports/daily", {"day": "1999-12-31"})
    assert resp.status_code == 200
    assert report(resp.json()) == {"day": "1999-12-31", "currencies": {}}


@pytest.mark.parametrize("day", [None, "", "2026-02-30", "20260304", "2026-3-4", "yesterday",
                                 "2026-03-04T00:00:00Z", "2026-03-04'"])
def test_daily_report_needs_a_valid_day(api: Api, day: str | None) -> None:
    params = {} if day is None else {"day": day}
    assert_problem(api.get("/v1/reports/daily", params), 400, "invalid_request", "day")


def test_daily_report_needs_a_key(api: Api) -> None:
    assert_problem(api.client.get("/v1/reports/daily?day=2026-03-04"), 401, "unauthenticated")
