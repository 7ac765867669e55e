"""Helpers for the relay tests: endpoints, money traffic, relay subprocesses, and the checks every
delivery test makes (signatures, completeness, order per subject)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg_pool import AsyncConnectionPool

from ledger import service
from ledger.ids import new_id
from ledger.merchants import create_merchant
from outbox.signing import new_secret
from tests.support.receiver import Receipt, Receiver

ROOT = Path(__file__).resolve().parent.parent

FAST_ENV = {
    "OUTBOX_RETRY_SCHEDULE": "0,0.2,0.4",
    "OUTBOX_HTTP_TIMEOUT": "5",
    "OUTBOX_LEASE_SECONDS": "11",
    "OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
    "OUTBOX_PURGE_INTERVAL": "0",
}


# --- data ---------------------------------------------------------------------------------------


def new_merchant(db_url: str, name: str = "Relay test merchant") -> str:
    with psycopg.connect(db_url) as conn:
        return create_merchant(conn, name).merchant_id


@dataclass(frozen=True)
class Endpoint:
    id: str
    merchant_id: str
    path: str
    secret: str
    event_types: tuple[str, ...]


def add_endpoint(
    db_url: str,
    receiver: Receiver,
    merchant_id: str,
    event_types: Sequence[str] = ("*",),
    *,
    path: str | None = None,
    strict: bool = True,
) -> Endpoint:
    """An endpoint as the API creates it: the webhook_endpoints row and its consumer row."""
    endpoint_id = new_id("we")
    secret = new_secret()
    path = path or f"/{endpoint_id}"
    url = receiver.add_endpoint(path, secret, strict=strict)
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "INSERT INTO webhook_endpoints (id, merchant_id, url, event_types, secret)"
            " VALUES (%s, %s, %s, %s, %s)",
            (endpoint_id, merchant_id, url, list(event_types), secret),
        )
        conn.execute(
            "INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)"
            " VALUES (%s, 'webhook', %s, %s)",
            (endpoint_id, merchant_id, list(event_types)),
        )
    return Endpoint(endpoint_id, merchant_id, path, secret, tuple(event_types))


@dataclass
class Traffic:
    """What a traffic run committed."""

    payments: dict[str, int] = field(default_factory=dict)  # succeeded payment id -> amount
    merchants: set[str] = field(default_factory=set)


async def make_traffic(
    db_url: str,
    merchant_ids: Sequence[str],
    payments: int,
    *,
    clients: int = 4,
    currency: str = "USD",
    seed: int = 1,
) -> Traffic:
    """`payments` payments spread over `clients` concurrent clients, each with its own pair of
    accounts (funded by a deposit) in one of the merchants; one transaction per call."""
    traffic = Traffic(merchants=set(merchant_ids))
    rng = random.Random(seed)
    async with AsyncConnectionPool(db_url, min_size=1, max_size=clients, open=False) as pool:

        async def in_tx(fn, *args):  # type: ignore[no-untyped-def]
            for _ in range(20):
                try:
                    async with pool.connection() as conn, conn.transaction():
                        return await fn(conn, *args)
                except psycopg.OperationalError:
                    await asyncio.sleep(0.05)
            raise RuntimeError("could not commit")

        async def client(n: int) -> None:
            merchant = service.Merchant(merchant_ids[n % len(merchant_ids)])
            a = (await in_tx(service.create_account, merchant, currency, {}))["id"]
            b = (await in_tx(service.create_account, merchant, currency, {}))["id"]
            await in_tx(service.create_deposit, merchant, a, 10_000_000, currency)
            await in_tx(service.create_deposit, merchant, b, 10_000_000, currency)
            share = payments // clients + (1 if n < payments % clients else 0)
            for i in range(share):
                src, dst = (a, b) if i % 2 == 0 else (b, a)
                amount = rng.randint(1, 1000)
                result = await in_tx(service.create_payment, merchant, src, dst, amount, currency)
                if result.error is None:
                    traffic.payments[result.payment["id"]] = amount

        await asyncio.gather(*(client(n) for n in range(clients)))
    return traffic


def webhook_expectations(db_url: str) -> dict[str, set[str]]:
    """consumer -> ids of the events fanned out to it (what it must receive)."""
    out: dict[str, set[str]] = defaultdict(set)
    with psycopg.connect(db_url) as conn:
        for consumer, event_id in conn.execute(
            "SELECT d.consumer, d.event_id FROM outbox.deliveries d"
            " JOIN outbox.consumers c ON c.name = d.consumer WHERE c.kind = 'webhook'"
        ):
            out[consumer].add(event_id)
    return out


def delivery_counts(db_url: str, consumer: str | None = None) -> dict[str, int]:
    """Deliveries by status, of every consumer or of `consumer`."""
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT status, count(*) FROM outbox.deliveries"
            " WHERE %(consumer)s::text IS NULL OR consumer = %(consumer)s::text GROUP BY status",
            {"consumer": consumer},
        )
        return dict(rows.fetchall())


async def wait_until_delivered(
    db_url: str, within: float = 120.0, consumer: str | None = None
) -> None:
    """Until no delivery (of `consumer`, if given) is pending (generous: the machine may be
    loaded)."""
    deadline = time.monotonic() + within
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        counts = delivery_counts(db_url, consumer)
        if not counts.get("pending"):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"deliveries still pending after {within} s: {counts}")


# --- checks -------------------------------------------------------------------------------------


def check_complete_and_ordered(
    receiver: Receiver,
    endpoints: Iterable[Endpoint],
    expected: Mapping[str, set[str]],
    *,
    slow_ok: float = 0.0,
) -> int:
    """Every request verified; every expected event accepted at its endpoint and nothing else;
    per subject, first arrivals in sequence order; with '*' endpoints, no gap in any subject.
    Replies delayed by up to `slow_ok` seconds (below the sender's timeout) count as accepted.
    Returns the number of duplicate receipts (same endpoint and webhook-id again)."""
    duplicates = 0
    for endpoint in endpoints:
        receipts = receiver.receipts(endpoint.path)
        bad = [r for r in receipts if not r.verified]
        assert not bad, f"{len(bad)} requests failed verification: {bad[0].error}"
        accepted = {
            r.webhook_id
            for r in receipts
            if r.verified and 200 <= r.reply.status < 300 and not r.reply.reset
            and r.reply.delay <= slow_ok
        }
        want = expected.get(endpoint.id, set())
        assert accepted == want, (
            f"{endpoint.id}: {len(want - accepted)} missing, {len(accepted - want)} unexpected"
        )
        check_order(receipts, gapless=endpoint.event_types == ("*",))
        duplicates += sum(1 for r in receipts if r.attempt > 1)
    return duplicates


def check_order(receipts: Sequence[Receipt], *, gapless: bool) -> None:
    sequences: dict[str, list[int]] = defaultdict(list)
    for r in receipts:
        if r.attempt == 1:
            assert isinstance(r.body["sequence"], str) and len(r.body["sequence"]) == 19
            sequences[r.body["subject"]].append(int(r.body["sequence"]))
    for subject, seqs in sequences.items():
        assert seqs == sorted(seqs), f"{subject}: first arrivals out of order: {seqs}"
        if gapless:
            assert seqs == list(range(1, len(seqs) + 1)), f"{subject}: gap in {seqs}"


def check_same_bytes_on_redelivery(receipts: Sequence[Receipt]) -> None:
    first: dict[str | None, bytes] = {}
    for r in receipts:
        if r.webhook_id in first:
            assert r.raw == first[r.webhook_id], f"{r.webhook_id}: body changed on redelivery"
        else:
            first[r.webhook_id] = r.raw


# --- relay processes ----------------------------------------------------------------------------


class RelayProcess:
    """`outbox-relay` in a subprocess, with its own NOTIFY_SOCKET so the test sees READY=1.
    `command` replaces the default `python -m relay` (e.g. the installed `outbox-relay` script)."""

    def __init__(
        self,
        db_url: str,
        tmp: Path,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        name: str = "relay",
        command: Sequence[str] | None = None,
    ) -> None:
        self.db_url = db_url
        self.env = {**os.environ, **FAST_ENV, "DATABASE_URL": db_url, **(env or {})}
        self.args = list(args)
        self.command = list(command) if command else [sys.executable, "-m", "relay"]
        self.tmp = tmp
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.messages: list[str] = []
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.tmp / f"{self.name}.log"

    def start(self) -> RelayProcess:
        self.starts += 1
        sock_path = self.tmp / f"{self.name}-{self.starts}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        self.notify.setblocking(False)
        self.messages = []
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.command, *self.args],
                cwd=ROOT,
                env={**self.env, "NOTIFY_SOCKET": str(sock_path)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def _drain(self) -> None:
        assert self.notify is not None
        while True:
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except BlockingIOError:
                return

    def wait_message(self, message: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._drain()
            if message in self.messages:
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log()}")
            time.sleep(0.02)
        raise AssertionError(f"{self.name}: no {message} within {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout: float = 30.0) -> RelayProcess:
        self.wait_message("READY=1", timeout)
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def close(self) -> None:
        self.kill()
        if self.notify is not None:
            self.notify.close()
            self.notify = None
