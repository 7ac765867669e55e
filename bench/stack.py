"""The system under test, as processes: the API (uvicorn), relays and the webhook receiver."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import psycopg

from bench import httpload
from bench.procs import Child

HOST = "127.0.0.1"
ALLOWED_NETWORKS = "127.0.0.0/8"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


async def _wait_http(child: Child, port: int, path: str, limit: float) -> None:
    deadline = time.monotonic() + limit
    request = httpload.render("GET", path, f"{HOST}:{port}")
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited early:\n{child.log_tail()}")
        try:
            conn = await httpload.connect(HOST, port)
            try:
                status, _ = await conn.request(request)
            finally:
                conn.close()
            if status < 500:
                return
        except (OSError, httpload.HttpError):
            pass
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{child.name} did not answer on {path} within {limit:.0f}s")


class Api:
    def __init__(self, url: str, workers: int, log_dir: Path) -> None:
        self.port = free_port()
        self.workers = workers
        argv = [_bin("payments-api"), "--host", HOST, "--port", str(self.port),
                "--workers", str(workers), "--log-level", "warning"]
        self.child = Child(
            "api", argv, {"DATABASE_URL": url, "OUTBOX_WEBHOOK_ALLOWED_NETWORKS": ALLOWED_NETWORKS},
            log_dir,
        )

    async def ready(self) -> None:
        await _wait_http(self.child, self.port, "/healthz", 60)

    def serving_pids(self) -> list[int]:
        """The processes that serve requests: uvicorn's workers, or the server itself."""
        members = [pid for pid in group_members(self.child.pid) if pid != self.child.pid]
        return members or [self.child.pid]


def group_members(pgid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


class Profiler:
    """py-spy attached to running processes for one phase (`--profile DIR`)."""

    def __init__(self, out_dir: Path | None) -> None:
        self.out_dir = out_dir
        self.children: list[Child] = []

    def start(self, name: str, pids: list[int], seconds: float) -> None:
        if self.out_dir is None:
            return
        for pid in pids:
            argv = ["py-spy", "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", "250", "--format", "raw", "--nonblocking",
                    "--output", str(self.out_dir / f"{name}-{pid}.folded")]
            self.children.append(Child(f"py-spy-{name}-{pid}", argv, None, self.out_dir))

    def finish(self) -> None:
        for child in self.children:
            try:
                child.proc.wait(30)
            except Exception:
                pass
            child.stop(timeout=5)
        self.children = []


class Receiver:
    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.child = Child(
            "receiver", [sys.executable, "-m", "bench.receiver", "--port", str(self.port)],
            None, log_dir,
        )
        self.base = f"http://{HOST}:{self.port}"
        self.url = f"{self.base}/hook"

    async def ready(self) -> None:
        await _wait_http(self.child, self.port, "/_stats", 30)

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        conn = await httpload.connect(HOST, self.port)
        try:
            status, body = await conn.request(httpload.render(method, path, f"{HOST}:{self.port}"))
        finally:
            conn.close()
        if status != 200:
            raise RuntimeError(f"receiver {path}: HTTP {status}")
        data: dict[str, Any] = orjson.loads(body)
        return data

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/_stats")

    async def arrivals(self) -> dict[str, Any]:
        return await self._call("GET", "/_arrivals")

    async def samples(self) -> list[dict[str, str]]:
        data = await self._call("GET", "/_samples")
        samples: list[dict[str, str]] = data["samples"]
        return samples

    async def reset(self) -> None:
        await self._call("POST", "/_reset")


class Relays:
    """`count` relay processes (`outbox-relay`), each with the given flags."""

    def __init__(
        self,
        url: str,
        count: int,
        concurrency: int,
        batch_size: int,
        log_dir: Path,
        tag: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.children: list[Child] = []
        env = {"DATABASE_URL": url, "OUTBOX_WEBHOOK_ALLOWED_NETWORKS": ALLOWED_NETWORKS,
               "OUTBOX_PURGE_INTERVAL": "0", **(env or {})}
        for i in range(count):
            argv = [_bin("outbox-relay"), "--concurrency", str(concurrency),
                    "--batch-size", str(batch_size)]
            self.children.append(Child(f"relay-{tag}-{i}", argv, env, log_dir))

    async def asleep(self, limit: float = 60) -> None:
        """Until every relay has registered in outbox.sleepers (it is idle and listening)."""
        deadline = time.monotonic() + limit
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                for child in self.children:
                    if not child.alive():
                        raise RuntimeError(f"{child.name} exited:\n{child.log_tail()}")
                cur = await conn.execute("SELECT count(*) FROM outbox.sleepers")
                row = await cur.fetchone()
                if row and row[0] >= len(self.children):
                    return
                await asyncio.sleep(0.1)
        raise TimeoutError("relays did not go idle")

    def pids(self) -> list[int]:
        return [c.pid for c in self.children]

    def stop(self) -> None:
        for child in self.children:
            child.stop(timeout=30)
        self.children = []
