"""`paymentsctl`, run as the installed console script in subprocesses, against real databases.

Dead and delivered rows are written straight into outbox.deliveries: the tests pin what the
commands do to the delivery state machine, whoever produced the rows.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from admin.retention import PurgeCounts, parse_duration, purge
from ledger.ids import new_id
from ledger.merchants import key_matches

NOW = datetime.now(UTC)
DAY = timedelta(days=1)


def _paymentsctl() -> str:
    beside_python = Path(sys.executable).parent / "paymentsctl"
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("paymentsctl")
    if found is None:
        pytest.fail("paymentsctl is not installed: pip install -e .")
    return found


def run(url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [_paymentsctl(), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def ok(url: str, *args: str) -> str:
    result = run(url, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def ok_json(url: str, *args: str) -> Any:
    out = ok(url, *args)
    assert out.count("\n") == 1, "one JSON document on one line"
    return json.loads(out)


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert result.stderr.endswith("\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("paymentsctl: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def unreachable_url() -> str:
    # A port that was just free: nothing listens there, so the connection is refused at once.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"postgresql://127.0.0.1:{port}/payments"


# --- seeding the outbox -------------------------------------------------------------------------


@dataclass(frozen=True)
class Seeded:
    event: str
    subject: str
    sequence: int


class Outbox:
    """Writes outbox rows directly, committed, on its own connection."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        self._sequences: dict[str, int] = {}

    def close(self) -> None:
        self.conn.close()

    def consumer(self, name: str | None = None, kind: str = "webhook") -> str:
        name = name or new_id("we")
        self.conn.execute(
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types) "
            "VALUES (%s, %s, NULL, ARRAY['*'])",
            (name, kind),
        )
        return name

    def event(
        self, at: datetime = NOW, subject: str | None = None, type_: str = "payment.succeeded"
    ) -> Seeded:
        subject = subject or new_id("pay")
        sequence = self._sequences.get(subject, 0) + 1
        self._sequences[subject] = sequence
        event_id = new_id("evt")
        self.conn.execute(
            "INSERT INTO outbox.events (id, merchant_id, type, subject, sequence, time, data) "
            "VALUES (%s, NULL, %s, %s, %s, %s, '{}')",
            (event_id, type_, subject, sequence, at),
        )
        self.conn.execute(
            "INSERT INTO outbox.subjects (subject, last_sequence) VALUES (%s, %s) "
            "ON CONFLICT (subject) DO UPDATE SET last_sequence = excluded.last_sequence",
            (subject, sequence),
        )
        return Seeded(event_id, subject, sequence)

    def delivery(
        self,
        consumer: str,
        event: Seeded,
        status: str = "pending",
        *,
        created_at: datetime = NOW,
        delivered_at: datetime | None = None,
        dead_since: datetime | None = None,
        attempts: int = 0,
        last_status_code: int | None = None,
        last_error: str | None = None,
        leased: bool = False,
        next_attempt_at: datetime = NOW,
    ) -> None:
        self.conn.execute(
            "INSERT INTO outbox.deliveries (consumer, event_id, subject, sequence, status, "
            "attempts, next_attempt_at, lease_token, leased_by, last_status_code, last_error, "
            "delivered_at, dead_since, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (
                consumer,
                event.event,
                event.subject,
                event.sequence,
                status,
                attempts,
                next_attempt_at,
                uuid.uuid4() if leased else None,
                "host:1" if leased else None,
                last_status_code,
                last_error,
                delivered_at,
                dead_since,
                created_at,
            ),
        )

    def dead(
        self,
        consumer: str,
        event: Seeded,
        dead_since: datetime,
        status_code: int | None = 500,
        error: str | None = "HTTP 500",
    ) -> None:
        self.delivery(
            consumer,
            event,
            "dead",
            dead_since=dead_since,
            attempts=10,
            last_status_code=status_code,
            last_error=error,
            next_attempt_at=dead_since,
        )

    def attempt(self, consumer: str, event: Seeded, at: datetime, status_code: int = 500) -> None:
        self.conn.execute(
            "INSERT INTO outbox.attempts (consumer, event_id, attempted_at, status_code, "
            "latency_ms, error) VALUES (%s, %s, %s, %s, 12, NULL)",
            (consumer, event.event, at, status_code),
        )

    def delivery_row(self, consumer: str, event: Seeded) -> dict[str, Any] | None:
        cur = self.conn.execute(
            "SELECT status, attempts, next_attempt_at, lease_token, leased_by, dead_since, "
            "last_status_code, last_error, now() AS db_now FROM outbox.deliveries "
            "WHERE consumer = %s AND event_id = %s",
            (consumer, event.event),
        )
        row = cur.fetchone()
        if row is None:
            return None
        assert cur.description is not None
        return dict(zip([c.name for c in cur.description], row, strict=True))

    def count(self, query: str, *params: object) -> int:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return int(row[0])

    def event_exists(self, event: Seeded) -> bool:
        return self.count("SELECT count(*) FROM outbox.events WHERE id = %s", event.event) == 1

    def attempts_of(self, consumer: str, event: Seeded) -> int:
        return self.count(
            "SELECT count(*) FROM outbox.attempts WHERE consumer = %s AND event_id = %s",
            consumer,
            event.event,
        )


