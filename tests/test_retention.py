"""Retention on the relay's timer (OUTBOX_PURGE_INTERVAL, OUTBOX_RETENTION), with a real relay.

Three merchants, each with one '*' webhook endpoint on a local receiver: one that answers 204 (its
events end fully delivered), one that answers 500 (its deliveries end dead) and one that answers
503 with `Retry-After: 3600` (its deliveries stay pending). The `reports` handler takes the money
events of all three. Then the relay's purge timer must remove the delivered deliveries, their
attempt log and the fully delivered events, and keep every pending and dead delivery, the events
they belong to, their attempts and every subject's sequence counter. With the timer off, nothing
goes.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.relayhelpers import (
    Endpoint,
    RelayProcess,
    add_endpoint,
    make_traffic,
    new_merchant,
)
from tests.support.receiver import Receiver, Reply

PAYMENTS = 12


def rows(db_url: str, query: str) -> set[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return {tuple(r) for r in conn.execute(query).fetchall()}


def deliveries(db_url: str) -> dict[tuple[str, str], str]:
    """(consumer, event id) -> status."""
    return {
        (c, e): s
        for c, e, s in rows(db_url, "SELECT consumer, event_id, status FROM outbox.deliveries")
    }


def events_of(db_url: str, merchant_id: str) -> set[str]:
    return {
        r[0] for r in rows(db_url, f"SELECT id FROM outbox.events WHERE merchant_id = "
                                   f"'{merchant_id}'")
    }


def three_merchants(
    db_url: str, receiver: Receiver
) -> tuple[dict[str, str], dict[str, Endpoint]]:
    merchants = {kind: new_merchant(db_url, kind) for kind in ("ok", "dead", "pending")}
    endpoints = {kind: add_endpoint(db_url, receiver, m) for kind, m in merchants.items()}
    receiver.set_default(endpoints["dead"].path, 500)
    receiver.set_default(endpoints["pending"].path, Reply(503, retry_after=3600))
    # One client per merchant.
    asyncio.run(make_traffic(db_url, list(merchants.values()), PAYMENTS, clients=3))
    return merchants, endpoints


def settled(db_url: str, endpoints: dict[str, Endpoint]) -> bool:
    """The ok endpoint and reports have everything, the failing one is dead everywhere, the
    Retry-After one has been tried once for the head of every subject."""
    with psycopg.connect(db_url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM outbox.deliveries d WHERE d.status = 'pending' AND ("
            " d.consumer <> %s OR (d.attempts = 0 AND NOT EXISTS ("
            "   SELECT 1 FROM outbox.deliveries p WHERE p.consumer = d.consumer"
            "   AND p.subject = d.subject AND p.status = 'pending' AND p.sequence < d.sequence)))",
            (endpoints["pending"].id,),
        ).fetchone()
    assert left is not None
    return left[0] == 0


def wait(predicate: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def start_relay(db_url: str, tmp: Path, env: dict[str, str]) -> RelayProcess:
    return RelayProcess(db_url, tmp, env=env, args=["--log-format", "json"]).start().wait_ready()


@pytest.mark.parametrize("retention", ["2s", "0"])
def test_the_relay_purges_delivered_rows_on_its_timer(
    db_url: str, receiver: Receiver, tmp_path: Path, retention: str
) -> None:
    """`OUTBOX_RETENTION=0` keeps no delivered row at all, and still never a pending or dead one."""
    merchants, endpoints = three_merchants(db_url, receiver)
    subjects_before = rows(db_url, "SELECT subject, last_sequence FROM outbox.subjects")
    published = deliveries(db_url)
    assert published and set(published.values()) == {"pending"}

    relay = start_relay(db_url, tmp_path,
                        {"OUTBOX_PURGE_INTERVAL": "1s", "OUTBOX_RETENTION": retention})
    try:
        wait(lambda: settled(db_url, endpoints), "deliveries to settle")
        wait(lambda: "delivered" not in deliveries(db_url).values(),
             "the timer to purge every delivered delivery")
        wait(lambda: not events_of(db_url, merchants["ok"]), "fully delivered events to go")
        time.sleep(2.5)  # two more purges: what is left stays
        left = deliveries(db_url)
    finally:
        assert relay.stop() == 0, relay.log()
        relay.close()

    # Every delivery of the dead and pending endpoints is still there, in its state.
    dead_id, pending_id = endpoints["dead"].id, endpoints["pending"].id
    expected = {
        key: ("dead" if key[0] == dead_id else "pending")
        for key in published
        if key[0] in (dead_id, pending_id)
    }
    assert left == expected
    assert receiver.accepted(endpoints["ok"].path), "the ok endpoint received nothing"

    # Events: the ok merchant's are gone (fully delivered), the others' are all there.
    assert events_of(db_url, merchants["ok"]) == set()
    kept_events = {event for _, event in expected}
    assert events_of(db_url, merchants["dead"]) | events_of(db_url, merchants["pending"]) == \
        kept_events
    assert rows(db_url, "SELECT 1 FROM outbox.deliveries d WHERE NOT EXISTS ("
                        " SELECT 1 FROM outbox.events e WHERE e.id = d.event_id)") == set()

    # The attempt log: only attempts of deliveries that are left, all of them.
    attempts = rows(db_url, "SELECT consumer, event_id FROM outbox.attempts")
    assert attempts <= set(expected)
    assert {(c, e) for c, e in expected if c == dead_id} <= attempts
    assert len(rows(db_url, "SELECT id FROM outbox.attempts WHERE consumer = "
                            f"'{dead_id}'")) == 3 * sum(1 for c, _ in expected if c == dead_id)

    # Sequences go on where they were: the counters are never purged.
    assert rows(db_url, "SELECT subject, last_sequence FROM outbox.subjects") == subjects_before

    log = relay.log_path.read_text()
    purged = [line for line in log.splitlines() if '"purged ' in line]
    assert purged, log


@pytest.mark.parametrize("interval", ["0", "off"])
def test_the_off_switch_keeps_everything(
    db_url: str, receiver: Receiver, tmp_path: Path, interval: str
) -> None:
    merchants, endpoints = three_merchants(db_url, receiver)
    relay = start_relay(db_url, tmp_path,
                        {"OUTBOX_PURGE_INTERVAL": interval, "OUTBOX_RETENTION": "1s"})
    try:
        wait(lambda: settled(db_url, endpoints), "deliveries to settle")
        before = deliveries(db_url)
        events_before = rows(db_url, "SELECT id FROM outbox.events")
        attempts_before = rows(db_url, "SELECT id FROM outbox.attempts")
        time.sleep(4)  # a timer of 1 s would have purged three times over
        assert deliveries(db_url) == before
        assert rows(db_url, "SELECT id FROM outbox.events") == events_before
        assert rows(db_url, "SELECT id FROM outbox.attempts") == attempts_before
    finally:
        assert relay.stop() == 0, relay.log()
        relay.close()
    assert "delivered" in before.values()
    assert events_of(db_url, merchants["ok"])
    assert "purged" not in relay.log_path.read_text()


def test_sigterm_during_a_purge_still_stops_within_the_grace(
    db_url: str, tmp_path: Path
) -> None:
    """docs/operations.md: on SIGTERM the relay exits 0 within 30 s. A purge that is still
    running must not hold the exit: here it waits on a lock (as a long purge of a big backlog
    runs on), and the relay must be gone within OUTBOX_SHUTDOWN_GRACE and a few seconds."""
    merchant = new_merchant(db_url)
    relay = start_relay(db_url, tmp_path, {"OUTBOX_PURGE_INTERVAL": "1s",
                                           "OUTBOX_RETENTION": "1s",
                                           "OUTBOX_SHUTDOWN_GRACE": "1"})
    locker = psycopg.connect(db_url)
    try:
        asyncio.run(make_traffic(db_url, [merchant], 3, clients=1))
        wait(lambda: deliveries(db_url) != {} and
             set(deliveries(db_url).values()) == {"delivered"}, "reports to apply everything")
        locker.execute("LOCK TABLE outbox.attempts IN ACCESS EXCLUSIVE MODE")
        wait(lambda: bool(rows(db_url, "SELECT pid FROM pg_stat_activity"
                                       " WHERE application_name = 'outbox-relay'"
                                       " AND query LIKE '%outbox.attempts%'"
                                       " AND wait_event_type = 'Lock'")),
             "the purge to wait on the lock", timeout=30)
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        try:
            code = relay.wait(30)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - started
    finally:
        locker.rollback()
        locker.close()
        relay.close()
    assert code == 0 and elapsed < 8, (
        f"SIGTERM during a purge: exit {code} after {elapsed:.1f} s "
        f"(the relay waits for its purge thread to finish)\n{relay.log()}"
    )
