"""Log lines: JSON from the relay with the fields that matter, and no secret in any line of the
relay or of the API.

The relay runs with `--log-format json` against endpoints that answer 204, 500 (until dead), 410,
503 with Retry-After, reset the connection, and one that refuses connections behind a URL carrying
a token in its query; its database URL carries a password and the database goes away for a while.
The API runs as `payments-api` with the same kind of database URL, serves requests with valid and
invalid keys and bodies holding a secret, and loses its database. Nothing that is a secret may
show in any log line: no `whsec_` signing secret (nor its base64 key), no `webhook-signature`
value, no API key, no database password, no token from an endpoint URL.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from ledger.ids import new_id
from ledger.merchants import NewKey
from outbox.signing import new_secret
from tests.apihelpers import Api, created
from tests.relayhelpers import Endpoint, RelayProcess, add_endpoint, make_traffic
from tests.support import free_port
from tests.support.receiver import Receiver, Reply
from tests.support.tcpproxy import TcpProxy
from tests.test_metrics_docs import api_process

PASSWORD = "pw-Do-Not-Log-7f3a9c"
URL_TOKEN = "tok_DoNotLog_5b1e0d"
ATTEMPT_OUTCOMES = {"retry", "dead", "park"}


def url_with_password(proxy: TcpProxy, db_url: str) -> str:
    """`db_url` through `proxy`, over TCP, with a password (ignored by a trust server, but in
    every connection string the process holds)."""
    through = proxy.url_for(db_url)
    scheme, rest = through.split("://", 1)
    return f"{scheme}://root:{PASSWORD}@{rest}"


def assert_no_secrets(text: str, *, secrets: Iterable[str], what: str) -> None:
    patterns = {
        "a whsec_ secret": r"whsec_",
        "an API key": r"(?<![A-Za-z0-9])sk_[A-Za-z0-9]",
        "a webhook signature": r"v1,[A-Za-z0-9+/]{20,}",
        "the database password": re.escape(PASSWORD),
        "a token from an endpoint URL": re.escape(URL_TOKEN),
    }
    for line in text.splitlines():
        for name, pattern in patterns.items():
            assert not re.search(pattern, line), f"{what} logged {name}: {line}"
        for secret in secrets:
            assert secret not in line, f"{what} logged a secret ({secret[:6]}…): {line}"


def wait_settled(db_url: str, timeout: float = 90.0) -> None:
    """Until no pending delivery is left but those of a disabled endpoint (the 410 one)."""
    deadline = time.monotonic() + timeout
    while True:
        with psycopg.connect(db_url) as conn:
            due = conn.execute(
                "SELECT d.consumer, d.event_id, d.attempts, d.next_attempt_at::text"
                " FROM outbox.deliveries d JOIN outbox.consumers k ON k.name = d.consumer"
                " WHERE d.status = 'pending' AND k.enabled"
            ).fetchall()
        if not due:
            return
        assert time.monotonic() < deadline, f"still pending after {timeout} s: {due}"
        time.sleep(0.1)


def endpoint_with_url(db_url: str, merchant_id: str, url: str) -> Endpoint:
    """A '*' endpoint with an arbitrary URL (add_endpoint builds the receiver's)."""
    endpoint_id, secret = new_id("we"), new_secret()
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO webhook_endpoints (id, merchant_id, url, event_types, secret)"
            " VALUES (%s, %s, %s, %s, %s)",
            (endpoint_id, merchant_id, url, ["*"], secret),
        )
        conn.execute(
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
            " VALUES (%s, 'webhook', %s, %s)",
            (endpoint_id, merchant_id, ["*"]),
        )
    return Endpoint(endpoint_id, merchant_id, "", secret, ("*",))


