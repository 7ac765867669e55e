"""HTTP details a client of Stripe expects (docs/api.md, Conventions and Errors):

- a 405 lists in `Allow` every method the path serves, also where several routes share a path,
  on every path of the OpenAPI document;
- every response carries `Request-Id` (the client's own when well-formed, else `req_…`), and the
  log lines of a request name it;
- every 401 carries `WWW-Authenticate: Bearer`, the SQL payment path's included;
- a problem's `type` is `/problems/<code>`, served by the API with what the code means, and the
  SQL renderer of problem bodies writes the same prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

from api.app import create_app
from api.errors import PROBLEM_TYPE
from api.problems import catalogue
from ledger.merchants import NewKey
from tests.apihelpers import Api, assert_problem, start_api
from tests.support import free_port
from tests.test_metrics_docs import api_process

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


# --- 405 and Allow ------------------------------------------------------------------------------


def test_405_allow_lists_every_method_of_every_documented_path(api: Api) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    wrong = []
    for template, operations in paths.items():
        path = re.sub(r"\{[^}]+\}", "x", template)
        served = {method.upper() for method in operations}
        if "GET" in served:
            served.add("HEAD")
        for method in METHODS:
            if method in served:
                continue
            resp = api.client.request(method, path, headers=api.headers())
            allow = {m.strip() for m in resp.headers.get("allow", "").split(",") if m.strip()}
            if resp.status_code != 405 or allow != served:
                wrong.append(f"{method} {template}: {resp.status_code}, Allow {sorted(allow)},"
                             f" expected {sorted(served)}")
            elif method != "HEAD":  # a HEAD answer has no body
                assert_problem(resp, 405, "method_not_allowed")
    assert not wrong, "\n".join(wrong)


# --- Request-Id ---------------------------------------------------------------------------------


def _answers(api: Api) -> list[httpx.Response]:
    """One answer of each kind: 200, 201, 204-less reads, 400, 401 (Python and SQL path), 404,
    405, 413, 431."""
    client = api.client
    account = api.account()
    return [
        client.get("/healthz"),
        client.get("/openapi.json"),
        api.get(f"/v1/accounts/{account['id']}"),
        api.post("/v1/accounts", {"currency": "USD"}),
        api.post("/v1/accounts", {"currency": "usd"}),
        client.get("/v1/accounts"),
        client.post("/v1/payments", json={"source": "acct_a", "destination": "acct_b",
                                          "amount": 1, "currency": "USD"},
                    headers={"Authorization": "Bearer sk_unknown"}),
        api.get("/v1/accounts/acct_missing"),
        client.get("/no/such/route"),
        client.put("/v1/accounts", headers=api.headers()),
        api.post("/v1/accounts", content=b"x" * (65 * 1024)),
        client.get("/healthz", headers={f"x-h{i}": "1" for i in range(150)}),
    ]


def test_every_response_carries_a_request_id(api: Api) -> None:
    answers = _answers(api)
    statuses = {r.status_code for r in answers}
    assert {200, 201, 400, 401, 404, 405, 413, 431} <= statuses
    ids = [r.headers.get("request-id") for r in answers]
    missing = [r.status_code for r, rid in zip(answers, ids, strict=True) if not rid]
    assert not missing, f"answers without Request-Id: {missing}"
    assert all(re.fullmatch(r"req_[0-9a-z]{26}", rid or "") for rid in ids), ids
    assert len(set(ids)) == len(ids), "a request id was used twice"


def test_a_well_formed_client_request_id_is_kept_and_another_is_replaced(api: Api) -> None:
    for given in ("3f1c2a9e-7b7e-4c7e-9d7e-0a1b2c3d4e5f", "trace.42:span/7+x=@y", "a" * 128):
        resp = api.client.get("/healthz", headers={"Request-Id": given})
        assert resp.headers["request-id"] == given
    for given in ("", "two words", "a" * 129, "semi;colon", "quote\"d", "nl\\n"):
        resp = api.client.get("/healthz", headers={"Request-Id": given})
        assert re.fullmatch(r"req_[0-9a-z]{26}", resp.headers["request-id"]), given
    raw = api.client.get("/healthz", headers=[(b"Request-Id", "caf\u00e9".encode())])
    assert raw.headers["request-id"].startswith("req_")


def test_a_500_carries_a_request_id_and_its_log_line_names_it(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug's 500 is rendered by Starlette's outermost error handler; the id still comes back,
    and the logged traceback carries it."""
    from api.requestid import RequestIdFilter

    async def broken(request: Request) -> None:
        raise RuntimeError("a bug")

    app = create_app(db_url)
    app.router.routes.append(Route("/broken", broken))
    caplog.handler.addFilter(RequestIdFilter())
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.get("/broken", headers={"Request-Id": "trace-500"})
    assert_problem(resp, 500, "internal_error")
    assert resp.headers["request-id"] == "trace-500"
    assert "a bug" not in resp.text
    logged = [r for r in caplog.records if r.name == "payments.api"]
    assert logged and all(getattr(r, "request_id", None) == "trace-500" for r in logged)


