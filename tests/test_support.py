"""The test helpers themselves: fixtures, private cluster, TCP proxy, webhook receiver."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from datetime import UTC, datetime

import aiohttp
import psycopg
import pytest
from standardwebhooks import Webhook

from ledger.merchants import NewKey
from tests.support.pgcluster import PgCluster
from tests.support.receiver import Overlap, Receiver, ReceiverTimeout, Reply
from tests.support.tcpproxy import TcpProxy

# --- database fixtures --------------------------------------------------------------------------


def test_db_url_is_migrated_and_private(conn: psycopg.Connection, db_url: str) -> None:
    conn.execute("INSERT INTO merchants (id, name) VALUES ('mer_private', 'x')")
    conn.commit()
    row = conn.execute("SELECT current_database()").fetchone()
    assert row is not None and row[0] in db_url


def test_each_test_gets_a_fresh_database(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT count(*) FROM merchants WHERE id = 'mer_private'").fetchone()
    assert row == (0,)


def test_merchant_is_committed(merchant: NewKey, db_url: str) -> None:
    assert merchant.merchant_id.startswith("mer_") and merchant.api_key.startswith("sk_")
    with psycopg.connect(db_url) as other:
        row = other.execute("SELECT 1 FROM merchants WHERE id = %s", (merchant.merchant_id,))
        assert row.fetchone() == (1,)


async def test_aconn_is_async_and_transactional(aconn: psycopg.AsyncConnection) -> None:
    assert not aconn.autocommit
    cur = await aconn.execute("SELECT count(*) FROM outbox.consumers WHERE name = 'reports'")
    assert await cur.fetchone() == (1,)


# --- private cluster ----------------------------------------------------------------------------


def test_pg_cluster_restart_and_stop(pg_cluster: PgCluster) -> None:
    url = pg_cluster.migrate()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO merchants (id, name) VALUES ('mer_1', 'kept')")
        victim = psycopg.connect(url, autocommit=True)

    pg_cluster.restart()
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    victim.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT name FROM merchants").fetchall() == [("kept",)]
        # Acknowledged just before a crash: it must survive it.
        conn.execute("INSERT INTO merchants (id, name) VALUES ('mer_2', 'crash')")

    pg_cluster.stop("immediate")
    assert not pg_cluster.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)

    pg_cluster.start()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM merchants").fetchone() == (2,)


def test_pg_cluster_cleans_up_after_failure() -> None:
    cluster = PgCluster()
    with pytest.raises(RuntimeError, match="boom"), cluster:
        base = cluster.base
        assert base is not None and base.exists()
        raise RuntimeError("boom")
    assert base is not None and not base.exists()
    assert not cluster.running


# --- TCP proxy ----------------------------------------------------------------------------------


def test_proxy_passes_traffic_and_cut_breaks_connections(
    db_url: str, make_proxy: Callable[[str], TcpProxy]
) -> None:
    proxy = make_proxy(db_url)
    via_proxy = proxy.url_for(db_url)
    with psycopg.connect(via_proxy, autocommit=True) as conn:
        big = conn.execute("SELECT repeat('x', 1000000)").fetchone()
        assert big is not None and len(big[0]) == 1_000_000
        assert proxy.connections == 1

        assert proxy.cut() == 1
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")

    with psycopg.connect(via_proxy) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_proxy_block_refuse_and_hang(db_url: str, make_proxy: Callable[[str], TcpProxy]) -> None:
    proxy = make_proxy(db_url)
    via_proxy = proxy.url_for(db_url)

    proxy.block("refuse")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(via_proxy, connect_timeout=2)

    proxy.block("hang")
    # libpq's connect_timeout cannot go below 2 s, so probe the hang with a raw socket: an
    # SSLRequest that PostgreSQL answers with one byte, once the proxy forwards it.
    with socket.create_connection((proxy.host, proxy.port), timeout=0.3) as raw:
        raw.sendall(struct.pack("!ii", 8, 80877103))
        with pytest.raises(TimeoutError):
            raw.recv(1)
        proxy.unblock()
        raw.settimeout(5)
        assert raw.recv(1) in (b"N", b"S")

    with psycopg.connect(via_proxy) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)


def test_proxy_in_front_of_a_private_cluster(
    pg_cluster: PgCluster, make_proxy: Callable[[str], TcpProxy]
) -> None:
    proxy = make_proxy(pg_cluster.server_url)
    with psycopg.connect(proxy.url_for(pg_cluster.server_url)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


# --- webhook receiver ---------------------------------------------------------------------------

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()


def _signed(msg_id: str, body: bytes, secret: str = SECRET) -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, now, body.decode()),
        "content-type": "application/cloudevents+json",
    }


async def _post(
    session: aiohttp.ClientSession, url: str, msg_id: str, *, secret: str = SECRET
) -> aiohttp.ClientResponse:
    body = json.dumps({"specversion": "1.0", "id": msg_id, "type": "test.ping"}).encode()
    async with session.post(
        url, data=body, headers=_signed(msg_id, body, secret), allow_redirects=False
    ) as response:
        await response.read()
        return response


async def test_receiver_verifies_signatures(receiver: Receiver) -> None:
    url = receiver.add_endpoint("/hook", SECRET)
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    async with aiohttp.ClientSession() as session:
        good = await _post(session, url, "evt_good")
        bad = await _post(session, url, "evt_bad", secret=other)
    assert (good.status, bad.status) == (204, 401)

    first, second = await receiver.wait_for_async(2, path="/hook")
    assert first.verified and first.error is None
    assert first.webhook_id == "evt_good" and first.body["id"] == "evt_good"
    assert first.content_type == "application/cloudevents+json"
    assert first.timestamp is not None and abs(first.timestamp - time.time()) < 5
    assert not second.verified and second.error
    assert [r.webhook_id for r in receiver.accepted()] == ["evt_good"]


async def test_receiver_programmed_replies(receiver: Receiver) -> None:
    url = receiver.add_endpoint("/p", SECRET, default=200)
    receiver.respond(
        "/p",
        503,
        Reply(429, retry_after=7),
        Reply.redirect("https://example.invalid/elsewhere"),
        Reply(reset=True),
        Reply(delay=0.5),
    )
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        assert (await _post(session, url, "evt_1")).status == 503
        limited = await _post(session, url, "evt_1")
        assert (limited.status, limited.headers["Retry-After"]) == (429, "7")
        moved = await _post(session, url, "evt_1")
        assert moved.status == 307 and moved.headers["Location"].endswith("/elsewhere")
        with pytest.raises(aiohttp.ClientError):
            await _post(session, url, "evt_1")
        with pytest.raises(TimeoutError):
            await _post(session, url, "evt_1")
        assert (await _post(session, url, "evt_1")).status == 200

    receipts = await receiver.wait_for_async(6, path="/p")
    assert [r.attempt for r in receipts] == [1, 2, 3, 4, 5, 6]
    assert all(r.verified for r in receipts)
    assert len(receiver.accepted("/p")) == 1


async def test_receiver_unknown_path_and_timeout(receiver: Receiver) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await _post(session, receiver.url("/nowhere"), "evt_x")).status == 404
    (receipt,) = receiver.receipts("/nowhere")
    assert not receipt.verified
    with pytest.raises(ReceiverTimeout):
        receiver.wait_for(2, timeout=0.1)


async def test_receiver_notes_overlaps_and_forgets_what_the_sender_gave_up(
    receiver: Receiver,
) -> None:
    """A request is in flight at the receiver until it is answered or its sender gives up (its
    timeout closes the connection); one that arrives while another of its subject is in flight
    at the same path is an overlap."""
    import asyncio
    import threading

    url = receiver.add_endpoint("/o", SECRET)
    gate = threading.Event()
    receiver.respond("/o", Reply(gate=gate), 204, 204, Reply(delay=30))

    async def post(session: aiohttp.ClientSession, msg_id: str, subject: str) -> int:
        body = json.dumps({"specversion": "1.0", "id": msg_id, "type": "t", "subject": subject,
                           "sequence": 1}).encode()
        async with session.post(url, data=body, headers=_signed(msg_id, body, SECRET)) as resp:
            return resp.status

    async with aiohttp.ClientSession() as session:
        held = asyncio.create_task(post(session, "evt_a", "s"))
        await receiver.wait_for_async(1, path="/o")
        assert await post(session, "evt_b", "s") == 204  # while evt_a is unanswered
        assert await post(session, "evt_c", "t") == 204  # another subject
        gate.set()
        assert await held == 204
        with pytest.raises(TimeoutError):  # the sender gives up on evt_d
            await asyncio.wait_for(post(session, "evt_d", "s"), 0.3)
    for _ in range(200):  # the connection is gone: its handler ends
        if receiver.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert receiver.in_flight == 0
    async with aiohttp.ClientSession() as session:
        assert await post(session, "evt_e", "s") == 204
    assert receiver.overlaps == [Overlap("/o", "s", "evt_b", ("evt_a",))]


async def test_receiver_takes_hundreds_of_concurrent_posts(receiver: Receiver) -> None:
    import asyncio

    url = receiver.add_endpoint("/many", SECRET)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        responses = await asyncio.gather(*(_post(session, url, f"evt_{i}") for i in range(400)))
        elapsed = time.monotonic() - started
    assert {r.status for r in responses} == {204}
    assert len(receiver.wait_for(400, path="/many", timeout=5)) == 400
    assert elapsed < 5


def test_free_port_helper_gives_bindable_port() -> None:
    from tests.support import free_port

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