@pytest.fixture
def outbox(db_url: str) -> Iterator[Outbox]:
    seeded = Outbox(db_url)
    yield seeded
    seeded.close()


# --- help and usage -----------------------------------------------------------------------------

COMMANDS = [
    [],
    ["migrate"],
    ["merchant"],
    ["merchant", "create"],
    ["key"],
    ["key", "create"],
    ["key", "revoke"],
    ["outbox"],
    ["outbox", "status"],
    ["outbox", "dead"],
    ["outbox", "redrive"],
    ["outbox", "purge"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "paymentsctl")
def test_every_command_has_help(command: list[str]) -> None:
    result = run(unreachable_url(), *command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: paymentsctl")
    assert result.stderr == ""


def test_version() -> None:
    result = run(unreachable_url(), "--version")
    assert result.returncode == 0
    assert result.stdout.startswith("paymentsctl ")


USAGE_ERRORS = [
    [],
    ["bogus"],
    ["--bogus"],
    ["migrate", "extra"],
    ["merchant"],
    ["merchant", "create"],
    ["merchant", "create", "  "],
    ["merchant", "create", "a", "b"],
    ["key"],
    ["key", "create"],
    ["key", "revoke"],
    ["outbox"],
    ["outbox", "bogus"],
    ["outbox", "status", "--jsn"],
    ["outbox", "dead", "--consumer"],
    ["outbox", "dead", "--limit", "many"],
    ["outbox", "dead", "--limit", "0"],
    ["outbox", "redrive"],
    ["outbox", "redrive", "--since", "2026-01-01T00:00:00Z"],
    ["outbox", "redrive", "--consumer", "x", "--since", "yesterday"],
    ["outbox", "redrive", "--consumer", "x", "--since", "2026-01-01T00:00:00"],
    ["outbox", "redrive", "--consumer", "x", "--batch-size", "0"],
    ["outbox", "purge"],
    ["outbox", "purge", "--older-than", "7"],
    ["outbox", "purge", "--older-than", "7x"],
    ["outbox", "purge", "--older-than", "-7d"],
    ["outbox", "purge", "--older-than", ""],
    ["outbox", "purge", "--older-than", "7d", "--batch-size", "-1"],
]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda a: " ".join(a) or "nothing")
def test_usage_errors_exit_2_with_one_line(args: list[str]) -> None:
    # The database is unreachable: usage is checked before anything connects.
    line = assert_one_line_error(run(unreachable_url(), *args), 2)
    assert "--help" in line


@pytest.mark.parametrize("value", ["-1h", "-7d", "-30m"])
def test_a_negative_duration_gets_a_readable_message(value: str) -> None:
    for args in (("--older-than", value), (f"--older-than={value}",)):
        line = assert_one_line_error(run(unreachable_url(), "outbox", "purge", *args), 2)
        assert f"'{value}' is negative" in line and "e.g. 7d" in line, line


def test_usage_error_names_the_problem() -> None:
    line = assert_one_line_error(run(unreachable_url(), "outbox", "redrive"), 2)
    assert line == (
        "paymentsctl: error: outbox redrive: the following arguments are required: --consumer "
        "(see 'paymentsctl outbox redrive --help')"
    )


# --- runtime failures ---------------------------------------------------------------------------

RUNTIME_COMMANDS = [
    ["migrate"],
    ["merchant", "create", "Acme"],
    ["key", "create", "mer_x"],
    ["key", "revoke", "key_x"],
    ["outbox", "status"],
    ["outbox", "status", "--json"],
    ["outbox", "dead"],
    ["outbox", "dead", "--json"],
    ["outbox", "redrive", "--consumer", "reports"],
    ["outbox", "purge", "--older-than", "7d"],
]


@pytest.mark.parametrize("args", RUNTIME_COMMANDS, ids=" ".join)
def test_unreachable_database_exits_1_with_one_line(args: list[str]) -> None:
    line = assert_one_line_error(run(unreachable_url(), *args), 1)
    assert "connect" in line


def test_a_database_that_does_not_exist(missing_db_url: str) -> None:
    line = assert_one_line_error(run(missing_db_url, "outbox", "status"), 1)
    assert "does not exist" in line


def test_a_database_without_schema_suggests_migrate(empty_db_url: str) -> None:
    line = assert_one_line_error(run(empty_db_url, "outbox", "dead"), 1)
    assert "outbox.dead_letters" in line
    assert "paymentsctl migrate" in line


def test_a_malformed_database_url() -> None:
    line = assert_one_line_error(run("not a url", "outbox", "status"), 1)
    assert "DATABASE_URL" in line


# --- migrate, merchants, keys -------------------------------------------------------------------


def test_migrate_creates_the_database_and_is_idempotent(missing_db_url: str) -> None:
    first = ok(missing_db_url, "migrate")
    second = ok(missing_db_url, "migrate")
    assert first == second
    assert "revision" in first
    with psycopg.connect(missing_db_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'outbox'"
        ).fetchone()
    assert tables is not None and tables[0] >= 6
    assert ok_json(missing_db_url, "outbox", "status", "--json")[0]["consumer"] == "reports"


def test_migrate_an_existing_empty_database(empty_db_url: str) -> None:
    ok(empty_db_url, "migrate")
    ok(empty_db_url, "outbox", "status")


def test_merchant_create_prints_one_object_with_id_and_key(db_url: str) -> None:
    created = ok_json(db_url, "merchant", "create", "Acme Ltd")
    assert set(created) == {"id", "api_key"}
    assert re.fullmatch(r"mer_[0-9a-z]{26}", created["id"])
    assert created["api_key"].startswith("sk_")
    with psycopg.connect(db_url) as conn:
        merchant = conn.execute("SELECT name FROM merchants WHERE id = %s", (created["id"],))
        assert merchant.fetchone() == ("Acme Ltd",)
        keys = conn.execute(
            "SELECT key_hash, revoked_at FROM api_keys WHERE merchant_id = %s", (created["id"],)
        ).fetchall()
    assert len(keys) == 1
    assert key_matches(keys[0][0], created["api_key"])
    assert keys[0][1] is None


def test_key_create_and_revoke(db_url: str) -> None:
    merchant = ok_json(db_url, "merchant", "create", "Acme")
    key = ok_json(db_url, "key", "create", merchant["id"])
    assert set(key) == {"id", "merchant_id", "api_key"}
    assert key["merchant_id"] == merchant["id"]
    assert key["id"].startswith("key_") and key["api_key"].startswith("sk_")
    assert key["api_key"] != merchant["api_key"]

    revoked = ok_json(db_url, "key", "revoke", key["id"])
    assert revoked["id"] == key["id"]
    assert revoked["merchant_id"] == merchant["id"]
    assert datetime.fromisoformat(revoked["revoked_at"]) <= datetime.now(UTC) + timedelta(1)
    # Revoking again is harmless and reports the original revocation.
    assert ok_json(db_url, "key", "revoke", key["id"]) == revoked

    with psycopg.connect(db_url) as conn:
        rows: dict[str, bool] = dict(
            conn.execute(
                "SELECT id, revoked_at IS NOT NULL FROM api_keys WHERE merchant_id = %s",
                (merchant["id"],),
            ).fetchall()
        )
    assert rows[key["id"]] is True
    assert list(rows.values()).count(False) == 1, "the first key still works"


def test_key_errors(db_url: str) -> None:
    line = assert_one_line_error(run(db_url, "key", "create", "mer_nobody"), 1)
    assert "mer_nobody" in line
    line = assert_one_line_error(run(db_url, "key", "revoke", "key_nothing"), 1)
    assert "key_nothing" in line


# --- outbox status ------------------------------------------------------------------------------


def test_outbox_status(db_url: str, outbox: Outbox) -> None:
    busy = outbox.consumer("we_busy")
    outbox.consumer("we_idle")
    old, new, flying, dead, fresh, stale = (outbox.event() for _ in range(6))
    outbox.delivery(busy, old, created_at=NOW - timedelta(minutes=10))
    outbox.delivery(busy, new)
    outbox.delivery(busy, flying, leased=True)
    outbox.dead(busy, dead, NOW - timedelta(hours=1))
    outbox.delivery(busy, fresh, "delivered", delivered_at=datetime.now(UTC))
    outbox.delivery(busy, stale, "delivered", delivered_at=NOW - DAY)

    rows = {r["consumer"]: r for r in ok_json(db_url, "outbox", "status", "--json")}
    assert set(rows) == {"reports", "we_busy", "we_idle"}
    b = rows["we_busy"]
    assert (b["pending"], b["in_flight"], b["dead"], b["delivered_5m"]) == (2, 1, 1, 1)
    assert b["kind"] == "webhook" and b["enabled"] is True
    assert 600 <= b["oldest_pending_age"] < 3600
    idle = rows["we_idle"]
    assert (idle["pending"], idle["in_flight"], idle["dead"], idle["delivered_5m"]) == (0, 0, 0, 0)
    assert idle["oldest_pending_age"] is None

    table = ok(db_url, "outbox", "status").splitlines()
    assert table[0].split() == [
        "CONSUMER", "KIND", "ENABLED", "PENDING", "IN", "FLIGHT", "DEAD", "DELIVERED", "5M",
        "OLDEST", "PENDING",
    ]  # fmt: skip
    busy_line = next(line for line in table if line.startswith("we_busy"))
    assert busy_line.split()[1:7] == ["webhook", "yes", "2", "1", "1", "1"]
    assert re.fullmatch(r"1\dm\d\ds", busy_line.split()[7])
    assert next(line for line in table if line.startswith("we_idle")).split()[-1] == "-"


# --- outbox dead --------------------------------------------------------------------------------

DEAD_KEYS = {
    "consumer",
    "event",
    "type",
    "attempts",
    "last_status_code",
    "last_error",
    "dead_since",
}


def test_outbox_dead(db_url: str, outbox: Outbox) -> None:
    a, b = outbox.consumer("we_a"), outbox.consumer("we_b")
    e1, e2, e3, e4 = (outbox.event() for _ in range(4))
    outbox.dead(a, e1, NOW - timedelta(hours=3), 500, "HTTP 500 Internal Server Error")
    outbox.dead(a, e2, NOW - timedelta(hours=1), None, "connect timeout\nafter 15 s")
    outbox.dead(b, e3, NOW - timedelta(hours=2), 404, None)
    outbox.delivery(a, e4)

    listed = ok_json(db_url, "outbox", "dead", "--json")
    assert [d["event"] for d in listed] == [e2.event, e3.event, e1.event], "newest first"
    assert all(set(d) == DEAD_KEYS for d in listed)
    first = listed[0]
    assert first["consumer"] == a
    assert first["type"] == "payment.succeeded"
    assert first["attempts"] == 10
    assert first["last_status_code"] is None
    assert first["last_error"] == "connect timeout\nafter 15 s"
    assert first["dead_since"].endswith("Z")
    dead_since = datetime.fromisoformat(first["dead_since"])
    assert abs(dead_since - (NOW - timedelta(hours=1))) < timedelta(seconds=1)

    only_b = ok_json(db_url, "outbox", "dead", "--consumer", b, "--json")
    assert [(d["event"], d["last_status_code"], d["last_error"]) for d in only_b] == [
        (e3.event, 404, None)
    ]
    assert [d["event"] for d in ok_json(db_url, "outbox", "dead", "--limit", "1", "--json")] == [
        e2.event
    ]
    assert ok_json(db_url, "outbox", "dead", "--consumer", "reports", "--json") == []

    table = ok(db_url, "outbox", "dead").splitlines()
    assert table[0].split()[:3] == ["DEAD", "SINCE", "CONSUMER"]
    assert len(table) == 4
    assert e2.event in table[1] and "connect timeout after 15 s" in table[1]
    assert "HTTP 500 Internal Server Error" in table[3]
    assert "no dead deliveries" in ok(db_url, "outbox", "dead", "--consumer", "reports")


def test_outbox_dead_clips_long_errors_in_the_table(db_url: str, outbox: Outbox) -> None:
    a = outbox.consumer()
    e = outbox.event()
    outbox.dead(a, e, NOW, 502, "x" * 500)
    line = ok(db_url, "outbox", "dead").splitlines()[1]
    assert len(line) < 250
    assert ok_json(db_url, "outbox", "dead", "--json")[0]["last_error"] == "x" * 500


# --- outbox redrive -----------------------------------------------------------------------------


def test_outbox_redrive_one_consumer_since(db_url: str, outbox: Outbox) -> None:
    a, b = outbox.consumer("we_a"), outbox.consumer("we_b")
    before = NOW - timedelta(hours=5)
    since = NOW - timedelta(hours=2)
    e_old, e_new1, e_new2, e_other, e_pending = (outbox.event() for _ in range(5))
    outbox.dead(a, e_old, before)
    outbox.dead(a, e_new1, since)  # exactly at --since: included
    outbox.dead(a, e_new2, NOW - timedelta(minutes=1))
    outbox.dead(b, e_other, NOW - timedelta(minutes=1))
    outbox.delivery(a, e_pending, attempts=3, next_attempt_at=NOW + DAY)

    out = ok(db_url, "outbox", "redrive", "--consumer", a, "--since", since.isoformat())
    assert out == (f"2 dead deliveries of {a} back to pending; 0 subjects will receive an event "
                   "after a later one (out of order)\n")

    for event in (e_new1, e_new2):
        row = outbox.delivery_row(a, event)
        assert row is not None
        assert row["status"] == "pending"
        assert row["attempts"] == 0
        assert row["dead_since"] is None
        assert row["lease_token"] is None and row["leased_by"] is None
        assert row["next_attempt_at"] <= row["db_now"]
        assert row["last_status_code"] == 500, "why it died stays visible"
    untouched_old = outbox.delivery_row(a, e_old)
    assert untouched_old is not None and untouched_old["status"] == "dead"
    untouched_other = outbox.delivery_row(b, e_other)
    assert untouched_other is not None and untouched_other["status"] == "dead"
    pending = outbox.delivery_row(a, e_pending)
    assert pending is not None and pending["attempts"] == 3
    assert pending["next_attempt_at"] > pending["db_now"]

    # Everything else of that consumer, in small batches.
    assert ok_json(db_url, "outbox", "redrive", "--consumer", a, "--batch-size", "1", "--json") == {
        "consumer": a,
        "redriven": 1,
        "out_of_order_subjects": 0,
    }
    assert ok_json(db_url, "outbox", "dead", "--consumer", a, "--json") == []
    assert ok(db_url, "outbox", "redrive", "--consumer", a) == (
        f"0 dead deliveries of {a} back to pending; 0 subjects will receive an event after a "
        "later one (out of order)\n"
    )


def test_outbox_redrive_many_in_batches(db_url: str, outbox: Outbox) -> None:
    a = outbox.consumer()
    for _ in range(7):
        outbox.dead(a, outbox.event(), NOW - timedelta(minutes=5))
    result = ok_json(db_url, "outbox", "redrive", "--consumer", a, "--batch-size", "3", "--json")
    assert result["redriven"] == 7
    assert outbox.count("SELECT count(*) FROM outbox.deliveries WHERE status = 'dead'") == 0


def test_outbox_redrive_accepts_an_offset(db_url: str, outbox: Outbox) -> None:
    a = outbox.consumer()
    outbox.dead(a, outbox.event(), datetime(2026, 1, 1, 11, 30, tzinfo=UTC))
    # 12:00+01:00 is 11:00Z: the delivery, dead at 11:30Z, is after it.
    got = ok_json(
        db_url, "outbox", "redrive", "--consumer", a, "--since", "2026-01-01T12:00:00+01:00",
        "--json",
    )  # fmt: skip
    assert got["redriven"] == 1


def test_outbox_redrive_counts_the_subjects_that_will_see_an_event_out_of_order(
    db_url: str, outbox: Outbox
) -> None:
    """A redriven event arrives after the later events of its subject that were delivered (or
    are in flight) meanwhile. Counted per subject, once, across batches."""
    a = outbox.consumer()
    late = outbox.event()  # dead, a later one delivered: out of order
    outbox.dead(a, late, NOW)
    outbox.delivery(a, outbox.event(subject=late.subject), "delivered", delivered_at=NOW)
    twice = outbox.event()  # two dead around a delivered one: one subject
    outbox.dead(a, twice, NOW)
    outbox.delivery(a, outbox.event(subject=twice.subject), "delivered", delivered_at=NOW)
    outbox.dead(a, outbox.event(subject=twice.subject), NOW)
    flight = outbox.event()  # a later one in flight: out of order too
    outbox.dead(a, flight, NOW)
    outbox.delivery(a, outbox.event(subject=flight.subject), leased=True,
                    next_attempt_at=NOW + DAY)
    last = outbox.event()  # the latest of its subject: in order
    outbox.delivery(a, last, "delivered", delivered_at=NOW)
    outbox.dead(a, outbox.event(subject=last.subject), NOW)
    waiting = outbox.event()  # later ones not sent yet: they wait for it, in order
    outbox.dead(a, waiting, NOW)
    outbox.delivery(a, outbox.event(subject=waiting.subject), attempts=2)

    assert ok_json(db_url, "outbox", "redrive", "--consumer", a, "--batch-size", "1",
                   "--json") == {"consumer": a, "redriven": 6, "out_of_order_subjects": 3}


def test_outbox_redrive_of_a_disabled_consumer_stays_parked(db_url: str, outbox: Outbox) -> None:
    a = outbox.consumer()
    event = outbox.event()
    outbox.dead(a, event, NOW)
    outbox.conn.execute("UPDATE outbox.consumers SET enabled = false WHERE name = %s", (a,))
    assert ok_json(db_url, "outbox", "redrive", "--consumer", a, "--json")["redriven"] == 1
    parked = outbox.conn.execute(
        "SELECT status, isfinite(next_attempt_at) FROM outbox.deliveries WHERE event_id = %s",
        (event.event,),
    ).fetchone()
    assert parked == ("pending", False), "parked until the consumer is enabled, not due"


def test_outbox_redrive_unknown_consumer(db_url: str) -> None:
    line = assert_one_line_error(run(db_url, "outbox", "redrive", "--consumer", "we_ghost"), 1)
    assert "we_ghost" in line


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
def test_outbox_dead_of_an_unknown_consumer_is_the_same_error_as_redrive(
    db_url: str, json_flag: tuple[str, ...]
) -> None:
    """A mistyped name must not read as "nothing is dead": the error and exit status of
    redrive (docs/operations.md)."""
    dead = assert_one_line_error(run(db_url, "outbox", "dead", "--consumer", "we_ghost",
                                     *json_flag), 1)
    redrive = assert_one_line_error(run(db_url, "outbox", "redrive", "--consumer", "we_ghost"), 1)
    assert dead == redrive == "paymentsctl: error: no consumer named 'we_ghost'"


# --- outbox purge -------------------------------------------------------------------------------


@dataclass
class PurgeWorld:
    a: str
    b: str
    gone_event: Seeded  # old, delivered long ago to a: delivery, attempts and event go
    shared_event: Seeded  # old, delivered long ago to a, still pending for b
    dead_event: Seeded  # old, dead for a
    late_event: Seeded  # old, but delivered to a only an hour ago
    young_event: Seeded  # an hour old, delivered
    lonely_event: Seeded  # old, no delivery at all
    flying_event: Seeded  # old, pending and leased right now


def build_purge_world(outbox: Outbox) -> PurgeWorld:
    a, b = outbox.consumer("we_a"), outbox.consumer("we_b")
    old, long_ago, recently = NOW - 10 * DAY, NOW - 9 * DAY, NOW - timedelta(hours=1)
    w = PurgeWorld(
        a,
        b,
        gone_event=outbox.event(at=old),
        shared_event=outbox.event(at=old),
        dead_event=outbox.event(at=old),
        late_event=outbox.event(at=old),
        young_event=outbox.event(at=recently),
        lonely_event=outbox.event(at=old),
        flying_event=outbox.event(at=old),
    )
    outbox.delivery(a, w.gone_event, "delivered", delivered_at=long_ago, created_at=old)
    outbox.attempt(a, w.gone_event, old, 500)
    outbox.attempt(a, w.gone_event, long_ago, 200)
    outbox.delivery(a, w.shared_event, "delivered", delivered_at=long_ago, created_at=old)
    outbox.attempt(a, w.shared_event, long_ago, 200)
    outbox.delivery(b, w.shared_event, attempts=4, created_at=old)
    outbox.attempt(b, w.shared_event, old, 503)
    outbox.dead(a, w.dead_event, long_ago)
    outbox.attempt(a, w.dead_event, old, 500)
    outbox.delivery(a, w.late_event, "delivered", delivered_at=recently, created_at=old)
    outbox.delivery(a, w.young_event, "delivered", delivered_at=recently, created_at=recently)
    outbox.delivery(a, w.flying_event, leased=True, created_at=old, attempts=2)
    outbox.attempt(a, w.flying_event, old, 500)
    return w


def assert_purged(outbox: Outbox, w: PurgeWorld) -> None:
    assert outbox.delivery_row(w.a, w.gone_event) is None
    assert not outbox.event_exists(w.gone_event)
    assert outbox.attempts_of(w.a, w.gone_event) == 0

    assert outbox.delivery_row(w.a, w.shared_event) is None
    assert outbox.attempts_of(w.a, w.shared_event) == 0
    row = outbox.delivery_row(w.b, w.shared_event)
    assert row is not None and row["status"] == "pending" and row["attempts"] == 4
    assert outbox.attempts_of(w.b, w.shared_event) == 1
    assert outbox.event_exists(w.shared_event)

    dead = outbox.delivery_row(w.a, w.dead_event)
    assert dead is not None and dead["status"] == "dead"
    assert outbox.attempts_of(w.a, w.dead_event) == 1
    assert outbox.event_exists(w.dead_event)

    for kept in (w.late_event, w.young_event):
        delivered = outbox.delivery_row(w.a, kept)
        assert delivered is not None and delivered["status"] == "delivered"
        assert outbox.event_exists(kept)

    assert not outbox.event_exists(w.lonely_event)

    flying = outbox.delivery_row(w.a, w.flying_event)
    assert flying is not None and flying["lease_token"] is not None
    assert outbox.attempts_of(w.a, w.flying_event) == 1
    assert outbox.event_exists(w.flying_event)

    # Subjects keep their counters, so the next event of a purged subject is not sequence 1.
    assert outbox.count("SELECT count(*) FROM outbox.subjects") == 7


def test_outbox_purge(db_url: str, outbox: Outbox) -> None:
    w = build_purge_world(outbox)
    got = ok_json(db_url, "outbox", "purge", "--older-than", "7d", "--batch-size", "1", "--json")
    assert got == {"deliveries": 2, "events": 2, "attempts": 3}
    assert_purged(outbox, w)
    assert ok(db_url, "outbox", "purge", "--older-than", "7d") == (
        "0 deliveries, 0 events, 0 attempts purged\n"
    )


def test_outbox_purge_human_output(db_url: str, outbox: Outbox) -> None:
    w = build_purge_world(outbox)
    assert ok(db_url, "outbox", "purge", "--older-than", "168h") == (
        "2 deliveries, 2 events, 3 attempts purged\n"
    )
    assert_purged(outbox, w)


def test_outbox_purge_with_a_short_duration_still_spares_undelivered_work(
    db_url: str, outbox: Outbox
) -> None:
    w = build_purge_world(outbox)
    got = ok_json(db_url, "outbox", "purge", "--older-than", "0s", "--json")
    # Now everything delivered goes, including the recent ones and their events.
    assert got["deliveries"] == 4
    assert not outbox.event_exists(w.late_event) and not outbox.event_exists(w.young_event)
    assert outbox.delivery_row(w.b, w.shared_event) is not None
    assert outbox.delivery_row(w.a, w.dead_event) is not None
    assert outbox.delivery_row(w.a, w.flying_event) is not None
    assert outbox.event_exists(w.shared_event)
    assert outbox.event_exists(w.dead_event)
    assert outbox.event_exists(w.flying_event)
    assert outbox.count("SELECT count(*) FROM outbox.deliveries WHERE status <> 'delivered'") == 3


def test_orphaned_attempts_are_purged(db_url: str, outbox: Outbox) -> None:
    a = outbox.consumer()
    event = outbox.event()
    outbox.attempt(a, event, NOW - 10 * DAY)  # its delivery vanished some other way
    outbox.attempt(a, event, NOW)  # too young
    outbox.delivery(a, event, "dead", dead_since=NOW)
    outbox.attempt(a, event, NOW - 10 * DAY)
    got = ok_json(db_url, "outbox", "purge", "--older-than", "7d", "--json")
    # The delivery exists, so none of its attempts is an orphan.
    assert got == {"deliveries": 0, "events": 0, "attempts": 0}
    outbox.conn.execute("DELETE FROM outbox.deliveries")
    got = ok_json(db_url, "outbox", "purge", "--older-than", "7d", "--json")
    assert got == {"deliveries": 0, "events": 0, "attempts": 2}
    assert outbox.attempts_of(a, event) == 1


# --- progress -----------------------------------------------------------------------------------


def run_with_tty_stderr(url: str, *args: str) -> tuple[int, str, str]:
    master, replica = pty.openpty()
    try:
        proc = subprocess.Popen(
            [_paymentsctl(), *args],
            env={**os.environ, "DATABASE_URL": url},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=replica,
            text=True,
        )
        os.close(replica)
        chunks: list[bytes] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            chunks.append(data)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        os.close(master)
    return proc.returncode, stdout, b"".join(chunks).decode()


def test_progress_goes_to_stderr_only_on_a_terminal(db_url: str, outbox: Outbox) -> None:
    a = outbox.consumer()
    for _ in range(5):
        e = outbox.event(at=NOW - 10 * DAY)
        outbox.delivery(a, e, "delivered", delivered_at=NOW - 9 * DAY)
    for _ in range(3):
        outbox.dead(a, outbox.event(), NOW)

    code, stdout, stderr = run_with_tty_stderr(
        db_url, "outbox", "purge", "--older-than", "7d", "--batch-size", "2"
    )
    assert code == 0
    assert stdout == "5 deliveries, 5 events, 0 attempts purged\n"
    assert "purging: 2 deliveries" in stderr and "purging: 5 deliveries" in stderr

    code, stdout, stderr = run_with_tty_stderr(
        db_url, "outbox", "redrive", "--consumer", a, "--batch-size", "2"
    )
    assert code == 0
    assert stdout.startswith("3 dead deliveries")
    assert "3 redriven" in stderr

    # Not a terminal: stderr stays empty (checked by ok()).
    for _ in range(3):
        outbox.dead(a, outbox.event(), NOW)
    ok(db_url, "outbox", "redrive", "--consumer", a, "--batch-size", "1")


# --- the retention API the relay calls ----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", timedelta(days=7)),
        ("12h", timedelta(hours=12)),
        ("30m", timedelta(minutes=30)),
        ("45s", timedelta(seconds=45)),
        ("2w", timedelta(weeks=2)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("0s", timedelta(0)),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-7d", "7d-", "1.5h", "7 d", "P7D"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_purge_takes_a_url_or_an_idle_connection(db_url: str, outbox: Outbox) -> None:
    w = build_purge_world(outbox)
    seen: list[PurgeCounts] = []
    counts = purge(db_url, timedelta(days=7), batch_size=1, progress=lambda c: seen.append(c))
    assert (counts.deliveries, counts.events, counts.attempts) == (2, 2, 3)
    assert counts.total == 7
    assert len(seen) >= 4
    assert_purged(outbox, w)

    with psycopg.connect(db_url) as conn:
        assert purge(conn, timedelta(days=7)).total == 0
        conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="outside any transaction"):
            purge(conn, timedelta(days=7))
    with pytest.raises(ValueError):
        purge(db_url, timedelta(days=7), batch_size=0)
    with pytest.raises(ValueError):
        purge(db_url, timedelta(days=-1))


def test_purge_keeps_the_callers_application_name(db_url: str, outbox: Outbox) -> None:
    """The relay passes a conninfo naming itself; pg_stat_activity must show the relay."""
    seen: list[str] = []

    def record(_: PurgeCounts) -> None:
        with psycopg.connect(db_url) as conn:
            row = conn.execute(
                "SELECT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'outbox-%'"
            ).fetchone()
            seen.append(row[0] if row else "")

    for url in (make_conninfo(db_url, application_name="outbox-relay"), db_url):
        outbox.delivery(outbox.consumer(), outbox.event(), "delivered", delivered_at=NOW - DAY)
        assert purge(url, timedelta(hours=1), progress=record).deliveries == 1
    assert seen == ["outbox-relay", "outbox-purge"]
