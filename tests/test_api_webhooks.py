"""Webhook endpoints: CRUD, the secret shown once, the URL guard at registration, event_types
validation, and the deliveries list and recover (rows created by real payments' fan-out)."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg import AsyncConnection
from standardwebhooks import Webhook

from ledger import service
from ledger.merchants import NewKey
from tests.apihelpers import (
    Api,
    Json,
    assert_conserved,
    assert_problem,
    created,
    execute,
    is_rfc3339_utc,
    live_server,
    new_merchant,
    query,
    snapshot,
    start_api,
    wait_for,
)

PUBLIC_URL = "https://1.1.1.1/hooks"
ENDPOINT_FIELDS = {"id", "object", "url", "event_types", "status", "created_at"}
DELIVERY_FIELDS = {"event", "status", "attempts", "last_status_code", "last_error",
                   "next_attempt_at", "delivered_at"}


@pytest.fixture
def api(db_url: str, merchant: NewKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    monkeypatch.delenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", raising=False)
    with start_api(db_url, merchant) as client:
        yield client


def endpoint(api: Api, event_types: list[str], url: str = PUBLIC_URL) -> Json:
    return created(api.post("/v1/webhook_endpoints", {"url": url, "event_types": event_types}))


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def deliveries(api: Api, we: str, **params: Any) -> list[Json]:
    resp = api.get(f"/v1/webhook_endpoints/{we}/deliveries", {"limit": 100, **params})
    assert resp.status_code == 200, resp.text
    page = resp.json()
    assert page["object"] == "list"
    assert page["has_more"] is False
    data: list[Json] = page["data"]
    return data


def events_of_payment(api: Api, pay_id: str) -> list[Json]:
    return [e for e in api.events()
            if e["subject"] == pay_id or e["data"].get("cause", {}).get("id") == pay_id]


# --- CRUD -----------------------------------------------------------------------------------------


def test_create_endpoint(db_url: str, api: Api) -> None:
    resp = api.post("/v1/webhook_endpoints",
                    {"url": PUBLIC_URL, "event_types": ["payment.*", "refund.succeeded"],
                     "description": "ops"})
    we = created(resp)
    assert ENDPOINT_FIELDS | {"secret"} <= set(we)
    assert we["id"].startswith("we_")
    assert we["object"] == "webhook_endpoint"
    assert we["url"] == PUBLIC_URL
    assert we["event_types"] == ["payment.*", "refund.succeeded"]
    assert we["status"] == "enabled"
    assert we["description"] == "ops"
    assert is_rfc3339_utc(we["created_at"])
    secret = we["secret"]
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 16
    # the secret works with the Standard Webhooks reference implementation
    hook = Webhook(secret)
    now = datetime.now(UTC)
    signature = hook.sign("evt_1", now, '{"a":1}')
    hook.verify('{"a":1}', {"webhook-id": "evt_1",
                            "webhook-timestamp": str(int(now.timestamp())),
                            "webhook-signature": signature})


def test_secrets_are_unique(api: Api) -> None:
    secrets = {endpoint(api, ["*"])["secret"] for _ in range(5)}
    assert len(secrets) == 5


def test_secret_appears_only_on_create(api: Api) -> None:
    we = endpoint(api, ["*"])
    got = api.get(f"/v1/webhook_endpoints/{we['id']}")
    assert got.status_code == 200
    body = got.json()
    assert "secret" not in body
    assert we["secret"] not in got.text
    assert body == {k: v for k, v in we.items() if k != "secret"}
    listed = api.get("/v1/webhook_endpoints")
    assert we["secret"] not in listed.text
    patched = api.patch(f"/v1/webhook_endpoints/{we['id']}", {"status": "disabled"})
    assert patched.status_code == 200
    assert "secret" not in patched.json()
    assert we["secret"] not in patched.text


def test_list_endpoints_newest_first(api: Api) -> None:
    ids = [endpoint(api, ["*"])["id"] for _ in range(12)]
    page = api.get("/v1/webhook_endpoints").json()
    assert page["object"] == "list"
    assert [w["id"] for w in page["data"]] == list(reversed(ids))[:10]
    assert page["has_more"] is True
    rest = api.get("/v1/webhook_endpoints", {"starting_after": ids[2]}).json()
    assert [w["id"] for w in rest["data"]] == [ids[1], ids[0]]
    assert rest["has_more"] is False
    assert all(w["object"] == "webhook_endpoint" for w in page["data"])


def test_patch_endpoint(api: Api) -> None:
    we = endpoint(api, ["*"])
    path = f"/v1/webhook_endpoints/{we['id']}"
    resp = api.patch(path, {"url": "https://8.8.8.8/new", "event_types": ["payout.paid"]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["url"] == "https://8.8.8.8/new"
    assert body["event_types"] == ["payout.paid"]
    assert body["status"] == "enabled"
    assert body["id"] == we["id"]
    assert api.get(path).json() == body
    disabled = api.patch(path, {"status": "disabled"}).json()
    assert disabled["status"] == "disabled"
    assert disabled["url"] == "https://8.8.8.8/new"
    assert api.patch(path, {"status": "enabled"}).json()["status"] == "enabled"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"status": "paused"}, "status"), ({"status": None}, "status"), ({"status": 1}, "status"),
     ({"url": "http://1.1.1.1/x"}, "url"), ({"url": "https://127.0.0.1/x"}, "url"),
     ({"url": 5}, "url"), ({"event_types": []}, "event_types"),
     ({"event_types": "payment.*"}, "event_types"), ({"event_types": [1]}, "event_types")],
)
def test_patch_validation(db_url: str, api: Api, body: Json, param: str) -> None:
    we = endpoint(api, ["*"])
    before = snapshot(db_url)
    assert_problem(api.patch(f"/v1/webhook_endpoints/{we['id']}", body), 400,
                   "invalid_request", param)
    assert snapshot(db_url) == before


def test_delete_endpoint(db_url: str, api: Api) -> None:
    we = endpoint(api, ["*"])
    path = f"/v1/webhook_endpoints/{we['id']}"
    resp = api.delete(path)
    assert resp.status_code == 204
    assert resp.content == b""
    assert_problem(api.get(path), 404, "not_found")
    assert_problem(api.delete(path), 404, "not_found")
    assert_problem(api.patch(path, {"status": "enabled"}), 404, "not_found")
    assert we["id"] not in {w["id"] for w in api.list_all("/v1/webhook_endpoints")}
    # no more fan-out to it
    a = api.funded_account(10)
    api.payment(a["id"], api.account()["id"], 5)
    assert query(db_url, "SELECT count(*) FROM outbox.deliveries WHERE consumer = %s",
                 (we["id"],)) == [(0,)]


# --- the cap on endpoints per merchant ------------------------------------------------------------


def test_a_merchant_has_at_most_16_endpoints_by_default(db_url: str, api: Api) -> None:
    for _ in range(16):
        endpoint(api, ["*"])
    body = assert_problem(
        api.post("/v1/webhook_endpoints", {"url": PUBLIC_URL, "event_types": ["*"]}),
        409, "webhook_endpoint_limit_reached",
    )
    assert "16" in body["detail"]
    assert query(db_url, "SELECT count(*) FROM webhook_endpoints") == [(16,)]
    assert query(db_url, "SELECT count(*) FROM outbox.consumers WHERE kind = 'webhook'") == [(16,)]
    # Disabled endpoints count too; a deleted one frees its place.
    first = api.list_all("/v1/webhook_endpoints")[-1]["id"]
    assert api.patch(f"/v1/webhook_endpoints/{first}", {"status": "disabled"}).status_code == 200
    assert_problem(api.post("/v1/webhook_endpoints", {"url": PUBLIC_URL, "event_types": ["*"]}),
                   409, "webhook_endpoint_limit_reached")
    assert api.delete(f"/v1/webhook_endpoints/{first}").status_code == 204
    endpoint(api, ["*"])
    # Another merchant has its own.
    other = api.as_key(new_merchant(db_url).api_key)
    endpoint(other, ["*"])


def test_the_cap_comes_from_the_environment_and_refusals_are_replayed(
    db_url: str, api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ENDPOINTS_PER_MERCHANT", "2")
    endpoint(api, ["*"])
    endpoint(api, ["*"])
    body = {"url": PUBLIC_URL, "event_types": ["*"]}
    first = api.post("/v1/webhook_endpoints", body, idem="cap-1")
    assert_problem(first, 409, "webhook_endpoint_limit_reached")
    again = api.post("/v1/webhook_endpoints", body, idem="cap-1")
    assert again.status_code == 409 and again.headers.get("Idempotent-Replayed") == "true"
    assert query(db_url, "SELECT count(*) FROM webhook_endpoints") == [(2,)]


def test_concurrent_creations_do_not_overshoot_the_cap(
    db_url: str, merchant: NewKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight creations at once with room for one. A share lock on the table holds every INSERT
    back until all eight are waiting, so each would have counted the endpoints before any
    inserted, were the count not serialised."""
    import concurrent.futures

    import httpx
    import psycopg

    monkeypatch.delenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", raising=False)
    monkeypatch.setenv("OUTBOX_WEBHOOK_ENDPOINTS_PER_MERCHANT", "3")
    requests = 8
    with live_server(db_url) as base, psycopg.connect(db_url) as blocker:
        auth = {"Authorization": f"Bearer {merchant.api_key}"}

        def create(_: int) -> int:
            resp = httpx.post(f"{base}/v1/webhook_endpoints", headers=auth, timeout=60,
                              json={"url": PUBLIC_URL, "event_types": ["*"]})
            return resp.status_code

        assert create(0) == 201 and create(0) == 201
        blocker.execute("LOCK TABLE webhook_endpoints IN SHARE MODE")
        with concurrent.futures.ThreadPoolExecutor(requests) as pool:
            running = [pool.submit(create, n) for n in range(requests)]
            with psycopg.connect(db_url, autocommit=True) as watcher:

                def waiting() -> int:
                    row = watcher.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()").fetchone()
                    return int(row[0]) if row else 0

                wait_for(lambda: waiting() >= requests, what="every creation to be waiting")
            blocker.rollback()
            statuses = sorted(f.result() for f in running)
    assert statuses == [201] + [409] * (requests - 1)
    assert query(db_url, "SELECT count(*) FROM webhook_endpoints") == [(3,)]


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "１６"])
def test_payments_api_refuses_a_bad_cap(value: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    result = subprocess.run(
        [str(Path(sys.executable).parent / "payments-api")],
        env={**os.environ, "OUTBOX_WEBHOOK_ENDPOINTS_PER_MERCHANT": value},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "OUTBOX_WEBHOOK_ENDPOINTS_PER_MERCHANT" in lines[0], result.stderr


async def test_deleting_an_endpoint_while_a_payment_fans_out_to_it_leaves_nothing_behind(
    db_url: str, api: Api, merchant: NewKey
) -> None:
    """A payment's transaction has fanned out to the endpoint and not committed yet when the
    endpoint is deleted: the delete waits for it and takes its deliveries too, instead of
    leaving pending deliveries of a consumer that no longer exists (two real connections)."""
    we = endpoint(api, ["*"])
    source = api.funded_account(100)["id"]
    destination = api.account()["id"]
    [(before,)] = query(db_url, "SELECT count(*) FROM outbox.deliveries WHERE consumer = %s",
                        (we["id"],))
    async with await AsyncConnection.connect(db_url) as publisher:
        async with publisher.transaction():
            paid = await service.create_payment(
                publisher, service.Merchant(merchant.merchant_id), source, destination, 10, "USD")
            assert paid.error is None
            cur = await publisher.execute(
                "SELECT count(*) FROM outbox.deliveries WHERE consumer = %s", (we["id"],))
            # Three more, uncommitted: the delete cannot see them.
            assert await cur.fetchone() == (before + 3,)
            deleting = asyncio.create_task(
                asyncio.to_thread(api.delete, f"/v1/webhook_endpoints/{we['id']}"))
            for _ in range(400):
                waiting = query(
                    db_url,
                    "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> %s",
                    (publisher.info.backend_pid,),
                )
                if waiting or deleting.done():
                    break
                await asyncio.sleep(0.025)
        resp = await asyncio.wait_for(deleting, 30)
    assert resp.status_code == 204, resp.text
    assert query(db_url, "SELECT count(*) FROM outbox.deliveries WHERE consumer = %s",
                 (we["id"],)) == [(0,)]
    assert query(db_url, "SELECT count(*) FROM outbox.consumers WHERE name = %s",
                 (we["id"],)) == [(0,)]
    assert_conserved(db_url)


# --- validation at registration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://1.1.1.1/hooks",  # not https
        "https://127.0.0.1/hooks",
        "https://127.1/hooks",  # inet_aton shorthand for 127.0.0.1
        "https://2130706433/hooks",  # 127.0.0.1 as one number
        "https://0x7f000001/hooks",
        "https://localhost/hooks",
        "https://localhost:8443/hooks",
        "https://0.0.0.0/hooks",
        "https://10.1.2.3/hooks",
        "https://172.16.0.1/hooks",
        "https://192.168.1.1/hooks",
        "https://169.254.169.254/latest/meta-data",
        "https://[::1]/hooks",
        "https://[::ffff:127.0.0.1]/hooks",
        "https://[fe80::1]/hooks",
        "https://[fd00:ec2::254]/hooks",
        "ftp://1.1.1.1/hooks",
        "file:///etc/passwd",
        "https://",
        "https:///hooks",
        "not a url",
        "",
        "//1.1.1.1/hooks",
        "javascript:alert(1)",
    ],
)
def test_url_guard_refuses(db_url: str, api: Api, url: str) -> None:
    before = snapshot(db_url)
    resp = api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]})
    assert_problem(resp, 400, "invalid_request", "url")
    assert snapshot(db_url) == before


