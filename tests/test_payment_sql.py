"""`POST /v1/payments` renders its responses in SQL (api_create_payment); the rest of the API and
`ledger.service.create_payment` render them in Python. These tests hold the two to the same
bytes: the JSON encoders on awkward strings, and every outcome of a payment through both paths."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import pytest

from api.errors import problem
from ledger import objects, service
from ledger.errors import InsufficientFunds, LedgerError, RiskDeclined
from ledger.ids import new_id
from ledger.merchants import NewKey
from tests.apihelpers import Api, assert_conserved, start_api

AWKWARD = [
    "", "plain", 'quote " and backslash \\', "slash / and <html> & 'single'",
    "controls \x00\x01\x08\t\n\x0b\x0c\r\x1f\x7f", "\u00e9\u00df\u4e2d\u6587 \U0001f4b8",
    "\u2028 line and \u2029 paragraph separators", "\ud7ff\ue000\uffff",
]


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


def _sql(conn: psycopg.Connection, query: str, params: Any) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


@pytest.mark.parametrize("text", AWKWARD)
def test_payment_json_is_rendered_as_orjson_renders_it(conn: psycopg.Connection, text: str) -> None:
    if "\x00" in text:
        text = text.replace("\x00", "")  # PostgreSQL text cannot hold NUL (the API refuses it)
    moment = datetime(2026, 12, 1, 20, 1, 2, 345678, tzinfo=UTC)
    metadata = {text: text, "n": "1"}
    for status, failure, description in [("succeeded", None, None),
                                          ("failed", "insufficient_funds", text)]:
        expected = orjson.dumps(objects.payment(
            "pay_x", "acct_" + text, "acct_b", 12345, 0, "USD", status, failure, description,
            metadata, moment))
        rendered = _sql(
            conn, "SELECT api_json_payment(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            ("pay_x", "acct_" + text, "acct_b", 12345, "USD", status, failure, description,
             orjson.dumps(metadata).decode(), moment))
        assert rendered.encode() == expected


@pytest.mark.parametrize("text", AWKWARD[1:])
def test_problem_json_is_rendered_as_the_api_renders_it(conn: psycopg.Connection,
                                                        text: str) -> None:
    text = text.replace("\x00", "")
    for error in [InsufficientFunds(text, param="amount"), RiskDeclined(text),
                  LedgerError(text, param=text)]:
        rendered = _sql(conn, "SELECT api_json_problem(%s, %s, %s, %s, %s)",
                        (error.status, error.code, error.title, error.detail, error.param))
        assert rendered.encode() == orjson.dumps(problem(error))


def _python_outcome(db_url: str, merchant: service.Merchant, body: dict[str, Any]
                    ) -> tuple[int, dict[str, Any]]:
    """What ledger.service.create_payment (the Python rendering) answers, rolled back."""

    async def run() -> tuple[int, dict[str, Any]]:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            try:
                result = await service.create_payment(
                    conn, merchant, body["source"], body["destination"], body["amount"],
                    body["currency"], body.get("description"), body.get("metadata"))
            except LedgerError as exc:
                return exc.status, problem(exc)
            finally:
                await conn.rollback()
            if result.error is not None:
                return result.error.status, {**problem(result.error), "payment": result.payment}
            return 201, result.payment

    return asyncio.run(run())


def _comparable(payload: dict[str, Any]) -> dict[str, Any]:
    """Without what differs between two runs of the same request: the payment's id and time."""
    out = dict(payload)
    inner = out.get("payment") if "payment" in out else out
    if isinstance(inner, dict) and inner.get("object") == "payment":
        inner = {k: v for k, v in inner.items() if k not in ("id", "created_at")}
        out = inner if "payment" not in out else {**out, "payment": inner}
    return out


