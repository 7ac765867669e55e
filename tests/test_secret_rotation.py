"""Webhook secret rotation without downtime (issue 6, Standard Webhooks' several signatures).

`POST /v1/webhook_endpoints/{id}/rotate_secret` with an optional `{"expires_in": seconds}`
(default 24 h, 0 retires the old secret at once, at most 7 days) answers 200 with the endpoint and
its new `secret`. While the old secret's window lasts the relay signs every request with both
(`webhook-signature: v1,<new> v1,<old>`), so a receiver that still verifies with the old secret
and one that already has the new one both accept; afterwards only the new one verifies.

End to end: the API (in process) creates and rotates the endpoint, a real `outbox-relay` with
`--log-format json` delivers to a receiver, and each request is verified with
`standardwebhooks.Webhook(secret).verify` once per secret. Also: validation, idempotent replay,
another merchant's 404 (as for an id that never existed, nothing changed), and no secret in any
log line of the relay or the API, nor in any error body.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from standardwebhooks import Webhook

from ledger.ids import new_id
from ledger.merchants import NewKey
from outbox.signing import secret_key, sign
from tests.apihelpers import Api, assert_problem, created, new_merchant, query, start_api
from tests.relayhelpers import RelayProcess, delivery_counts
from tests.support.receiver import Receipt, Receiver

DAY = 24 * 3600
WEEK = 7 * DAY


@pytest.fixture
def api(db_url: str, merchant: NewKey, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    # The receiver listens on 127.0.0.1: let the URL guard accept it.
    monkeypatch.setenv("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8")
    with start_api(db_url, merchant) as client:
        yield client


def rotate_path(endpoint_id: str) -> str:
    return f"/v1/webhook_endpoints/{endpoint_id}/rotate_secret"


def stored(db_url: str, endpoint_id: str) -> tuple[Any, ...]:
    """(secret, previous_secret, seconds until the previous one expires) as stored."""
    rows = query(
        db_url,
        "SELECT secret, previous_secret,"
        " extract(epoch FROM previous_secret_expires_at - now())::float8"
        " FROM webhook_endpoints WHERE id = %s",
        (endpoint_id,),
    )
    assert len(rows) == 1
    return rows[0]


def verifies(secret: str, receipt: Receipt) -> bool:
    try:
        Webhook(secret).verify(receipt.raw, dict(receipt.headers))
    except Exception:
        return False
    return True


def signatures(receipt: Receipt) -> list[str]:
    return receipt.headers["webhook-signature"].split(" ")


def wait_delivered(db_url: str, within: float = 90.0) -> None:
    """Until no delivery is pending (generous: the machine may be loaded)."""
    deadline = time.monotonic() + within
    while True:
        counts = delivery_counts(db_url)
        if not counts.get("pending"):
            assert not counts.get("dead"), counts
            return
        assert time.monotonic() < deadline, f"still pending after {within} s: {counts}"
        time.sleep(0.1)


# --- the route ----------------------------------------------------------------------------------


def test_rotation_answers_the_endpoint_with_a_new_secret_shown_only_there(
    db_url: str, api: Api
) -> None:
    we = created(api.post("/v1/webhook_endpoints",
                          {"url": "https://1.1.1.1/hooks", "event_types": ["*"]}))
    old = we["secret"]

    resp = api.post(rotate_path(we["id"]))  # no body: the default overlap of 24 hours
    assert resp.status_code == 200, resp.text
    rotated = resp.json()
    new = rotated["secret"]
    assert new.startswith("whsec_") and new != old
    assert len(secret_key(new)) == 24
    assert {k: v for k, v in rotated.items() if k != "secret"} == {
        k: v for k, v in we.items() if k != "secret"
    }
    secret, previous, left = stored(db_url, we["id"])
    assert (secret, previous) == (new, old)
    assert DAY - 60 < left <= DAY

    # Shown only in the rotation's answer.
    for path in (f"/v1/webhook_endpoints/{we['id']}", "/v1/webhook_endpoints"):
        got = api.get(path)
        assert got.status_code == 200
        assert new not in got.text and old not in got.text and "secret" not in got.text

    # A second rotation: the current secret becomes the previous one, the oldest is gone.
    newest = created_200(api.post(rotate_path(we["id"]), {"expires_in": WEEK}))["secret"]
    secret, previous, left = stored(db_url, we["id"])
    assert (secret, previous) == (newest, new)
    assert WEEK - 60 < left <= WEEK

    # 0: the old secret stops at once; nothing of it is kept.
    latest = created_200(api.post(rotate_path(we["id"]), {"expires_in": 0}))["secret"]
    assert stored(db_url, we["id"]) == (latest, None, None)
    assert len({old, new, newest, latest}) == 4


def created_200(resp: Any) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


@pytest.mark.parametrize(
    "body",
    [
        {"expires_in": -1},
        {"expires_in": WEEK + 1},
        {"expires_in": 10**20},
        {"expires_in": 1.5},
        {"expires_in": "60"},
        {"expires_in": True},
        {"expires_in": [60]},
        {"secret": "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"},
    ],
)
def test_bad_bodies_are_400_and_rotate_nothing(db_url: str, api: Api, body: Any) -> None:
    we = created(api.post("/v1/webhook_endpoints",
                          {"url": "https://1.1.1.1/hooks", "event_types": ["*"]}))
    before = stored(db_url, we["id"])
    param = "secret" if "secret" in body else "expires_in"
    problem = assert_problem(api.post(rotate_path(we["id"]), body), 400, "invalid_request",
                             param=param)
    assert we["secret"] not in str(problem)
    assert stored(db_url, we["id"]) == before


def test_a_replayed_rotation_returns_the_same_secret_and_rotates_once(
    db_url: str, api: Api
) -> None:
    we = created(api.post("/v1/webhook_endpoints",
                          {"url": "https://1.1.1.1/hooks", "event_types": ["*"]}))
    first = api.post(rotate_path(we["id"]), {"expires_in": 600}, idem="rotate-1")
    again = api.post(rotate_path(we["id"]), {"expires_in": 600}, idem="rotate-1")
    assert first.status_code == again.status_code == 200
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == first.json()
    assert stored(db_url, we["id"])[:2] == (first.json()["secret"], we["secret"])
    reused = api.post(rotate_path(we["id"]), {"expires_in": 60}, idem="rotate-1")
    problem = assert_problem(reused, 422, "idempotency_key_reused")
    assert first.json()["secret"] not in reused.text and we["secret"] not in str(problem)


def test_another_merchants_endpoint_is_404_as_if_missing(db_url: str, api: Api) -> None:
    we = created(api.post("/v1/webhook_endpoints",
                          {"url": "https://1.1.1.1/hooks", "event_types": ["*"]}))
    before = stored(db_url, we["id"])
    other = api.as_key(new_merchant(db_url).api_key)
    missing = new_id("we")
    for body in (None, {"expires_in": 0}, {"expires_in": WEEK}):
        kwargs: dict[str, Any] = {} if body is None else {"body": body}
        foreign = other.post(rotate_path(we["id"]), **kwargs)
        absent = other.post(rotate_path(missing), **kwargs)
        assert_problem(foreign, 404, "not_found", param="id")
        assert_problem(absent, 404, "not_found", param="id")
        assert foreign.json()["detail"].replace(we["id"], "<id>") == (
            absent.json()["detail"].replace(missing, "<id>")
        )
        assert we["secret"] not in foreign.text and "whsec_" not in foreign.text
    assert stored(db_url, we["id"]) == before
    # With an idempotency key too: the stored 404 is replayed, still nothing rotated.
    for _ in range(2):
        resp = other.post(rotate_path(we["id"]), {"expires_in": 0}, idem="foreign-rotation")
        assert_problem(resp, 404, "not_found")
    assert stored(db_url, we["id"]) == before


# --- end to end through the relay -----------------------------------------------------------------


def test_both_secrets_verify_during_the_overlap_and_only_the_new_one_after(
    db_url: str, api: Api, receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = "/rotating"
    we = created(api.post("/v1/webhook_endpoints",
                          {"url": receiver.url(path), "event_types": ["*"]}))
    old = we["secret"]
    # Not strict: every request is answered 204 and recorded; the test verifies each one with
    # every secret, as receivers holding the old and the new secret would.
    receiver.add_endpoint(path, old, strict=False)
    relay = RelayProcess(db_url, tmp_path, args=["--log-format", "json"]).start()
    secrets = [old]
    try:
        relay.wait_ready()
        source = api.funded_account(10_000)["id"]
        destination = api.account()["id"]

        def phase(payments: int) -> list[Receipt]:
            seen = len(receiver.receipts(path))
            for _ in range(payments):
                api.payment(source, destination, 7)
            wait_delivered(db_url)
            fresh = receiver.receipts(path)[seen:]
            assert len(fresh) >= 3 * payments, len(fresh)  # payment.succeeded + 2 balances
            return fresh

        # Before any rotation: one signature, the only secret.
        for r in phase(1):
            assert len(signatures(r)) == 1 and verifies(old, r)

        # During the overlap: both secrets verify every request, the new signature first.
        new = created_200(api.post(rotate_path(we["id"]), {"expires_in": 3600}))["secret"]
        secrets.append(new)
        overlap = phase(3)
        for r in overlap:
            assert verifies(old, r), f"the old secret's receiver refused {r.webhook_id}"
            assert verifies(new, r), f"the new secret's receiver refused {r.webhook_id}"
            sigs = signatures(r)
            assert len(sigs) == 2, sigs
            assert r.timestamp is not None and r.webhook_id is not None
            assert sigs[0] == sign(secret_key(new), r.webhook_id, r.timestamp, r.raw)
            assert sigs[1] == sign(secret_key(old), r.webhook_id, r.timestamp, r.raw)

        # The window ends (as if the hour had passed): only the new secret verifies.
        with psycopg.connect(db_url) as conn:
            conn.execute(
                "UPDATE webhook_endpoints SET previous_secret_expires_at = now()"
                " WHERE id = %s",
                (we["id"],),
            )
        for r in phase(2):
            assert verifies(new, r), r.error
            assert not verifies(old, r), f"{r.webhook_id} still verifies with the old secret"
            assert len(signatures(r)) == 1

        # expires_in 0: the old secret stops with the rotation itself.
        newest = created_200(api.post(rotate_path(we["id"]), {"expires_in": 0}))["secret"]
        secrets.append(newest)
        for r in phase(1):
            assert verifies(newest, r)
            assert not verifies(new, r) and not verifies(old, r)
            assert len(signatures(r)) == 1

        # A rejected and a foreign rotation on the way: error bodies carry no secret.
        for resp in (
            api.post(rotate_path(we["id"]), {"expires_in": -5}),
            api.as_key(new_merchant(db_url).api_key).post(rotate_path(we["id"])),
        ):
            assert resp.status_code in (400, 404)
            assert "whsec_" not in resp.text
            assert not any(s.removeprefix("whsec_") in resp.text for s in secrets)
        assert relay.stop() == 0, relay.log()
    finally:
        relay.close()

    relay_log = relay.log_path.read_text(errors="replace")
    api_log = "\n".join(caplog.messages) + "\n".join(
        str(r.__dict__) for r in caplog.records
    )
    assert '"level"' in relay_log  # JSON lines
    for name, text in (("relay", relay_log), ("API", api_log)):
        for secret in secrets:
            assert secret.removeprefix("whsec_") not in text, f"the {name} logged a secret"
        assert "whsec_" not in text, f"the {name} logged a secret"
        assert "v1," not in text, f"the {name} logged a signature"
