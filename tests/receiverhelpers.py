"""Helpers for the receiver library's tests: signed webhook requests as our relay sends them, a
handler that records its effects in a table, and receivers run as their own processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import AsyncConnection

from outbox.signing import secret_key, sign_all
from receiver.event import ReceivedEvent

ROOT = Path(__file__).resolve().parent.parent

EFFECTS_TABLE = """
CREATE TABLE effects (
    position bigserial PRIMARY KEY,
    event_id text NOT NULL,
    subject  text NOT NULL,
    sequence bigint NOT NULL,
    late     boolean NOT NULL DEFAULT false
)
"""


def create_effects_table(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(EFFECTS_TABLE)


async def record_effect(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
    """A handler: one row in `effects` per application (no unique key, so a second effect of
    one event would show)."""
    await conn.execute(
        "INSERT INTO effects (event_id, subject, sequence) VALUES (%s, %s, %s)",
        (event.id, event.subject, event.sequence),
    )


async def record_late(conn: AsyncConnection[Any], event: ReceivedEvent) -> None:
    await conn.execute(
        "INSERT INTO effects (event_id, subject, sequence, late) VALUES (%s, %s, %s, true)",
        (event.id, event.subject, event.sequence),
    )


def effects(url: str) -> list[tuple[str, str, int, bool]]:
    """(event id, subject, sequence, late) in the order they were applied."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT event_id, subject, sequence, late FROM effects ORDER BY position"
        ).fetchall()
    return [tuple(row) for row in rows]  # type: ignore[misc]


def envelope(
    event_id: str, subject: str, sequence: int | str, type_: str = "thing.happened"
) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": "payments",
        "type": type_,
        "subject": subject,
        "sequence": sequence,
        "time": "2026-11-27T01:02:03.456789Z",
        "datacontenttype": "application/json",
        "data": {"n": sequence},
    }


def signed(
    event: Mapping[str, Any] | bytes,
    secrets: Sequence[str],
    *,
    timestamp: int | None = None,
    webhook_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers our relay sends for `event`, signed with each of `secrets`."""
    body = event if isinstance(event, bytes) else json.dumps(event).encode()
    msg_id = webhook_id or (json.loads(body)["id"])
    ts = int(time.time()) if timestamp is None else timestamp
    headers = {
        "Content-Type": "application/cloudevents+json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign_all([secret_key(s) for s in secrets], msg_id, ts, body),
    }
    return body, headers


def scalar(url: str, query: str, params: Any = None) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


class ReceiverProcess:
    """A receiver in its own process (`python -m <module> <args>`), serving `GET /healthz` on
    127.0.0.1:`port`; its output goes to `log_path`. Restarts keep the port."""

    def __init__(
        self, module: str, port: int, env: Mapping[str, str], args: Sequence[str], log_path: Path
    ) -> None:
        self.module = module
        self.port = port
        self.env = {**os.environ, **env}
        self.args = list(args)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ReceiverProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "--port", str(self.port), *self.args],
                cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ready(self, timeout: float = 60.0) -> ReceiverProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the receiver exited ({self.proc.returncode}):\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"the receiver was not ready within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        """SIGKILL, as a crash: no handler finishes, no transaction commits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.kills += 1

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""