def test_every_outcome_answers_as_the_python_service_does(
    db_url: str, api: Api, merchant: NewKey
) -> None:
    a = api.funded_account(1000)["id"]
    b = api.funded_account(0)["id"]
    eur = api.funded_account(0, "EUR")["id"]
    with psycopg.connect(db_url) as c:
        c.execute("UPDATE merchants SET risk_max_amount = 5000, risk_max_payments_per_minute = 3"
                  " WHERE id = %s", (merchant.merchant_id,))
        system = _sql(c, "SELECT id FROM accounts WHERE merchant_id = %s"
                      " AND kind = 'funding' LIMIT 1", (merchant.merchant_id,))
    limits = service.Merchant(merchant.merchant_id, 5000, 3)
    cases = [
        {"source": a, "destination": b, "amount": 10, "currency": "USD",
         "description": 'd "1"', "metadata": {"k": "v\n"}},                        # 201
        {"source": a, "destination": b, "amount": 100_000, "currency": "USD"},    # risk amount
        {"source": a, "destination": b, "amount": 2000, "currency": "USD"},       # insufficient
        {"source": a, "destination": a, "amount": 1, "currency": "USD"},          # same account
        {"source": "acct_nope", "destination": b, "amount": 1, "currency": "USD"},
        {"source": a, "destination": "acct_nope", "amount": 1, "currency": "USD"},
        {"source": system, "destination": b, "amount": 1, "currency": "USD"},     # not a customer
        {"source": a, "destination": eur, "amount": 1, "currency": "USD"},        # mismatch
        {"source": eur, "destination": a, "amount": 1, "currency": "USD"},
        {"source": a, "destination": b, "amount": 1, "currency": "USD"},          # velocity
    ]
    for body in cases:
        expected_status, expected = _python_outcome(db_url, limits, body)
        resp = api.post("/v1/payments", body, idem=new_id("k"))
        assert resp.status_code == expected_status, (body, resp.text)
        assert _comparable(resp.json()) == _comparable(expected), body
        replay = api.post("/v1/payments", body, idem=resp.request.headers["Idempotency-Key"])
        assert replay.headers.get("Idempotent-Replayed") == "true"
        assert replay.content == resp.content
    with psycopg.connect(db_url) as c:
        statuses = [s for (s,) in c.execute("SELECT status FROM payments ORDER BY id")]
    # 201, risk, insufficient and velocity are recorded; the refusals are not
    assert statuses == ["succeeded", "failed", "failed", "failed"]
    assert_conserved(db_url)


def test_a_payment_writes_what_the_python_service_writes(db_url: str, api: Api) -> None:
    """Entries, balances and the events' data of one payment made through each path."""
    a = api.funded_account(500)["id"]
    b = api.funded_account(0)["id"]
    via_api = api.payment(a, b, 70, description="x", metadata={"m": "1"})
    with psycopg.connect(db_url) as c:
        merchant = _sql(c, "SELECT merchant_id FROM accounts WHERE id = %s", (a,))

    async def via_service() -> dict[str, Any]:
        async with await psycopg.AsyncConnection.connect(db_url) as conn:
            result = await service.create_payment(
                conn, service.Merchant(merchant), a, b, 70, "USD", "x", {"m": "1"})
            await conn.commit()
            return result.payment

    direct = asyncio.run(via_service())
    with psycopg.connect(db_url) as c:
        for payment in (via_api, direct):
            entries = c.execute(
                "SELECT account_id, amount, balance_after FROM ledger_entries WHERE ref = %s"
                " ORDER BY id", (payment["id"],)).fetchall()
            events = c.execute(
                "SELECT type, subject, data FROM outbox.events e WHERE e.subject = %s"
                " OR e.data->'cause'->>'id' = %s ORDER BY id",
                (payment["id"], payment["id"])).fetchall()
            assert [(t, s) for t, s, _ in events] == [
                ("payment.succeeded", payment["id"]), ("account.balance_changed", a),
                ("account.balance_changed", b)]
            assert events[0][2] == payment
            assert [d["delta"] for _, _, d in events[1:]] == [-70, 70]
            assert [acct for acct, _, _ in entries] == [a, b]
        first, second = (
            c.execute("SELECT amount, balance_after FROM ledger_entries WHERE ref = %s"
                      " ORDER BY id", (p["id"],)).fetchall() for p in (via_api, direct))
        assert first == [(-70, 430), (70, 70)] and second == [(-70, 360), (70, 140)]
    assert_conserved(db_url)


def test_ids_made_in_sql_sort_after_earlier_ones(conn: psycopg.Connection) -> None:
    earlier = [new_id("evt") for _ in range(3)]
    restamped = _sql(conn, "SELECT restamp_ids(%s)", (earlier,))
    assert len(restamped[0]) == len(earlier[0]) and all(r.startswith("evt_") for r in restamped)
    assert restamped == sorted(restamped)  # in array order
    assert min(restamped) > max(earlier)
    later = new_id("evt")
    assert later > max(restamped)
    assert [r[-13:] for r in restamped] == [e[-13:] for e in earlier]
