"""`python -m receiver` (migrate, purge) and `python -m receiver.example` as real processes:
exit codes, one-line errors, idempotent migrations, and a purge that keeps duplicates
recognisable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox.signing import new_secret
from receiver import Inbox
from receiver import __main__ as receiver_cli
from tests.receiverhelpers import (
    ReceiverProcess,
    create_effects_table,
    effects,
    envelope,
    record_effect,
    signed,
)
from tests.support import free_port, with_database

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_migrate_creates_the_tables_once_with_comments(empty_db_url: str) -> None:
    first = run("receiver", "--database-url", empty_db_url, "migrate")
    assert (first.returncode, first.stdout, first.stderr) == (0, "applied 0001_inbox.sql\n", "")
    again = run("receiver", "migrate", env={"RECEIVER_DATABASE_URL": empty_db_url})
    assert (again.returncode, again.stdout) == (0, "up to date\n")
    with psycopg.connect(empty_db_url) as conn:
        tables = conn.execute(
            "SELECT c.relname, obj_description(c.oid) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = 'receiver' AND c.relkind = 'r' ORDER BY 1"
        ).fetchall()
        uncommented = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'receiver' AND table_name <> 'migrations'"
            " AND col_description((table_schema || '.' || table_name)::regclass,"
            "                     ordinal_position) IS NULL"
        ).fetchall()
    assert [t[0] for t in tables] == ["inbox", "migrations", "skipped", "subjects"]
    assert all(t[1] for t in tables), tables
    assert uncommented == []


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate",), ("purge",), ("purge", "--older-than", "soon"),
     ("purge", "--older-than", "0"), ("purge", "--older-than", "nan"), ("migrate", "--what")],
)
def test_bad_usage_exits_2_with_one_line(
    args: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        receiver_cli.main(args)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("python -m receiver: error: ")
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_bad_usage_of_the_real_command_exits_2() -> None:
    result = run("receiver", "purge", "--older-than", "soon")
    assert result.returncode == 2, result
    assert result.stderr.startswith("python -m receiver: error: ")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_unreachable_database_exits_1_with_one_line(empty_db_url: str) -> None:
    missing = with_database(empty_db_url, "receiver_no_such_database")
    for command in ("migrate", "purge --older-than 1"):
        result = run("receiver", "--database-url", missing, *command.split())
        assert result.returncode == 1, result
        assert result.stderr.startswith("python -m receiver: error: ")
        assert "receiver_no_such_database" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


async def test_purge_deletes_old_applied_rows_and_duplicates_are_still_recognised(
    empty_db_url: str,
) -> None:
    assert run("receiver", "--database-url", empty_db_url, "migrate").returncode == 0
    create_effects_table(empty_db_url)
    secret = new_secret()
    async with AsyncConnectionPool(empty_db_url, min_size=1, open=False) as pool:
        inbox = Inbox(pool, [secret], record_effect)
        for n in (1, 2):
            assert await inbox.receive(*signed(envelope(f"evt_{n}", "s", n), [secret])) \
                == "applied"
        assert await inbox.receive(*signed(envelope("evt_4", "s", 4), [secret])) == "held"
        kept = run("receiver", "--database-url", empty_db_url, "purge", "--older-than", "1")
        assert (kept.returncode, kept.stdout) == (0, "purged 0\n")
        with psycopg.connect(empty_db_url, autocommit=True) as conn:
            conn.execute("UPDATE receiver.inbox SET applied_at = now() - interval '2 days'"
                         " WHERE webhook_id = 'evt_1'")
        purged = run("receiver", "--database-url", empty_db_url, "purge", "--older-than", "1")
        assert (purged.returncode, purged.stdout) == (0, "purged 1\n")
        # evt_1's row is gone, yet its redelivery is known for what it is
        assert await inbox.receive(*signed(envelope("evt_1", "s", 1), [secret])) == "duplicate"
        with psycopg.connect(empty_db_url) as conn:
            left = conn.execute("SELECT webhook_id, status FROM receiver.inbox ORDER BY 1")
            assert left.fetchall() == [("evt_2", "applied"), ("evt_4", "held")]
    assert [e[0] for e in effects(empty_db_url)] == ["evt_1", "evt_2"]


def test_the_example_refuses_bad_configuration_with_exit_2(empty_db_url: str) -> None:
    base = {"RECEIVER_DATABASE_URL": empty_db_url}
    cases: list[dict[str, Any]] = [
        {},
        {"RECEIVER_WEBHOOK_SECRETS": "not-a-secret"},
        {"RECEIVER_WEBHOOK_SECRETS": new_secret(), "RECEIVER_EVENTS_URL": "ftp://x"},
        {"RECEIVER_WEBHOOK_SECRETS": new_secret(), "RECEIVER_EVENTS_URL": "http://x"},
    ]
    for extra in cases:
        env = {**base, "RECEIVER_WEBHOOK_SECRETS": "", "RECEIVER_EVENTS_URL": "",
               "RECEIVER_API_KEY": "", **extra}
        result = run("receiver.example", env=env)
        assert result.returncode == 2, (extra, result)
        assert result.stderr.startswith("python -m receiver.example: error: "), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_example_receiver_applies_events_and_checks_the_balance_chain(
    empty_db_url: str, tmp_path: Path
) -> None:
    secret = new_secret()
    example = ReceiverProcess(
        "receiver.example", free_port(),
        {"RECEIVER_DATABASE_URL": empty_db_url, "RECEIVER_WEBHOOK_SECRETS": secret,
         "RECEIVER_EVENTS_URL": "", "RECEIVER_API_KEY": ""},
        ["--path", "/hooks"], tmp_path / "example.log",
    )
    try:
        example.start().wait_ready()

        def post(event: dict[str, Any]) -> httpx.Response:
            body, headers = signed(event, [secret])
            return httpx.post(f"{example.url}/hooks", content=body, headers=headers, timeout=10)

        def change(n: int, delta: int, balance: int) -> dict[str, Any]:
            return envelope(f"evt_{n}", "acct_1", n, "account.balance_changed") | {
                "data": {"account": "acct_1", "currency": "USD", "delta": delta,
                         "balance": balance, "cause": {"object": "deposit", "id": "dep_1"}}}

        opened = envelope("evt_1", "acct_1", 1, "account.created") | {
            "data": {"id": "acct_1", "object": "account", "currency": "USD", "balance": 0}}
        assert post(opened).json() == {"outcome": "applied"}
        assert post(change(2, 100, 100)).json() == {"outcome": "applied"}
        assert post(change(3, 50, 999)).status_code == 500  # 100 + 50 is not 999: refused
        assert post(change(4, 25, 175)).json() == {"outcome": "held"}
        assert post(change(3, 50, 150)).json() == {"outcome": "applied"}
        deadline = time.monotonic() + 30
        while True:  # the held event is applied in the background
            with psycopg.connect(empty_db_url) as conn:
                row = conn.execute("SELECT balance, sequence FROM receiver_example.balances"
                                   " WHERE account = 'acct_1'").fetchone()
            if row == (175, 4) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert row == (175, 4)
        assert example.stop() in (0, -signal.SIGTERM)
    finally:
        example.close()
