"""The events API and the events of every money movement (docs/api.md, Events), read back through
GET /v1/events: CloudEvents envelope, newest first, `type` and `subject` filters, pagination,
per-subject sequences 1, 2, 3 ... and the account.balance_changed chain."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    Json,
    assert_conserved,
    assert_envelope,
    assert_problem,
    check_chains,
    created,
    execute,
    new_merchant,
    start_api,
)


@pytest.fixture
def api(db_url: str, merchant: NewKey) -> Iterator[Api]:
    with start_api(db_url, merchant) as client:
        yield client


def new_events(api: Api, seen: set[str]) -> list[Json]:
    """Events not seen before, oldest first; marks them seen."""
    fresh = [e for e in reversed(api.events()) if e["id"] not in seen]
    seen.update(e["id"] for e in fresh)
    return fresh


def by_type(events: list[Json]) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = defaultdict(list)
    for e in events:
        out[e["type"]].append(e)
    return out


# --- the API --------------------------------------------------------------------------------------


def test_retrieve_event(api: Api) -> None:
    acct = api.account("EUR", {"x": "y"})
    listed = api.events()
    assert len(listed) == 1
    resp = api.get(f"/v1/events/{listed[0]['id']}")
    assert resp.status_code == 200
    event = resp.json()
    assert event == listed[0]
    assert_envelope(event)
    assert event["type"] == "account.created"
    assert event["subject"] == acct["id"]
    assert event["sequence"] == "0000000000000000001"
    assert event["data"] == acct


def test_retrieve_unknown_event_is_404(api: Api) -> None:
    assert_problem(api.get("/v1/events/evt_nope"), 404, "not_found")


def test_list_newest_first_with_pagination(api: Api) -> None:
    accts = [api.account()["id"] for _ in range(13)]
    page = api.get("/v1/events").json()
    assert page["object"] == "list"
    assert page["has_more"] is True
    assert [e["subject"] for e in page["data"]] == list(reversed(accts))[:10]
    rest = api.get("/v1/events", {"starting_after": page["data"][-1]["id"]}).json()
    assert [e["subject"] for e in rest["data"]] == list(reversed(accts))[10:]
    assert rest["has_more"] is False
    back = api.get("/v1/events", {"ending_before": rest["data"][0]["id"], "limit": 2}).json()
    assert [e["subject"] for e in back["data"]] == list(reversed(accts))[8:10]
    assert back["has_more"] is True
    assert [e["subject"] for e in api.events()] == list(reversed(accts))


def test_type_filter(api: Api) -> None:
    a = api.funded_account(500)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 100)
    assert api.pay(a["id"], b["id"], 10_000).status_code == 402
    succeeded = api.events("payment.succeeded")
    assert [e["subject"] for e in succeeded] == [pay["id"]]
    assert len(api.events("payment.failed")) == 1
    assert [e["subject"] for e in api.events("account.created")] == [b["id"], a["id"]]
    assert len(api.events("account.balance_changed")) == 3
    assert len(api.events("deposit.succeeded")) == 1
    assert api.events("payout.paid") == []
    paged = api.get("/v1/events", {"type": "account.balance_changed", "limit": 2}).json()
    assert len(paged["data"]) == 2 and paged["has_more"] is True
    assert all(e["type"] == "account.balance_changed" for e in paged["data"])


# --- the events of each movement ------------------------------------------------------------------


def test_events_of_every_movement(db_url: str, api: Api) -> None:
    seen: set[str] = set()
    a = api.account()
    b = api.account()
    created_events = new_events(api, seen)
    assert [(e["type"], e["subject"]) for e in created_events] == [
        ("account.created", a["id"]), ("account.created", b["id"])]
    assert created_events[0]["data"] == a

    dep = api.deposit(a["id"], 1_000)
    evs = by_type(new_events(api, seen))
    assert set(evs) == {"deposit.succeeded", "account.balance_changed"}
    assert [e["subject"] for e in evs["deposit.succeeded"]] == [dep["id"]]
    assert evs["deposit.succeeded"][0]["data"] == dep
    assert int(evs["deposit.succeeded"][0]["sequence"]) == 1
    [bc] = evs["account.balance_changed"]
    assert bc["subject"] == a["id"]
    assert bc["data"] == {"account": a["id"], "currency": "USD", "delta": 1_000,
                          "balance": 1_000, "cause": {"object": "deposit", "id": dep["id"]}}

    pay = api.payment(a["id"], b["id"], 300)
    evs = by_type(new_events(api, seen))
    assert set(evs) == {"payment.succeeded", "account.balance_changed"}
    [ps] = evs["payment.succeeded"]
    assert (ps["subject"], int(ps["sequence"]), ps["data"]) == (pay["id"], 1, pay)
    changes = {e["data"]["account"]: e["data"] for e in evs["account.balance_changed"]}
    assert len(evs["account.balance_changed"]) == 2
    assert changes[a["id"]] == {"account": a["id"], "currency": "USD", "delta": -300,
                                "balance": 700, "cause": {"object": "payment", "id": pay["id"]}}
    assert changes[b["id"]] == {"account": b["id"], "currency": "USD", "delta": 300,
                                "balance": 300, "cause": {"object": "payment", "id": pay["id"]}}

    ref = created(api.refund(pay["id"], 100))
    evs = by_type(new_events(api, seen))
    assert set(evs) == {"refund.succeeded", "payment.refunded", "account.balance_changed"}
    [rs] = evs["refund.succeeded"]
    [pr] = evs["payment.refunded"]
    assert rs["subject"] == pay["id"] and pr["subject"] == pay["id"]
    assert rs["data"] == ref
    assert pr["data"] == {**pay, "amount_refunded": 100}
    assert pr["data"] == api.get(f"/v1/payments/{pay['id']}").json()
    assert {int(rs["sequence"]), int(pr["sequence"])} == {2, 3}
    changes = {e["data"]["account"]: e["data"] for e in evs["account.balance_changed"]}
    assert changes[b["id"]]["delta"] == -100 and changes[b["id"]]["balance"] == 200
    assert changes[a["id"]]["delta"] == 100 and changes[a["id"]]["balance"] == 800
    assert all(c["cause"] == {"object": "refund", "id": ref["id"]} for c in changes.values())

    po = created(api.payout(a["id"], 50))
    evs = by_type(new_events(api, seen))
    assert set(evs) == {"payout.paid", "account.balance_changed"}
    [pp] = evs["payout.paid"]
    assert (pp["subject"], int(pp["sequence"]), pp["data"]) == (po["id"], 1, po)
    [bc] = evs["account.balance_changed"]
    assert bc["data"] == {"account": a["id"], "currency": "USD", "delta": -50, "balance": 750,
                          "cause": {"object": "payout", "id": po["id"]}}

    failed = api.pay(b["id"], a["id"], 10_000).json()["payment"]
    evs = by_type(new_events(api, seen))
    assert set(evs) == {"payment.failed"}
    [pf] = evs["payment.failed"]
    assert (pf["subject"], int(pf["sequence"]), pf["data"]) == (failed["id"], 1, failed)

    # refused requests emit nothing
    assert api.payout(a["id"], 10_000).status_code == 402
    assert api.refund(pay["id"], 1_000).status_code == 409
    assert new_events(api, seen) == []

    check_chains(api, [a["id"], b["id"]])
    assert_conserved(db_url)


def test_events_share_the_time_of_their_movement(api: Api) -> None:
    a = api.funded_account(100)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 10)
    evs = [e for e in api.events() if e["data"].get("cause", {}).get("id") == pay["id"]
           or e["subject"] == pay["id"]]
    assert len(evs) == 3
    assert {e["time"] for e in evs} == {pay["created_at"]}


def test_balance_changed_chains_and_sequences_over_random_traffic(db_url: str, api: Api) -> None:
    rng = random.Random(20261127)
    currencies = ["USD", "EUR"]
    accts: dict[str, list[str]] = {c: [api.account(c)["id"] for _ in range(4)] for c in currencies}
    payments: list[tuple[str, str]] = []
    for c in currencies:
        for acct in accts[c]:
            api.deposit(acct, rng.randint(100, 2_000), c)
    for _ in range(120):
        c = rng.choice(currencies)
        op = rng.random()
        if op < 0.6:
            src, dst = rng.sample(accts[c], 2)
            resp = api.pay(src, dst, rng.randint(1, 900), c)
            assert resp.status_code in (201, 402), resp.text
            if resp.status_code == 201:
                payments.append((resp.json()["id"], c))
        elif op < 0.75 and payments:
            pay_id, _ = rng.choice(payments)
            resp = api.refund(pay_id, rng.randint(1, 300))
            assert resp.status_code in (201, 402, 409), resp.text
        elif op < 0.9:
            resp = api.payout(rng.choice(accts[c]), rng.randint(1, 500), c)
            assert resp.status_code in (201, 402), resp.text
        else:
            api.deposit(rng.choice(accts[c]), rng.randint(1, 500), c)
    everyone = [a for c in currencies for a in accts[c]]
    check_chains(api, everyone)
    # payments' own subjects: succeeded/failed first, then refund.succeeded/payment.refunded pairs
    all_events = api.events()
    for pay_id, _ in payments:
        evs = sorted((e for e in all_events if e["subject"] == pay_id),
                     key=lambda e: e["sequence"])
        assert evs[0]["type"] == "payment.succeeded"
        refunded = 0
        for i in range(1, len(evs), 2):
            assert evs[i]["type"] == "refund.succeeded"
            assert evs[i + 1]["type"] == "payment.refunded"
            refunded += evs[i]["data"]["amount"]
            assert evs[i + 1]["data"]["amount_refunded"] == refunded
        assert api.get(f"/v1/payments/{pay_id}").json()["amount_refunded"] == refunded
    assert_conserved(db_url)


def test_event_ids_are_unique_and_time_is_monotonic_by_list_order(api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    for i in range(5):
        api.payment(a["id"], b["id"], i + 1)
    events: list[dict[str, Any]] = api.events()
    assert len({e["id"] for e in events}) == len(events)
    times = [e["time"] for e in events]
    assert times == sorted(times, reverse=True)  # newest first


# --- the subject filter ---------------------------------------------------------------------------


def test_subject_filter_lists_one_subjects_events(api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 300)
    created(api.refund(pay["id"], 100))
    created(api.refund(pay["id"], 50))

    of_payment = api.list_all("/v1/events", {"subject": pay["id"]})
    assert {e["subject"] for e in of_payment} == {pay["id"]}
    assert sorted(int(e["sequence"]) for e in of_payment) == [1, 2, 3, 4, 5]
    assert of_payment == [e for e in api.events() if e["subject"] == pay["id"]]  # newest first
    of_a = api.list_all("/v1/events", {"subject": a["id"]})
    assert [e["type"] for e in of_a] == ["account.balance_changed"] * 4 + ["account.created"]
    assert api.list_all("/v1/events", {"subject": "pay_nothing_here"}) == []

    paged = api.get("/v1/events", {"subject": pay["id"], "limit": 2}).json()
    assert [int(e["sequence"]) for e in paged["data"]] == [5, 4] and paged["has_more"] is True
    rest = api.get(
        "/v1/events", {"subject": pay["id"], "starting_after": paged["data"][-1]["id"]}
    ).json()
    assert [int(e["sequence"]) for e in rest["data"]] == [3, 2, 1] and rest["has_more"] is False


def test_subject_and_type_filters_combine(api: Api) -> None:
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 300)
    created(api.refund(pay["id"], 100))
    assert [e["type"] for e in api.list_all(
        "/v1/events", {"subject": pay["id"], "type": "refund.succeeded"})] == ["refund.succeeded"]
    assert [e["type"] for e in api.list_all(
        "/v1/events", {"subject": pay["id"], "type": "payment.*"})] == [
        "payment.refunded", "payment.succeeded"]
    assert api.list_all("/v1/events", {"subject": a["id"], "type": "payment.*"}) == []
    assert len(api.list_all("/v1/events", {"subject": a["id"], "type": "*"})) == 4


def test_subject_of_another_merchant_lists_nothing(db_url: str, api: Api) -> None:
    a = api.funded_account(1_000)
    other = api.as_key(new_merchant(db_url).api_key)
    assert other.list_all("/v1/events", {"subject": a["id"]}) == []
    assert len(api.list_all("/v1/events", {"subject": a["id"]})) == 2


@pytest.mark.parametrize("subject", ["", "a\u0000b", "x" * 129])
def test_a_malformed_subject_is_400(api: Api, subject: str) -> None:
    assert_problem(api.get("/v1/events", {"subject": subject}), 400, "invalid_request",
                   param="subject")


def test_the_subject_filter_reads_only_the_subjects_rows(db_url: str) -> None:
    """20,000 events of one merchant over 2,000 subjects: the listing of one subject, under the
    generic plan a prepared statement gets, touches a handful of pages, not the merchant's
    events."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data)"
            " SELECT 'evt_' || lpad(i::text, 8, '0'), 'mer_x', 'account.balance_changed',"
            "        'acct_' || (i % 2000), i / 2000 + 1, now(), '{}'"
            " FROM generate_series(0, 19999) i"
        )
        conn.execute("ANALYZE outbox.events")
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute(
            "PREPARE by_subject(text, text, int) AS SELECT id FROM outbox.events"
            " WHERE merchant_id = $1 AND subject = $2 ORDER BY id DESC LIMIT $3"
        )
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE by_subject('mer_x', 'acct_7', 11)"
        ).fetchone()
    assert plan is not None
    top = plan[0][0]["Plan"]
    pages = top["Shared Hit Blocks"] + top["Shared Read Blocks"]
    assert top["Actual Rows"] == 10
    assert pages < 50, f"{pages} pages for one subject's events: {plan}"


def test_sequence_is_a_cloudevents_sequence_string_in_numeric_order(
    db_url: str, api: Api
) -> None:
    """The CloudEvents sequence extension compares its values as strings: ours are 19 digits, so
    string order is numeric order across 9 -> 10 and up to the largest bigint, and int() gives
    the number back. The webhook body carries the same form (outbox/envelope.py renders both)."""
    a = api.funded_account(100)
    b = api.account()
    for _ in range(10):
        api.payment(a["id"], b["id"], 1)
    events = api.events_of(a["id"])
    assert len(events) == 12  # created, deposit, ten payments
    sequences = [e["sequence"] for e in events]
    assert sequences == sorted(sequences)
    assert [int(s) for s in sequences] == list(range(1, 13))
    assert sequences[8:10] == ["0000000000000000009", "0000000000000000010"]
    # The counter's last value: a subject pushed to the largest bigint still sorts after 10.
    execute(db_url, "UPDATE outbox.subjects SET last_sequence = 9223372036854775806"
                    " WHERE subject = %s", (a["id"],))
    api.payment(a["id"], b["id"], 1)
    last = api.events_of(a["id"])[-1]["sequence"]
    assert last == "9223372036854775807" and last > sequences[-1]
