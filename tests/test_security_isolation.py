"""Tenant isolation, driven by the app's own OpenAPI document.

Merchant A owns one of every kind of object; merchant B calls every documented operation with A's
ids, in the path and in every id field of the body, and with A's ids as list cursors. The routes
come from `/openapi.json`, so a route added there is attacked here without editing this file.

What must hold (docs/api.md):
- every request of B that names one of A's objects answers 404 `not_found`, and its response is the
  one B gets for an id that never existed (same status, code, param, title and detail once the id
  is masked): existence is not observable;
- B's lists and reports never contain A's objects, and no id of A appears in any B response other
  than an id B itself sent (echoing the caller's own input reveals nothing);
- nothing of A changes, whatever B sends;
- A itself can reach every one of those operations with its own ids (the control: a route that
  404s for everybody would prove nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from ledger.ids import new_id
from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    assert_problem,
    created,
    execute,
    new_merchant,
    query,
    snapshot,
    start_api,
)

Json = dict[str, Any]

A_URL = "http://127.0.0.1:9/merchant-a"
B_URL = "http://127.0.0.1:9/merchant-b"
_ID_FIELDS = ("account", "source", "destination")  # body fields that name an object
_CURSORS = ("starting_after", "ending_before")
_ID_SHAPE = re.compile(r"\b[a-z]{2,4}_[0-9a-z]{26}\b")


@dataclass
class Tenants:
    a: Api
    b: Api
    a_ids: set[str]  # every id of A that exists anywhere in the database
    a_secrets: set[str]  # A's API key and webhook secret
    a_objects: list[str]  # one id of each kind of A's objects (path parameters)
    b_source: str  # B's funded USD account
    b_destination: str  # B's second USD account
    doc: Json = field(default_factory=dict)


def _ids_of(db_url: str, merchant_id: str) -> set[str]:
    rows = query(
        db_url,
        """
        SELECT id FROM accounts WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM deposits WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM payments WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM refunds WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM payouts WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM webhook_endpoints WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM outbox.events WHERE merchant_id = %(m)s
        UNION ALL SELECT id FROM api_keys WHERE merchant_id = %(m)s
        UNION ALL SELECT e.id FROM ledger_entries e JOIN accounts a ON a.id = e.account_id
            WHERE a.merchant_id = %(m)s
        UNION ALL SELECT %(m)s
        """,
        {"m": merchant_id},
    )
    return {r[0] for r in rows}


@pytest.fixture
def tenants(db_url: str, merchant: NewKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[Tenants]:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    with start_api(db_url, merchant) as a:
        src = a.funded_account(10_000)["id"]
        dst = a.account()["id"]
        deposit = a.deposit(src, 500)["id"]
        pay = a.payment(src, dst, 1_000)["id"]
        refund = created(a.refund(pay, 100))["id"]
        payout = created(a.payout(src, 50))["id"]
        endpoint = created(
            a.post("/v1/webhook_endpoints", {"url": A_URL, "event_types": ["*"]})
        )
        a.payment(src, dst, 1)  # an event after the endpoint exists: a delivery row for it
        event = a.events()[0]["id"]
        assert query(db_url, "SELECT 1 FROM outbox.deliveries WHERE consumer = %s",
                     (endpoint["id"],)), "A's endpoint has no delivery to hide"

        b = a.as_key(new_merchant(db_url, "Merchant B").api_key)
        b_source = b.funded_account(10_000)["id"]
        b_destination = b.account()["id"]
        b.payment(b_source, b_destination, 10)
        created(b.post("/v1/webhook_endpoints", {"url": B_URL, "event_types": ["*"]}))

        today = datetime.now(UTC).date()
        for who, count in ((merchant.merchant_id, 7777), (_merchant_of(db_url, b), 1)):
            execute(
                db_url,
                "INSERT INTO daily_reports (merchant_id, day, currency, payments_count,"
                " payments_amount) VALUES (%s, %s, 'USD', %s, %s)",
                (who, today, count, count * 3),
            )

        doc = a.client.get("/openapi.json").json()
        yield Tenants(
            a=a,
            b=b,
            a_ids=_ids_of(db_url, merchant.merchant_id),
            a_secrets={merchant.api_key, endpoint["secret"]},
            a_objects=[src, dst, deposit, pay, refund, payout, endpoint["id"], event],
            b_source=b_source,
            b_destination=b_destination,
            doc=doc,
        )


def _merchant_of(db_url: str, api: Api) -> str:
    from ledger.merchants import hash_key

    rows = query(db_url, "SELECT merchant_id FROM api_keys WHERE key_hash = %s",
                 (hash_key(api.api_key),))
    merchant_id: str = rows[0][0]
    return merchant_id


# --- the OpenAPI document -----------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: Json

    @property
    def authenticated(self) -> bool:
        return self.spec.get("security") != []

    @property
    def has_id(self) -> bool:
        return "{id}" in self.path

    def query_names(self) -> list[str]:
        return [p["name"] for p in self.spec.get("parameters", []) if p.get("in") == "query"]

    def body_schema(self, doc: Json) -> Json | None:
        body = self.spec.get("requestBody")
        if not body:
            return None
        return _resolve(doc, body["content"]["application/json"]["schema"])

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path}"


def operations(doc: Json) -> list[Operation]:
    ops = [
        Operation(method, path, spec)
        for path, item in doc["paths"].items()
        for method, spec in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    # Deletes last, so the other operations still find A's endpoint in the control pass.
    return sorted(ops, key=lambda op: op.method == "delete")


def _resolve(doc: Json, schema: Json) -> Json:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


_GOOD_VALUES: dict[str, Any] = {
    "amount": 1,
    "currency": "USD",
    "url": B_URL,
    "event_types": ["*"],
    "since": "2000-01-01T00:00:00Z",
    "status": "enabled",
    "description": "probe",
    "metadata": {},
}


def _example(doc: Json, schema: Json) -> Any:
    """A valid value for a schema of this document (enough for the shapes it uses)."""
    schema = _resolve(doc, schema)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return _example(doc, schema["anyOf"][0])
    kind = schema.get("type")
    if kind == "integer":
        return schema.get("minimum", 1)
    if kind == "string":
        return "2000-01-01T00:00:00Z" if schema.get("format") == "date-time" else "probe"
    if kind == "array":
        return [_example(doc, schema.get("items", {"type": "string"}))]
    if kind == "boolean":
        return True
    return {}


def valid_body(doc: Json, schema: Json, own_ids: dict[str, str]) -> Json:
    """Every property of the body with a value B may legitimately send."""
    body: Json = {}
    for name, prop in schema.get("properties", {}).items():
        if name in own_ids:
            body[name] = own_ids[name]
        elif name in _GOOD_VALUES:
            body[name] = _GOOD_VALUES[name]
        else:
            body[name] = _example(doc, prop)
    return body


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    op: Operation
    path: str
    params: dict[str, str]
    body: Json | None
    sent_ids: frozenset[str]

    def send(self, api: Api) -> httpx.Response:
        url = self.path + (f"?{urlencode(self.params)}" if self.params else "")
        headers = api.headers()
        if self.body is None:
            return api.client.request(self.op.method.upper(), url, headers=headers)
        return api.client.request(self.op.method.upper(), url, json=self.body, headers=headers)

    def replace(self, old: str, new: str) -> Probe:
        def swap(value: Any) -> Any:
            return new if value == old else value

        return Probe(
            self.op,
            self.path.replace(old, new),
            {k: swap(v) for k, v in self.params.items()},
            None if self.body is None else {k: swap(v) for k, v in self.body.items()},
            frozenset(swap(i) for i in self.sent_ids),
        )

    def __str__(self) -> str:
        return f"{self.op.method.upper()} {self.path} {self.params or ''} {self.body or ''}"


def _fresh_like(some_id: str) -> str:
    return new_id(some_id.split("_", 1)[0])


def probes_naming(t: Tenants, op: Operation) -> list[tuple[Probe, str]]:
    """B's requests on `op` that name one of A's objects, each with the id it names: in the path
    when the route has one, else in each id field of the body (the other fields valid, B's own)."""
    own = {"account": t.b_source, "source": t.b_source, "destination": t.b_destination}
    schema = op.body_schema(t.doc)
    body = None if schema is None else valid_body(t.doc, schema, own)
    if op.has_id:
        return [
            (Probe(op, op.path.replace("{id}", target), {}, body, frozenset({target})), target)
            for target in t.a_objects
        ]
    return [
        (Probe(op, op.path, {}, {**body, name: target}, frozenset({target})), target)
        for name in _ID_FIELDS
        if body is not None and name in body
        for target in t.a_objects
    ]


def _masked(resp: httpx.Response, named: str) -> tuple[Any, ...]:
    """What a client can tell from a response, with the id it named masked."""
    body = resp.json()
    return (resp.status_code, resp.headers.get("content-type"), body.get("code"),
            body.get("param"), body.get("title"), str(body.get("detail")).replace(named, "<id>"))


def assert_no_leak(t: Tenants, resp: httpx.Response, sent: frozenset[str], what: str) -> None:
    text = resp.text
    leaked = {i for i in t.a_ids if i in text} - sent
    assert not leaked, f"{what}: B's response shows A's ids {sorted(leaked)}: {text[:500]}"
    for secret in t.a_secrets:
        assert secret not in text, f"{what}: B's response shows A's secret"


# --- tests --------------------------------------------------------------------------------------


def test_the_document_lists_the_routes_this_test_attacks(tenants: Tenants) -> None:
    """The enumeration is only as good as the document: every app route must be in it."""
    from starlette.routing import Route

    from api.app import ROUTES

    documented = {(op.path, op.method.upper()) for op in operations(tenants.doc)}
    served = {
        (r.path, m)
        for r in ROUTES
        if isinstance(r, Route)
        for m in (r.methods or ())
        if m != "HEAD"
    }
    assert served <= documented, f"routes missing from /openapi.json: {served - documented}"
    id_routes = [op for op in operations(tenants.doc) if op.has_id]
    assert len(id_routes) >= 9, [str(op) for op in id_routes]


def test_every_operation_on_a_foreign_object_is_404_as_if_missing(
    db_url: str, tenants: Tenants
) -> None:
    t = tenants
    before = snapshot(db_url)
    attacked = 0
    for op in operations(t.doc):
        if not op.authenticated:
            continue
        for probe, target in probes_naming(t, op):
            resp = probe.send(t.b)
            assert_problem(resp, 404, "not_found")
            fresh = _fresh_like(target)
            missing = probe.replace(target, fresh).send(t.b)
            assert _masked(resp, target) == _masked(missing, fresh), (
                f"{probe}: a foreign object answers {resp.text}, a missing one {missing.text}"
            )
            assert_no_leak(t, resp, probe.sent_ids, str(probe))
            attacked += 1
    assert attacked >= 80, attacked
    assert snapshot(db_url) == before, "a request of B changed the database"


def test_the_owner_reaches_every_operation_that_404s_for_the_other(tenants: Tenants) -> None:
    """Control: with A's own key, each id route answers something other than 404 for at least
    one of A's ids, so B's 404s come from ownership, not from a route that never works."""
    t = tenants
    own = {"account": t.a_objects[0], "source": t.a_objects[0], "destination": t.a_objects[1]}
    for op in operations(t.doc):
        if not op.has_id:
            continue
        schema = op.body_schema(t.doc)
        body = None if schema is None else {**valid_body(t.doc, schema, own), "url": A_URL}
        statuses = {}
        for target in t.a_objects:
            probe = Probe(op, op.path.replace("{id}", target), {}, body, frozenset())
            statuses[target] = probe.send(t.a).status_code
        assert any(s != 404 for s in statuses.values()), f"{op}: 404 even for the owner"
        assert all(s < 500 for s in statuses.values()), (str(op), statuses)


def test_lists_and_reports_of_the_other_merchant_never_show_its_objects(
    db_url: str, tenants: Tenants
) -> None:
    t = tenants
    today = datetime.now(UTC).date().isoformat()
    listed = 0
    leaks = []
    for op in operations(t.doc):
        if op.method != "get" or "{" in op.path:
            # Paths with an id are the test above's; /problems/{code} names no one's object.
            continue
        params: dict[str, str] = {"day": today} if "day" in op.query_names() else {}
        variants = [params]
        for cursor in (c for c in _CURSORS if c in op.query_names()):
            variants += [{**params, cursor: target, "limit": "100"} for target in t.a_objects]
        for i, variant in enumerate(variants):
            probe = Probe(op, op.path, variant, None, frozenset(variant.values()))
            resp = probe.send(t.b)
            assert resp.status_code == 200, f"{probe}: {resp.status_code} {resp.text[:300]}"
            try:
                assert_no_leak(t, resp, frozenset(), str(probe))
            except AssertionError as leak:
                leaks.append(str(leak).splitlines()[0][:300])
            listed += 1
            is_json = resp.headers["content-type"].startswith("application/json")
            if i == 0 and is_json and resp.json().get("object") == "list":
                assert resp.json()["data"], f"{op}: B's own list is empty, so proves nothing"
    assert listed >= 20, listed

    report = t.b.get("/v1/reports/daily", {"day": today}).json()
    assert report["currencies"] == {
        "USD": {"payments_count": 1, "payments_amount": 3, "refunds_amount": 0,
                "deposits_amount": 0, "payouts_amount": 0}
    }, report
    assert not leaks, "\n".join(leaks)


def test_events_and_deliveries_of_the_other_merchant_stay_hidden(tenants: Tenants) -> None:
    t = tenants
    b_events = t.b.events()
    assert b_events, "B has events of its own"
    for event in b_events:
        assert event["id"] not in t.a_ids
        assert_no_leak(t, httpx.Response(200, json=event), frozenset(), "B's event")
    for pattern in ("*", "payment.*", "account.created", "payment.succeeded"):
        resp = t.b.get("/v1/events", {"type": pattern, "limit": 100})
        assert resp.status_code == 200
        assert_no_leak(t, resp, frozenset(), f"events type={pattern}")


def test_system_accounts_are_not_addressable_even_by_their_owner(
    db_url: str, tenants: Tenants
) -> None:
    """The funding and settlement accounts are the merchant's books, not customer accounts: using
    one as a payment source would mint money. They answer 404 like another merchant's."""
    t = tenants
    b_merchant = _merchant_of(db_url, t.b)
    system = [r[0] for r in query(
        db_url, "SELECT id FROM accounts WHERE merchant_id = %s AND kind <> 'customer'",
        (b_merchant,),
    )]
    assert system
    before = snapshot(db_url)
    for account in system:
        assert_problem(t.b.get(f"/v1/accounts/{account}"), 404, "not_found")
        assert_problem(t.b.get(f"/v1/accounts/{account}/entries"), 404, "not_found")
        assert_problem(t.b.pay(account, t.b_destination, 1), 404, "not_found")
        assert_problem(t.b.pay(t.b_source, account, 1), 404, "not_found")
        assert_problem(t.b.payout(account, 1), 404, "not_found")
        resp = t.b.post("/v1/deposits", {"account": account, "amount": 1, "currency": "USD"})
        assert_problem(resp, 404, "not_found")
    assert snapshot(db_url) == before
