"""deploy/run-local as a new user runs it (a subprocess, real signals): it serves the API only
once the relay is ready, refuses to serve it when the relay cannot start (its metrics port
taken), stops both on SIGTERM and exits 0, stops the API and exits 1 when the relay dies, and
lets `paymentsctl listen` receive webhooks on loopback without further configuration."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "deploy" / "run-local"

pytestmark = pytest.mark.skipif(
    Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
    reason="deploy/run-local runs the project's .venv; these tests must run from it",
)


@dataclass
class RunLocal:
    proc: subprocess.Popen[bytes]
    logfile: Path
    api_port: int
    metrics_port: int

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def children(self) -> list[int]:
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines()
                if "outbox-relay" in line or "payments-api" in line]

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, (
                f"run-local exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.api}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the API never answered:\n{self.log()}"
            time.sleep(0.1)


def _readline(pipe: IO[str], timeout: float = 30) -> str:
    ready, _, _ = select.select([pipe], [], [], timeout)
    assert ready, f"nothing read within {timeout} s"
    return pipe.readline()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose (its parent has not reaped it yet).
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


@pytest.fixture
def run_local(db_url: str, tmp_path: Path) -> Iterator[object]:
    started: list[RunLocal] = []

    def start(metrics_port: int | None = None) -> RunLocal:
        api_port, metrics = free_port(), metrics_port or free_port()
        logfile = tmp_path / f"run-local-{len(started)}.log"
        env = {**os.environ, "DATABASE_URL": db_url, "PORT": str(api_port),
               "RELAY_METRICS_PORT": str(metrics)}
        env.pop("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", None)
        with open(logfile, "wb") as log:
            proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        running = RunLocal(proc, logfile, api_port, metrics)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.proc.poll() is None:
            os.killpg(running.proc.pid, signal.SIGKILL)
            running.proc.wait(10)


def test_sigterm_stops_the_relay_and_the_api_and_exits_0(run_local: object) -> None:
    running = run_local()  # type: ignore[operator]
    running.wait_serving()
    children = running.children()
    assert len(children) == 2, children
    assert "relay ready" in running.log()
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(60) == 0, running.log()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in children):
        assert time.monotonic() < deadline, f"still running after SIGTERM: {children}"
        time.sleep(0.1)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.api}/healthz", timeout=1)


def test_a_relay_that_cannot_start_means_no_api(run_local: object) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        running = run_local(metrics_port=taken.getsockname()[1])  # type: ignore[operator]
        assert running.proc.wait(60) == 1, running.log()
    log = running.log()
    assert "outbox-relay could not start" in log and "RELAY_METRICS_PORT" in log, log
    assert "cannot serve metrics" in log, log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.api}/healthz", timeout=1)


def test_when_the_relay_dies_the_api_stops_too(run_local: object) -> None:
    running = run_local()  # type: ignore[operator]
    running.wait_serving()
    relay = [pid for pid in running.children()
             if "outbox-relay" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")]
    assert len(relay) == 1
    os.kill(relay[0], signal.SIGKILL)
    assert running.proc.wait(60) == 1, running.log()
    assert "outbox-relay exited" in running.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.api}/healthz", timeout=1)


def test_webhooks_to_loopback_work_out_of_the_box(run_local: object, db_url: str) -> None:
    """The README's walk-through: `paymentsctl listen` against what run-local serves."""
    running = run_local()  # type: ignore[operator]
    running.wait_serving()
    env = {**os.environ, "DATABASE_URL": db_url}
    env.pop("OUTBOX_WEBHOOK_ALLOWED_NETWORKS", None)
    ctl = str(Path(sys.executable).parent / "paymentsctl")
    made = subprocess.run([ctl, "merchant", "create", "Walk-through"], env=env,
                          capture_output=True, text=True, check=True)
    key = made.stdout.split('"api_key": "')[1].split('"')[0]
    listen = subprocess.Popen([ctl, "listen", "--api", running.api], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**env, "PAYMENTS_API_KEY": key})
    try:
        assert listen.stderr is not None and listen.stdout is not None
        assert "Ready:" in _readline(listen.stderr)
        created = httpx.post(f"{running.api}/v1/accounts", json={"currency": "USD"}, timeout=30,
                             headers={"Authorization": f"Bearer {key}"})
        assert created.status_code == 201
        line = _readline(listen.stdout)
        assert "account.created" in line and created.json()["id"] in line, line
    finally:
        listen.send_signal(signal.SIGINT)
        assert listen.wait(30) == 0