@pytest.mark.parametrize("url", ["https://1.1.1.1/hooks", "https://8.8.8.8:8443/a/b?c=d",
                                 "https://[2606:4700:4700::1111]/hooks"])
def test_public_https_urls_are_accepted(api: Api, url: str) -> None:
    assert endpoint(api, ["*"], url)["url"] == url


def test_allowed_networks_open_private_addresses_and_http(
    db_url: str, merchant: NewKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8, 10.0.0.0/8")
    with start_api(db_url, merchant) as api:
        for url in ("https://127.0.0.1:8443/hooks", "http://127.0.0.1:8080/hooks",
                    "http://10.9.8.7/hooks", "https://localhost:9/hooks"):
            assert endpoint(api, ["*"], url)["url"] == url
        for url in ("https://192.168.1.1/hooks", "http://192.168.1.1/hooks",
                    "http://1.1.1.1/hooks", "https://169.254.169.254/"):
            resp = api.post("/v1/webhook_endpoints", {"url": url, "event_types": ["*"]})
            assert_problem(resp, 400, "invalid_request", "url")
        # https to a public address stays fine
        assert endpoint(api, ["*"])["url"] == PUBLIC_URL


@pytest.mark.parametrize(
    "event_types",
    [["*"], ["payment.*"], ["payment.succeeded", "payout.paid"], ["account.balance_changed"],
     ["account.*", "deposit.succeeded", "refund.succeeded", "payment.refunded",
      "payment.failed", "account.created"]],
)
def test_event_type_patterns_accepted(api: Api, event_types: list[str]) -> None:
    assert endpoint(api, event_types)["event_types"] == event_types


@pytest.mark.parametrize(
    "body",
    [{"url": PUBLIC_URL}, {"url": PUBLIC_URL, "event_types": []},
     {"url": PUBLIC_URL, "event_types": "*"}, {"url": PUBLIC_URL, "event_types": None},
     {"url": PUBLIC_URL, "event_types": [1]}, {"url": PUBLIC_URL, "event_types": [""]},
     {"url": PUBLIC_URL, "event_types": ["no.such_event"]},
     {"url": PUBLIC_URL, "event_types": ["payment"]},
     {"url": PUBLIC_URL, "event_types": ["*.succeeded"]},
     {"url": PUBLIC_URL, "event_types": [{"type": "*"}]}],
    ids=repr,
)
def test_event_types_validation(db_url: str, api: Api, body: Json) -> None:
    before = snapshot(db_url)
    assert_problem(api.post("/v1/webhook_endpoints", body), 400, "invalid_request",
                   "event_types")
    assert snapshot(db_url) == before


@pytest.mark.parametrize("body", [{"event_types": ["*"]}, {"url": 42, "event_types": ["*"]},
                                  {"url": None, "event_types": ["*"]}], ids=repr)
def test_url_missing_or_wrong_type(db_url: str, api: Api, body: Json) -> None:
    before = snapshot(db_url)
    assert_problem(api.post("/v1/webhook_endpoints", body), 400, "invalid_request", "url")
    assert snapshot(db_url) == before


# --- fan-out, deliveries and recover --------------------------------------------------------------


def test_fan_out_follows_event_types(db_url: str, api: Api) -> None:
    everything = endpoint(api, ["*"])
    payments = endpoint(api, ["payment.*"])
    balances = endpoint(api, ["account.balance_changed"])
    payouts = endpoint(api, ["payout.paid"])
    a = api.funded_account(1_000)
    b = api.account()
    pay = api.payment(a["id"], b["id"], 100)
    evs = {e["id"]: e for e in events_of_payment(api, pay["id"])}
    assert len(evs) == 3

    def types(we: Json) -> list[str]:
        return sorted(api.get(f"/v1/events/{d['event']}").json()["type"]
                      for d in deliveries(api, we["id"]))

    assert types(payments) == ["payment.succeeded"]
    assert types(balances) == ["account.balance_changed"] * 3  # deposit + payment's two
    assert types(payouts) == []
    assert sorted(types(everything)) == sorted(
        ["account.created"] * 2 + ["deposit.succeeded"] + ["account.balance_changed"] * 3
        + ["payment.succeeded"])
    assert_conserved(db_url)


def test_deliveries_list(db_url: str, api: Api) -> None:
    we = endpoint(api, ["payment.*"])
    a = api.funded_account(1_000)
    b = api.account()
    pays = [api.payment(a["id"], b["id"], i + 1)["id"] for i in range(3)]
    failed = api.pay(b["id"], a["id"], 10_000).json()["payment"]["id"]
    event_ids = {e["subject"]: e["id"] for e in api.events() if e["type"].startswith("payment.")}
    rows = deliveries(api, we["id"])
    assert [d["event"] for d in rows] == [event_ids[p] for p in reversed([*pays, failed])]
    for d in rows:
        assert DELIVERY_FIELDS <= set(d)
        assert d["status"] == "pending"
        assert d["attempts"] == 0
        assert d["last_status_code"] is None
        assert d["last_error"] is None
        assert d["delivered_at"] is None
        assert is_rfc3339_utc(d["next_attempt_at"])
    # the cursor is the event id
    first = api.get(f"/v1/webhook_endpoints/{we['id']}/deliveries", {"limit": 2}).json()
    assert [d["event"] for d in first["data"]] == [d["event"] for d in rows[:2]]
    assert first["has_more"] is True
    second = api.get(f"/v1/webhook_endpoints/{we['id']}/deliveries",
                     {"limit": 2, "starting_after": first["data"][-1]["event"]}).json()
    assert [d["event"] for d in second["data"]] == [d["event"] for d in rows[2:]]
    assert second["has_more"] is False
    assert_conserved(db_url)


def test_deliveries_status_filter(db_url: str, api: Api) -> None:
    we = endpoint(api, ["payment.*"])
    a = api.funded_account(1_000)
    b = api.account()
    for i in range(4):
        api.payment(a["id"], b["id"], i + 1)
    rows = deliveries(api, we["id"])
    dead, done = rows[0]["event"], rows[1]["event"]
    execute(db_url, "UPDATE outbox.deliveries SET status = 'dead', attempts = 10, "
                    "dead_since = now(), last_status_code = 500, last_error = 'HTTP 500' "
                    "WHERE consumer = %s AND event_id = %s", (we["id"], dead))
    execute(db_url, "UPDATE outbox.deliveries SET status = 'delivered', attempts = 1, "
                    "delivered_at = now(), last_status_code = 200 "
                    "WHERE consumer = %s AND event_id = %s", (we["id"], done))
    dead_rows = deliveries(api, we["id"], status="dead")
    assert [d["event"] for d in dead_rows] == [dead]
    assert dead_rows[0]["attempts"] == 10
    assert dead_rows[0]["last_status_code"] == 500
    assert dead_rows[0]["last_error"] == "HTTP 500"
    delivered = deliveries(api, we["id"], status="delivered")
    assert [d["event"] for d in delivered] == [done]
    assert is_rfc3339_utc(delivered[0]["delivered_at"])
    assert delivered[0]["last_status_code"] == 200
    assert [d["event"] for d in deliveries(api, we["id"], status="pending")] == [
        d["event"] for d in rows[2:]]
    assert_problem(api.get(f"/v1/webhook_endpoints/{we['id']}/deliveries",
                           {"status": "lost"}), 400, "invalid_request", "status")


def test_recover_requeues_dead_deliveries_since(db_url: str, api: Api) -> None:
    we = endpoint(api, ["payment.*"])
    other = endpoint(api, ["payment.*"])
    a = api.funded_account(1_000)
    b = api.account()
    for i in range(3):
        api.payment(a["id"], b["id"], i + 1)
    old, recent, pending = [d["event"] for d in deliveries(api, we["id"])]
    now = datetime.now(UTC)
    for event, ago in ((old, timedelta(hours=3)), (recent, timedelta(minutes=10))):
        execute(db_url, "UPDATE outbox.deliveries SET status = 'dead', attempts = 10, "
                        "dead_since = %s, last_error = 'gave up' "
                        "WHERE consumer = %s AND event_id = %s", (now - ago, we["id"], event))
    execute(db_url, "UPDATE outbox.deliveries SET status = 'dead', dead_since = %s "
                    "WHERE consumer = %s", (now - timedelta(minutes=5), other["id"]))
    path = f"/v1/webhook_endpoints/{we['id']}/recover"

    resp = api.post(path, {"since": rfc3339(now - timedelta(hours=1))})
    assert resp.status_code == 202, resp.text
    assert resp.json() == {"requeued": 1, "out_of_order_subjects": 0}
    state = {d["event"]: d["status"] for d in deliveries(api, we["id"])}
    assert state == {old: "dead", recent: "pending", pending: "pending"}

    resp = api.post(path, {"since": rfc3339(now - timedelta(days=1))})
    assert resp.json() == {"requeued": 1, "out_of_order_subjects": 0}
    assert {d["status"] for d in deliveries(api, we["id"])} == {"pending"}
    assert api.post(path, {"since": rfc3339(now - timedelta(days=1))}).json() == {
        "requeued": 0, "out_of_order_subjects": 0}
    # a requeued delivery is due again and pending in the table too
    rows = query(db_url, "SELECT status, next_attempt_at <= now() FROM outbox.deliveries "
                         "WHERE consumer = %s", (we["id"],))
    assert rows == [("pending", True)] * 3
    # the other endpoint's dead rows are untouched
    assert {d["status"] for d in deliveries(api, other["id"])} == {"dead"}


@pytest.mark.parametrize("body", [{}, {"since": "yesterday"}, {"since": None},
                                  {"since": "2026-13-45T00:00:00Z"}, {"since": []}], ids=repr)
def test_recover_validation(db_url: str, api: Api, body: Json) -> None:
    we = endpoint(api, ["*"])
    before = snapshot(db_url)
    assert_problem(api.post(f"/v1/webhook_endpoints/{we['id']}/recover", body), 400,
                   "invalid_request", "since")
    assert snapshot(db_url) == before


def test_disabled_endpoint_gets_no_new_deliveries(db_url: str, api: Api) -> None:
    we = endpoint(api, ["payment.*"])
    a = api.funded_account(1_000)
    b = api.account()
    api.payment(a["id"], b["id"], 1)
    assert len(deliveries(api, we["id"])) == 1
    api.patch(f"/v1/webhook_endpoints/{we['id']}", {"status": "disabled"})
    api.payment(a["id"], b["id"], 2)
    assert len(deliveries(api, we["id"])) == 1
    api.patch(f"/v1/webhook_endpoints/{we['id']}", {"status": "enabled"})
    api.payment(a["id"], b["id"], 3)
    assert len(deliveries(api, we["id"])) == 2
    assert_conserved(db_url)


def test_patched_event_types_change_the_fan_out(db_url: str, api: Api) -> None:
    we = endpoint(api, ["payout.paid"])
    a = api.funded_account(1_000)
    b = api.account()
    api.payment(a["id"], b["id"], 1)
    assert deliveries(api, we["id"]) == []
    api.patch(f"/v1/webhook_endpoints/{we['id']}", {"event_types": ["payment.succeeded"]})
    pay = api.payment(a["id"], b["id"], 2)
    [d] = deliveries(api, we["id"])
    assert api.get(f"/v1/events/{d['event']}").json()["subject"] == pay["id"]
