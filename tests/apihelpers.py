"""Helpers for the HTTP API acceptance tests (docs/api.md).

`Api` wraps a `TestClient` (or any httpx-like client) with one merchant's key; the database
helpers open their own short autocommit connections, so they see every commit of the app and
never hold a transaction open under its feet.

    with start_api(db_url, merchant) as api:
        acct = api.funded_account(1000)
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import httpx
import psycopg
import uvicorn
from starlette.testclient import TestClient

from api.app import create_app
from ledger.merchants import NewKey, create_merchant

Json = dict[str, Any]

CURRENCIES = ("USD", "EUR", "GBP", "CNY", "JPY")
MAX_AMOUNT = 10**15
PROBLEM_FIELDS = ("type", "title", "status", "detail", "code")
_MISSING: Any = object()
_RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|\+00:00)$")


# --- the HTTP side ------------------------------------------------------------------------------


class Api:
    """One merchant's view of the API. Every call returns the raw response, except the helpers
    that create objects (they assert success and return the JSON)."""

    def __init__(self, client: Any, api_key: str) -> None:
        self.client = client
        self.api_key = api_key

    def as_key(self, api_key: str) -> Api:
        """The same client, another merchant's key."""
        return Api(self.client, api_key)

    def headers(
        self, idem: str | None = None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if idem is not None:
            headers["Idempotency-Key"] = idem
        if extra:
            headers.update(extra)
        return headers

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> httpx.Response:
        return self.client.get(path, params=params, headers=self.headers())

    def post(
        self,
        path: str,
        body: Any = _MISSING,
        *,
        idem: str | None = None,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        if content is not None:
            return self.client.post(path, content=content, headers=self.headers(idem, headers))
        if body is _MISSING:
            body = {}
        return self.client.post(path, json=body, headers=self.headers(idem, headers))

    def patch(self, path: str, body: Any) -> httpx.Response:
        return self.client.patch(path, json=body, headers=self.headers())

    def delete(self, path: str) -> httpx.Response:
        return self.client.delete(path, headers=self.headers())

    # --- object helpers -------------------------------------------------------------------------

    def account(self, currency: str = "USD", metadata: Json | None = None) -> Json:
        body: Json = {"currency": currency}
        if metadata is not None:
            body["metadata"] = metadata
        return created(self.post("/v1/accounts", body))

    def deposit(self, account_id: str, amount: int, currency: str = "USD") -> Json:
        return created(
            self.post(
                "/v1/deposits", {"account": account_id, "amount": amount, "currency": currency}
            )
        )

    def funded_account(self, amount: int, currency: str = "USD") -> Json:
        acct = self.account(currency)
        if amount:
            self.deposit(acct["id"], amount, currency)
        return self.get(f"/v1/accounts/{acct['id']}").json()

    def pay(
        self, source: str, destination: str, amount: int, currency: str = "USD", **extra: Any
    ) -> httpx.Response:
        body = {"source": source, "destination": destination, "amount": amount,
                "currency": currency, **extra}
        return self.post("/v1/payments", body)

    def payment(self, source: str, destination: str, amount: int, currency: str = "USD",
                **extra: Any) -> Json:
        return created(self.pay(source, destination, amount, currency, **extra))

    def refund(self, payment_id: str, amount: int | None = None) -> httpx.Response:
        body: Json = {} if amount is None else {"amount": amount}
        return self.post(f"/v1/payments/{payment_id}/refunds", body)

    def payout(self, account_id: str, amount: int, currency: str = "USD") -> httpx.Response:
        return self.post(
            "/v1/payouts", {"account": account_id, "amount": amount, "currency": currency}
        )

    def balance(self, account_id: str) -> int:
        resp = self.get(f"/v1/accounts/{account_id}")
        assert resp.status_code == 200, resp.text
        balance: int = resp.json()["balance"]
        return balance

    def list_all(self, path: str, params: Mapping[str, Any] | None = None) -> list[Json]:
        """Every item of a list, following `starting_after` with pages of 100."""
        out: list[Json] = []
        query: dict[str, Any] = {**(params or {}), "limit": 100}
        while True:
            resp = self.get(path, query)
            assert resp.status_code == 200, resp.text
            page = resp.json()
            assert page["object"] == "list"
            out.extend(page["data"])
            if not page["has_more"]:
                return out
            assert page["data"], "has_more with an empty page"
            query["starting_after"] = page["data"][-1]["id"]

    def events(self, type: str | None = None) -> list[Json]:
        return self.list_all("/v1/events", {"type": type} if type else None)

    def events_of(self, subject: str) -> list[Json]:
        """The subject's events in sequence order."""
        return sorted(
            (e for e in self.events() if e["subject"] == subject), key=lambda e: e["sequence"]
        )


@contextmanager
def start_api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    """The app in a TestClient (lifespan run), with `merchant`'s key."""
    with TestClient(create_app(db_url), raise_server_exceptions=False) as client:
        yield Api(client, merchant.api_key)


def created(resp: httpx.Response) -> Json:
    assert resp.status_code == 201, f"{resp.status_code} {resp.text}"
    body: Json = resp.json()
    return body


def assert_problem(
    resp: httpx.Response, status: int, code: str, param: Any = _MISSING
) -> Json:
    """An RFC 9457 problem with the contract's members; `param` checked when given."""
    assert resp.status_code == status, (
        f"expected {status} {code}, got {resp.status_code} {resp.text}"
    )
    media = resp.headers.get("content-type", "").split(";")[0].strip()
    assert media == "application/problem+json", media
    body: Json = resp.json()
    for field in PROBLEM_FIELDS:
        assert field in body, f"problem without {field}: {body}"
    assert body["status"] == status
    assert body["code"] == code, body
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str)
    if param is not _MISSING:
        assert body.get("param") == param, body
    assert "Traceback" not in resp.text
    return body


def is_sequence(value: Any) -> bool:
    """The CloudEvents sequence form of docs/api.md: 19 decimal digits, so that string order is
    numeric order."""
    return isinstance(value, str) and re.fullmatch(r"[0-9]{19}", value) is not None


def is_rfc3339_utc(value: Any) -> bool:
    if not isinstance(value, str) or not _RFC3339_UTC.match(value):
        return False
    datetime.fromisoformat(value.replace("Z", "+00:00"))
    return True


# --- events -------------------------------------------------------------------------------------

ENVELOPE = {"specversion", "id", "source", "type", "subject", "sequence", "time",
            "datacontenttype", "data"}


def assert_envelope(event: Json) -> None:
    """A CloudEvents 1.0 structured-mode event as docs/api.md (Events) shows it."""
    assert ENVELOPE <= set(event), event
    assert event["specversion"] == "1.0"
    assert isinstance(event["id"], str) and event["id"].startswith("evt_")
    assert event["source"] == "payments"
    assert isinstance(event["type"], str)
    assert isinstance(event["subject"], str)
    assert is_sequence(event["sequence"]), event["sequence"]
    assert int(event["sequence"]) >= 1
    assert is_rfc3339_utc(event["time"]) and event["time"].endswith("Z")
    assert event["datacontenttype"] == "application/json"
    assert isinstance(event["data"], dict)


def check_chains(api: Api, accounts: list[str]) -> None:
    """For each account: its events' sequences run 1..n without gaps, the first is
    account.created, and the balance_changed events chain up to the account's balance."""
    events = api.events()
    for e in events:
        assert_envelope(e)
    per_subject: dict[str, list[Json]] = defaultdict(list)
    for e in events:
        per_subject[e["subject"]].append(e)
    for subject, evs in per_subject.items():
        seqs = sorted(int(e["sequence"]) for e in evs)
        assert seqs == list(range(1, len(evs) + 1)), (subject, seqs)
    for acct in accounts:
        evs = sorted(per_subject[acct], key=lambda e: e["sequence"])
        assert evs[0]["type"] == "account.created"
        assert evs[0]["data"]["balance"] == 0
        balance = 0
        for e in evs[1:]:
            assert e["type"] == "account.balance_changed", e
            d = e["data"]
            assert d["account"] == acct
            assert isinstance(d["delta"], int) and d["delta"] != 0
            assert d["balance"] == balance + d["delta"], (acct, e)
            assert d["balance"] >= 0
            balance = d["balance"]
        assert balance == api.balance(acct)



# --- the database side --------------------------------------------------------------------------


def query(db_url: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url, autocommit=True) as c:
        cur = c.execute(sql, params)
        return cur.fetchall() if cur.description else []


def execute(db_url: str, sql: str, params: Any = None) -> int:
    with psycopg.connect(db_url, autocommit=True) as c:
        return c.execute(sql, params).rowcount


def scalar(db_url: str, sql: str, params: Any = None) -> Any:
    rows = query(db_url, sql, params)
    assert len(rows) == 1, rows
    return rows[0][0]


def new_merchant(db_url: str, name: str = "Other merchant") -> NewKey:
    with psycopg.connect(db_url) as c:
        return create_merchant(c, name)


def assert_conserved(db_url: str) -> None:
    """Double-entry invariants read straight from the tables: per currency the balances of all
    accounts (system ones included) sum to zero; customer balances are never negative; every
    balance equals the sum of its entries and the last entry's balance_after; the entries of each
    movement sum to zero."""
    sums = query(db_url, "SELECT currency, sum(balance) FROM accounts GROUP BY currency")
    assert all(total == 0 for _, total in sums), f"money created or lost: {sums}"
    negative = query(db_url, "SELECT id, balance FROM accounts WHERE kind = 'customer' "
                             "AND balance < 0")
    assert negative == [], negative
    drift = query(
        db_url,
        "SELECT a.id, a.balance, coalesce(sum(e.amount), 0) FROM accounts a "
        "LEFT JOIN ledger_entries e ON e.account_id = a.id "
        "GROUP BY a.id, a.balance HAVING a.balance <> coalesce(sum(e.amount), 0)",
    )
    assert drift == [], f"balance differs from its entries: {drift}"
    last = query(
        db_url,
        "SELECT DISTINCT ON (e.account_id) e.account_id, e.balance_after, a.balance "
        "FROM ledger_entries e JOIN accounts a ON a.id = e.account_id "
        "ORDER BY e.account_id, e.id DESC",
    )
    assert [r for r in last if r[1] != r[2]] == [], "last balance_after differs from balance"
    unbalanced = query(
        db_url, "SELECT ref, sum(amount) FROM ledger_entries GROUP BY ref HAVING sum(amount) <> 0"
    )
    assert unbalanced == [], f"movements whose entries do not sum to zero: {unbalanced}"


_SNAPSHOT_TABLES = (
    "merchants", "api_keys", "accounts", "ledger_entries", "deposits", "payments", "refunds",
    "payouts", "idempotency_keys", "webhook_endpoints", "daily_reports", "outbox.events",
    "outbox.deliveries", "outbox.consumers", "outbox.subjects",
)


def snapshot(db_url: str) -> dict[str, Any]:
    """Everything a request could write: row counts, balances, refunded amounts, sequences,
    webhook endpoint state and delivery state."""
    with psycopg.connect(db_url, autocommit=True) as c:
        snap: dict[str, Any] = {
            t: c.execute(f"SELECT count(*) FROM {t}").fetchone() for t in _SNAPSHOT_TABLES
        }
        snap["balances"] = c.execute("SELECT id, balance FROM accounts ORDER BY id").fetchall()
        snap["refunded"] = c.execute(
            "SELECT id, amount_refunded, status FROM payments ORDER BY id"
        ).fetchall()
        snap["sequences"] = c.execute(
            "SELECT subject, last_sequence FROM outbox.subjects ORDER BY subject"
        ).fetchall()
        snap["endpoints"] = c.execute(
            "SELECT id, url, event_types, status, description FROM webhook_endpoints ORDER BY id"
        ).fetchall()
        snap["deliveries"] = c.execute(
            "SELECT consumer, event_id, status, attempts FROM outbox.deliveries "
            "ORDER BY consumer, event_id"
        ).fetchall()
        return snap


# --- a real server --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def live_server(db_url: str) -> Iterator[str]:
    """The app under uvicorn on 127.0.0.1 and a free port, in a thread. Yields the base URL."""
    config = uvicorn.Config(
        create_app(db_url), host="127.0.0.1", port=free_port(), log_level="warning",
        lifespan="on", access_log=False,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn exited before it started"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(30)


def wait_for(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll `predicate` until it is true (a synchronisation point, not an assertion on timing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