def test_relay_json_logs_carry_the_fields_and_no_secret(
    db_url: str, merchant: NewKey, receiver: Receiver, tmp_path: Path,
    make_proxy: Callable[[str], TcpProxy],
) -> None:
    m = merchant.merchant_id
    ok = add_endpoint(db_url, receiver, m)
    failing = add_endpoint(db_url, receiver, m)
    receiver.set_default(failing.path, 500)
    gone = add_endpoint(db_url, receiver, m)
    receiver.set_default(gone.path, 410)
    throttled = add_endpoint(db_url, receiver, m)
    receiver.respond(throttled.path, Reply(503, retry_after=1))
    flaky = add_endpoint(db_url, receiver, m)
    receiver.respond(flaky.path, Reply(reset=True))
    closed = endpoint_with_url(
        db_url, m, f"http://127.0.0.1:{free_port()}/hook?token={URL_TOKEN}"
    )
    endpoints = [ok, failing, gone, throttled, flaky, closed]

    proxy = make_proxy(db_url)
    relay = RelayProcess(url_with_password(proxy, db_url), tmp_path,
                         args=["--log-format", "json"])
    try:
        relay.start().wait_ready()
        asyncio.run(make_traffic(db_url, [m], 6, clients=2))
        wait_settled(db_url)
        # The database goes away for a moment: connections reset, new ones refused.
        proxy.cut()
        proxy.block("refuse")
        time.sleep(2)
        proxy.unblock()
        time.sleep(1)
        assert relay.stop() == 0, relay.log()
    finally:
        relay.close()
    text = relay.log_path.read_text()

    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    records: list[dict[str, Any]] = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        for member in ("time", "level", "logger", "message"):
            assert member in record, line
        records.append(record)

    by_id = {e.id: e for e in endpoints}
    outcomes: dict[str, set[str]] = {}
    for record in records:
        if record.get("outcome") not in ATTEMPT_OUTCOMES:
            continue
        assert str(record.get("event", "")).startswith("evt_"), record
        assert record.get("consumer") in by_id, record
        assert isinstance(record.get("attempt"), int) and record["attempt"] >= 1, record
        assert "latency_ms" in record, record
        assert record.get("status_code") or record.get("error"), record
        outcomes.setdefault(record["consumer"], set()).add(record["outcome"])
    assert outcomes.get(failing.id) == {"retry", "dead"}, outcomes
    assert outcomes.get(gone.id) == {"park"}, outcomes
    assert "retry" in outcomes.get(throttled.id, set()), outcomes
    assert "retry" in outcomes.get(flaky.id, set()), outcomes
    assert outcomes.get(closed.id) == {"retry", "dead"}, outcomes
    dead = [r for r in records if r.get("outcome") == "dead"]
    assert all(r["consumer"] in (failing.id, closed.id) and r["attempt"] == 3 for r in dead)
    # The database trouble was logged (so the password check below means something).
    assert any(r["level"] == "warning" and ("database" in r["message"]
                                            or "listener" in r["message"])
               for r in records), text

    signatures = [r.headers["webhook-signature"] for r in receiver.receipts()
                  if "webhook-signature" in r.headers]
    assert signatures
    secrets = [merchant.api_key]
    for endpoint in endpoints:
        secrets += [endpoint.secret, endpoint.secret.removeprefix("whsec_")]
    for signature in signatures:
        secrets += [sig.split(",", 1)[-1] for sig in signature.split()]
    assert_no_secrets(text, secrets=secrets, what="the relay")


def test_api_logs_no_secret_under_errors(
    db_url: str, merchant: NewKey, tmp_path: Path, make_proxy: Callable[[str], TcpProxy],
) -> None:
    proxy = make_proxy(db_url)
    env = {"OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}
    secrets = [merchant.api_key, PASSWORD]
    with api_process(url_with_password(proxy, db_url), tmp_path, env=env,
                     args=["--log-level", "info"]) as server, \
            httpx.Client(base_url=server.url, timeout=20) as client:
        api = Api(client, merchant.api_key)
        endpoint = created(api.post(
            "/v1/webhook_endpoints",
            {"url": f"http://127.0.0.1:9/hook?token={URL_TOKEN}", "event_types": ["*"]},
        ))
        secret = endpoint["secret"]
        secrets += [secret, secret.removeprefix("whsec_")]
        source = api.funded_account(1_000)
        destination = api.account()
        api.payment(source["id"], destination["id"], 10, description=f"note {secret}")
        # Refusals and failures, each carrying a secret somewhere in the request.
        api.pay(source["id"], destination["id"], 10**6, description=merchant.api_key)
        api.post("/v1/payments", content=f'{{"amount": "{secret}"'.encode(),
                 headers={"Content-Type": "application/json"})
        api.post("/v1/payments", {"source": source["id"], "destination": destination["id"],
                                  "amount": 1, "currency": "USD",
                                  "description": f"nul\u0000{secret}"})
        api.get("/v1/accounts", {"limit": "²"})
        api.as_key(merchant.api_key + "x").get("/v1/accounts")
        client.get("/v1/accounts", headers={"Authorization": f"Basic {merchant.api_key}"})
        # The database goes away: 503s, a failing readiness probe and metrics without backlog.
        proxy.cut()
        proxy.block("refuse")
        assert api.pay(source["id"], destination["id"], 1).status_code == 503
        assert client.get("/readyz").status_code == 503
        assert "payments_api_database_up 0.0" in client.get("/metrics").text
        api.get(f"/v1/accounts/{source['id']}")
        proxy.unblock()
        server.stop()
        text = server.log()

    assert text.strip(), "the API logged nothing although its database went away"
    assert "outbox backlog unavailable" in text
    assert_no_secrets(text, secrets=secrets, what="the API")


@pytest.mark.parametrize("pattern", ["whsec_abc", "sk_live_123", "v1,AAAAAAAAAAAAAAAAAAAAAAAA"])
def test_the_checks_catch_what_they_look_for(pattern: str) -> None:
    with pytest.raises(AssertionError):
        assert_no_secrets(f"hello {pattern} world", secrets=[], what="x")
    assert_no_secrets("risk_declined v1 HTTP 500", secrets=[], what="x")
