"""A lean HTTP/1.1 load generator: keep-alive connections, pre-rendered requests, no parsing
beyond the status line and Content-Length.

A general client (aiohttp, httpx) spends more CPU per request than the server's routing does;
on a 2-core machine that CPU comes out of the API's share and would make the API look slower
than it is. This one costs a few microseconds per request, and the harness reports its own CPU
time so the reader can check.

Two drivers: `closed_loop` (a fixed number of connections, each sending its next request when
the previous answer arrives: throughput and latency at a fixed concurrency) and `open_loop`
(requests started on a fixed schedule whatever the answers do: latency at an offered load).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Request = tuple[bytes, object]  # rendered bytes, and a tag the caller gets back with the answer


class HttpError(Exception):
    pass


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(HttpError(f"connection lost: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._try_parse()

    def _try_parse(self) -> None:
        if self._waiter is None or self._waiter.done():
            return
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buf[:end])
        lines = head.split(b"\r\n")
        try:
            status = int(lines[0].split(b" ", 2)[1])
        except (IndexError, ValueError):
            self._waiter.set_exception(HttpError(f"bad status line {lines[0]!r}"))
            return
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            low = name.strip().lower()
            if low == b"content-length":
                length = int(value)
            elif low == b"transfer-encoding":
                self._waiter.set_exception(HttpError("chunked responses are not supported"))
                return
        total = end + 4 + length
        if len(self._buf) < total:
            return
        body = bytes(self._buf[end + 4 : total])
        del self._buf[:total]
        self._waiter.set_result((status, body))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        if self.transport.is_closing():
            raise HttpError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(_Connection, host, port)
    return proto


def render(
    method: str, path: str, host: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Samples:
    """What a run saw: per answer its status, latency, tag and body (if kept)."""

    started: float = 0.0
    ended: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # of the counted (ok) answers
    answers: list[tuple[object, int, float, bytes]] = field(default_factory=list)
    errors: int = 0
    late: int = 0  # open loop: requests that could not start on schedule (no free connection)
    cpu_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 1e-9)

    def ok(self, status: int) -> int:
        return self.statuses.get(status, 0)


async def closed_loop(
    host: str,
    port: int,
    make: Callable[[], Request],
    concurrency: int,
    seconds: float,
    warmup: float,
    ok_status: int,
    keep_bodies: bool = False,
) -> Samples:
    """`concurrency` connections send back to back for `warmup` + `seconds`; only answers that
    arrive inside the measured window count."""
    conns = [await connect(host, port) for _ in range(concurrency)]
    samples = Samples()
    loop = asyncio.get_running_loop()
    now = loop.time()
    samples.started = now + warmup
    samples.ended = samples.started + seconds
    cpu0 = time.process_time()

    async def worker(conn: _Connection) -> None:
        while True:
            t0 = loop.time()
            if t0 >= samples.ended:
                return
            data, tag = make()
            try:
                status, body = await conn.request(data)
            except HttpError:
                samples.errors += 1
                return
            t1 = loop.time()
            if samples.started <= t1 <= samples.ended:
                samples.statuses[status] = samples.statuses.get(status, 0) + 1
                if status == ok_status:
                    samples.latencies_ms.append((t1 - t0) * 1000)
                if keep_bodies:
                    samples.answers.append((tag, status, t1, body))

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        samples.cpu_seconds = time.process_time() - cpu0
        for c in conns:
            c.close()
    return samples


async def open_loop(
    host: str,
    port: int,
    make: Callable[[], Request],
    rate: float,
    seconds: float,
    max_connections: int,
    ok_status: int,
) -> Samples:
    """Start one request every 1/`rate` seconds for `seconds`, each on a free keep-alive
    connection (opening one, up to `max_connections`). Answers keep their wall-clock arrival
    time (time.time()) so they can be matched with the receiver's clock."""
    loop = asyncio.get_running_loop()
    free: list[_Connection] = []
    opened = 0
    samples = Samples()
    tasks: set[asyncio.Task[None]] = set()
    cpu0 = time.process_time()

    async def one(conn: _Connection, data: bytes, tag: object) -> None:
        t0 = loop.time()
        try:
            status, body = await conn.request(data)
        except HttpError:
            samples.errors += 1
            return
        t1 = loop.time()
        samples.statuses[status] = samples.statuses.get(status, 0) + 1
        if status == ok_status:
            samples.latencies_ms.append((t1 - t0) * 1000)
        samples.answers.append((tag, status, time.time(), body))
        free.append(conn)

    start = loop.time() + 0.05
    samples.started = start
    total = int(rate * seconds)
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        while free and free[-1].closed.done():  # the server closed it (keep-alive timeout)
            free.pop()
            opened -= 1
        if free:
            conn = free.pop()
        elif opened < max_connections:
            conn = await connect(host, port)
            opened += 1
        else:
            samples.late += 1
            continue
        data, tag = make()
        task = asyncio.create_task(one(conn, data, tag))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    samples.ended = loop.time()
    samples.cpu_seconds = time.process_time() - cpu0
    for conn in free:
        conn.close()
    return samples


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


async def run_all(
    host: str, port: int, requests: list[bytes], concurrency: int
) -> list[tuple[int, bytes]]:
    """Send every request (for set-up, not measured); answers in request order."""
    results: list[tuple[int, bytes]] = [(0, b"")] * len(requests)
    queue = list(enumerate(requests))
    queue.reverse()
    conns = [await connect(host, port) for _ in range(max(1, min(concurrency, len(requests))))]

    async def worker(conn: _Connection) -> None:
        while queue:
            index, data = queue.pop()
            results[index] = await conn.request(data)

    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for c in conns:
            c.close()
    return results
