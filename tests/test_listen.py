"""`paymentsctl listen` for real: `payments-api`, `outbox-relay` and `paymentsctl listen` as
subprocesses. Money moved through the API arrives at the listener through the relay, verified,
and is printed; a forged request is refused and not printed; `--forward-to` hands the verified
requests on to an app (a receiver that verifies with the standardwebhooks package); SIGTERM and
SIGINT remove the temporary endpoint and exit 0. Without loopback in the allowed networks the
command says what to set, in one line, and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from ledger.merchants import NewKey
from outbox.signing import new_secret, secret_key, sign
from tests.relayhelpers import RelayProcess
from tests.support.receiver import Receiver
from tests.test_request_limits import ApiProcess, serve_api

LOOPBACK = {"OUTBOX_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"}
READY = re.compile(r"Ready: webhook endpoint (we_\w+) receives .* at http://127\.0\.0\.1:(\d+)/ "
                   r"\(signing secret (whsec_\S+)\)")


@dataclass
class Listening:
    proc: subprocess.Popen[str]
    errfile: Path
    lines: list[str] = field(default_factory=list)
    endpoint: str = ""
    port: int = 0
    secret: str = ""

    def stderr(self) -> str:
        return self.errfile.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not (found := READY.search(self.stderr())):
            assert self.proc.poll() is None, (
                f"listen exited {self.proc.returncode}: {self.stderr()}")
            assert time.monotonic() < deadline, f"listen not ready: {self.stderr()}"
            time.sleep(0.05)
        self.endpoint, self.port, self.secret = found.group(1), int(found.group(2)), found.group(3)

    def wait_lines(self, count: int, timeout: float = 60) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count:
            assert time.monotonic() < deadline, (
                f"{len(self.lines)} of {count} lines: {self.lines}\n{self.stderr()}")
            time.sleep(0.05)
        return list(self.lines)

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


@pytest.fixture
def listen(tmp_path: Path) -> Iterator[Any]:
    started: list[Listening] = []

    def start(api: ApiProcess, api_key: str, *args: str) -> Listening:
        errfile = tmp_path / f"listen-{len(started)}.err"
        with open(errfile, "w") as err:
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "paymentsctl"), "listen", "--api", api.url,
                 *args],
                env={**os.environ, "PAYMENTS_API_KEY": api_key},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True,
            )
        running = Listening(proc, errfile)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                running.lines.append(line.rstrip("\n"))

        threading.Thread(target=read, daemon=True).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            running.proc.kill()
            running.proc.wait(10)


def _move_money(api: ApiProcess, api_key: str) -> None:
    with httpx.Client(base_url=api.url, timeout=30,
                      headers={"Authorization": f"Bearer {api_key}"}) as client:
        a = client.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
        b = client.post("/v1/accounts", json={"currency": "USD"}).json()["id"]
        assert client.post("/v1/deposits", json={"account": a, "amount": 1000,
                                                 "currency": "USD"}).status_code == 201
        assert client.post("/v1/payments", json={"source": a, "destination": b, "amount": 300,
                                                 "currency": "USD"}).status_code == 201


def _events(api: ApiProcess, api_key: str) -> dict[str, dict[str, Any]]:
    with httpx.Client(base_url=api.url, timeout=30,
                      headers={"Authorization": f"Bearer {api_key}"}) as client:
        data = client.get("/v1/events", params={"limit": 100}).json()["data"]
    return {event["id"]: event for event in data}


def _endpoint_left(db_url: str, endpoint: str) -> bool:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT (SELECT count(*) FROM webhook_endpoints WHERE id = %s)"
            " + (SELECT count(*) FROM outbox.consumers WHERE name = %s)", (endpoint, endpoint),
        ).fetchone()
    return bool(rows and rows[0])


def test_listen_prints_every_event_verified_refuses_forgeries_and_cleans_up_on_sigterm(
    db_url: str, merchant: NewKey, tmp_path: Path, listen: Any
) -> None:
    relay = RelayProcess(db_url, tmp_path).start()
    try:
        relay.wait_ready()
        with serve_api(db_url, env=LOOPBACK) as api:
            listener = listen(api, merchant.api_key, "--json")
            listener.wait_ready()
            _move_money(api, merchant.api_key)
            expected = _events(api, merchant.api_key)
            assert len(expected) == 7  # 2 accounts, a deposit (2 events), a payment (3)
            lines = listener.wait_lines(len(expected))
            printed = [json.loads(line) for line in lines]
            assert {e["id"] for e in printed} == set(expected)
            for event in printed:
                assert event == expected[event["id"]], "printed as the events API renders it"

            # A request the relay did not sign is refused and not printed.
            body = json.dumps(printed[0]).encode()
            now = int(time.time())
            forged = httpx.post(f"http://127.0.0.1:{listener.port}/", content=body, headers={
                "webhook-id": printed[0]["id"], "webhook-timestamp": str(now),
                "webhook-signature": sign(secret_key(new_secret()), printed[0]["id"], now, body),
            })
            assert forged.status_code == 400
            time.sleep(0.5)
            assert len(listener.lines) == len(expected)
            assert "refused a request" in listener.stderr()

            assert listener.stop(signal.SIGTERM) == 0, listener.stderr()
            assert f"Removed webhook endpoint {listener.endpoint}" in listener.stderr()
            with httpx.Client(base_url=api.url, timeout=30) as client:
                gone = client.get(f"/v1/webhook_endpoints/{listener.endpoint}",
                                  headers={"Authorization": f"Bearer {merchant.api_key}"})
            assert gone.status_code == 404
        assert not _endpoint_left(db_url, listener.endpoint)
        assert relay.stop() == 0, relay.log()
    finally:
        relay.close()


def test_listen_forwards_to_an_app_and_sigint_removes_the_endpoint(
    db_url: str, merchant: NewKey, tmp_path: Path, receiver: Receiver, listen: Any
) -> None:
    relay = RelayProcess(db_url, tmp_path).start()
    try:
        relay.wait_ready()
        with serve_api(db_url, env=LOOPBACK) as api:
            listener = listen(api, merchant.api_key, "--events", "payment.*", "--forward-to",
                              receiver.url("/app"))
            listener.wait_ready()
            receiver.add_endpoint("/app", listener.secret)  # the app verifies as usual
            _move_money(api, merchant.api_key)
            [line] = listener.wait_lines(1)
            assert "payment.succeeded" in line and "(sequence 1)" in line and "-> 204" in line
            [receipt] = receiver.wait_for(1, path="/app", timeout=30)
            assert receipt.verified and receipt.body["type"] == "payment.succeeded"
            assert listener.stop(signal.SIGINT) == 0, listener.stderr()
        assert not _endpoint_left(db_url, listener.endpoint)
    finally:
        relay.close()


def test_listen_without_loopback_allowed_says_what_to_set(
    db_url: str, merchant: NewKey, listen: Any
) -> None:
    with serve_api(db_url) as api:
        listener = listen(api, merchant.api_key)
        assert listener.proc.wait(30) == 1
        [line] = listener.stderr().splitlines()
        assert line.startswith("paymentsctl: error: ") and "OUTBOX_WEBHOOK_ALLOWED_NETWORKS" in line
        with psycopg.connect(db_url) as conn:
            row = conn.execute("SELECT count(*) FROM webhook_endpoints").fetchone()
        assert row == (0,)

        without_key = listen(api, "")
        assert without_key.proc.wait(30) == 2
        assert "PAYMENTS_API_KEY" in without_key.stderr()