def test_the_log_lines_of_a_request_name_its_id(tmp_path: Path, merchant: NewKey) -> None:
    """`payments-api` against a database that does not answer: each 503 is logged with the
    request's id, the client's or the generated one."""
    dead_url = f"postgresql://postgres@127.0.0.1:{free_port()}/payments?connect_timeout=1"
    with api_process(dead_url, tmp_path) as running:
        headers = {"Authorization": f"Bearer {merchant.api_key}"}
        given = httpx.get(f"{running.url}/v1/accounts", timeout=30,
                          headers={**headers, "Request-Id": "client-trace-1"})
        generated = httpx.post(f"{running.url}/v1/payments", timeout=30, headers=headers,
                               json={"source": "acct_a", "destination": "acct_b", "amount": 1,
                                     "currency": "USD"})
        log = running.log()
    assert given.status_code == generated.status_code == 503
    assert given.headers["request-id"] == "client-trace-1"
    for rid in ("client-trace-1", generated.headers["request-id"]):
        lines = [line for line in log.splitlines() if f"request_id={rid}" in line]
        assert lines, f"no log line names {rid}:\n{log[-3000:]}"
        assert all("503" in line for line in lines), lines


# --- WWW-Authenticate ---------------------------------------------------------------------------


def test_every_401_challenges_with_bearer(api: Api) -> None:
    client = api.client
    body = {"source": "acct_a", "destination": "acct_b", "amount": 1, "currency": "USD"}
    unknown = {"Authorization": "Bearer sk_unknown_key"}
    answers = {
        "no key": client.get("/v1/accounts"),
        "malformed": client.get("/v1/accounts", headers={"Authorization": "Basic abc"}),
        "unknown, read": client.get("/v1/payments", headers=unknown),
        "unknown, write": client.post("/v1/accounts", json={"currency": "USD"}, headers=unknown),
        "unknown, SQL payment path": client.post("/v1/payments", json=body, headers=unknown),
        "unknown, bad body": client.post("/v1/payments", json={"amount": "x"}, headers=unknown),
        "unknown, too large": client.post("/v1/accounts", content=b"{" * 70_000,
                                          headers=unknown),
    }
    wrong = []
    for what, resp in answers.items():
        assert_problem(resp, 401, "unauthenticated")
        if resp.headers.get("www-authenticate") != "Bearer":
            wrong.append(f"{what}: {resp.headers.get('www-authenticate')!r}")
    assert not wrong, "401 without WWW-Authenticate: Bearer:\n" + "\n".join(wrong)
    assert "www-authenticate" not in api.get("/v1/accounts").headers


# --- problem types ------------------------------------------------------------------------------


def test_problem_types_are_served_by_the_api(api: Api) -> None:
    """Each problem body's `type` is `/problems/<code>`, and GET of it (resolved against the
    API's address) says what the code means."""
    source = api.funded_account(10)
    destination = api.account()
    bodies: list[dict[str, Any]] = [resp.json() for resp in _answers(api)
                                    if resp.status_code >= 400]
    short = api.pay(source["id"], destination["id"], 100)  # the SQL renderer
    bodies.append(assert_problem(short, 402, "insufficient_funds"))
    for body in bodies:
        assert body["type"] == PROBLEM_TYPE + body["code"], body
        resolved = api.client.get(str(httpx.URL(str(api.client.base_url)).join(body["type"])))
        assert resolved.status_code == 200, (body["type"], resolved.text)
        described = resolved.json()
        assert described["object"] == "problem_type"
        assert (described["code"], described["status"], described["title"]) == (
            body["code"], body["status"], body["title"])
        assert described["description"]
    assert_problem(api.client.get("/problems/no_such_code"), 404, "not_found")


def test_every_problem_code_is_described_and_documented(api: Api) -> None:
    documented = (ROOT / "docs" / "api.md").read_text()
    codes = catalogue()
    assert {"invalid_request", "unauthenticated", "insufficient_funds", "internal_error",
            "request_header_fields_too_large", "method_not_allowed"} <= set(codes)
    for code in codes:
        described = api.client.get(f"/problems/{code}").json()
        assert len(described["description"]) > 20, described
        assert f"| `{code}` |" in documented, f"docs/api.md does not list {code}"


def test_the_sql_renderer_writes_the_same_type_prefix(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT api_json_problem(402, 'insufficient_funds', 't', 'd', NULL)"
                       ).fetchone()
    assert row is not None
    assert orjson.loads(row[0])["type"] == PROBLEM_TYPE + "insufficient_funds"


def test_no_placeholder_domain_is_left(api: Api) -> None:
    """Nothing the API serves or documents names a domain that does not exist; only the
    migrations that replaced it remember it."""
    assert "payments.local" not in api.client.get("/openapi.json").text
    for path in [*ROOT.glob("*.md"), *ROOT.glob("docs/*.md"), *ROOT.glob("api/*.py"),
                 *ROOT.glob("ledger/*.py")]:
        assert "docs.payments.local" not in path.read_text(), path
