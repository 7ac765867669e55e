"""The receiver's Starlette integration (receiver/asgi.py), through its lifespan: the answers the
relay sees for each outcome and failure, and catching up in the background."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool
from starlette.testclient import TestClient

from outbox.signing import new_secret
from receiver import Inbox, ReceivedEvent
from receiver.asgi import create_app
from receiver.migrate import migrate
from tests.receiverhelpers import create_effects_table, effects, envelope, record_effect, signed
from tests.support import with_database

SECRET = new_secret()


@pytest.fixture
def receiver_db(empty_db_url: str) -> str:
    migrate(empty_db_url)
    create_effects_table(empty_db_url)
    return empty_db_url


def client_for(url: str, handler: Any = record_effect, **pool_args: Any) -> TestClient:
    pool = AsyncConnectionPool(url, min_size=1, max_size=4, open=False, **pool_args)
    inbox = Inbox(pool, [SECRET], handler, poll_interval=0.05)
    return TestClient(create_app(inbox, path="/hooks"), raise_server_exceptions=False)


@pytest.fixture
def client(receiver_db: str) -> Iterator[TestClient]:
    with client_for(receiver_db) as running:
        yield running


def post(client: TestClient, event: dict[str, Any], secrets: list[str] | None = None) -> Any:
    body, headers = signed(event, secrets or [SECRET])
    return client.post("/hooks", content=body, headers=headers)


def test_outcomes_are_200_with_the_outcome(client: TestClient, receiver_db: str) -> None:
    first = post(client, envelope("evt_1", "s", 1))
    assert (first.status_code, first.json()) == (200, {"outcome": "applied"})
    assert post(client, envelope("evt_1", "s", 1)).json() == {"outcome": "duplicate"}
    assert post(client, envelope("evt_3", "s", 3)).json() == {"outcome": "held"}
    assert post(client, envelope("evt_2", "s", "0000000000000000002")).json() == {
        "outcome": "applied"}
    deadline = time.monotonic() + 30
    while len(effects(receiver_db)) < 3:  # the lifespan's catching up applies the held one
        assert time.monotonic() < deadline, effects(receiver_db)
        time.sleep(0.02)
    assert [e[2] for e in effects(receiver_db)] == [1, 2, 3]


def test_refusals_are_4xx_and_record_nothing(client: TestClient, receiver_db: str) -> None:
    assert post(client, envelope("evt_1", "s", 1), [new_secret()]).status_code == 401
    body, headers = signed(envelope("evt_1", "s", 1), [SECRET])
    assert client.post("/hooks", content=body).status_code == 401  # no headers at all
    assert client.post("/hooks", content=b"{}", headers=headers).status_code == 401
    assert post(client, envelope("evt_1", "s", 0)).status_code == 400
    assert post(client, envelope("evt_1", "s", True)).status_code == 400
    assert post(client, {"id": "evt_1"}).status_code == 400
    big = envelope("evt_1", "s", 1) | {"data": {"x": "y" * (1024 * 1024)}}
    assert post(client, big).status_code == 413
    assert client.get("/hooks").status_code == 405
    assert effects(receiver_db) == []


def test_a_handler_error_is_500_and_the_retry_applies(receiver_db: str) -> None:
    failures = [ValueError("boom")]

    async def flaky(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
        await record_effect(conn, event)
        if failures:
            raise failures.pop()

    with client_for(receiver_db, flaky) as client:
        failed = post(client, envelope("evt_1", "s", 1))
        assert failed.status_code == 500
        assert "boom" not in failed.text
        assert effects(receiver_db) == []
        assert post(client, envelope("evt_1", "s", 1)).json() == {"outcome": "applied"}
    assert len(effects(receiver_db)) == 1


def test_an_unreachable_database_is_503_with_retry_after(receiver_db: str) -> None:
    missing = with_database(receiver_db, "receiver_db_that_does_not_exist")
    with client_for(missing, timeout=1) as client:
        resp = post(client, envelope("evt_1", "s", 1))
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "1"
