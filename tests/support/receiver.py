"""A webhook receiver for tests: an aiohttp server on 127.0.0.1 in its own thread.

Each path is an endpoint with its own `whsec_` secret. Every request is verified with the
`standardwebhooks` package (the contract's yardstick) and recorded as a `Receipt`, whatever the
answer. What an endpoint answers is programmable: a default reply plus a queue of one-shot replies
(status, `Retry-After`, delay, connection reset, redirect, an interim 1xx response first).

    receiver.add_endpoint("/hook", secret)
    receiver.respond("/hook", 503, Reply(429, retry_after=1), Reply(reset=True))
    url = receiver.url("/hook")
    ...
    receipts = await receiver.wait_for_async(4, path="/hook")

The server has its own loop, so the blocking `wait_for` is fine in sync tests; async tests whose
loop also runs the code under test must use `wait_for_async`.

Per endpoint and event `subject`, the receiver also notes every request that arrived while
another request of the same subject was still unanswered there (`overlaps`): the relay must never
have two deliveries of one subject in flight to one endpoint. A request counts as answered when
its handler is done, which is before the sender can read the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook


@dataclass(frozen=True)
class Reply:
    """One answer. `reset` drops the connection (RST) after reading the request; `delay` waits
    before answering (to exceed the sender's timeout); `informational` sends that 1xx status line
    at once, before the delay; `gate` holds the answer until the test sets it."""

    status: int = 204
    retry_after: int | str | None = None
    delay: float = 0.0
    gate: threading.Event | None = field(default=None, compare=False)
    reset: bool = False
    location: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    informational: int | None = None

    @classmethod
    def redirect(cls, location: str, status: int = 307) -> Reply:
        return cls(status, location=location)


@dataclass(frozen=True)
class Receipt:
    path: str
    webhook_id: str | None
    timestamp: int | None
    """The `webhook-timestamp` header (Unix seconds), None when missing or not an integer."""
    body: Any
    """The parsed JSON body, None when it is not JSON."""
    raw: bytes
    verified: bool
    error: str | None
    """Why verification failed."""
    headers: Mapping[str, str]
    """Request headers, names in lower case."""
    arrived_at: float
    """time.time() when the request was read."""
    reply: Reply
    attempt: int
    """1 for the first arrival of this webhook-id at this path, 2 for the next, ..."""

    @property
    def content_type(self) -> str | None:
        return self.headers.get("content-type")


@dataclass
class _Endpoint:
    secret: str
    default: Reply
    strict: bool
    queue: deque[Reply] = field(default_factory=deque)


def _as_reply(reply: Reply | int) -> Reply:
    return reply if isinstance(reply, Reply) else Reply(reply)


@dataclass(frozen=True)
class Overlap:
    """A request that arrived while others of its subject were unanswered at the same path."""

    path: str
    subject: str
    webhook_id: str | None
    unanswered: tuple[str | None, ...]


class ReceiverTimeout(AssertionError):
    pass


class Receiver:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._endpoints: dict[str, _Endpoint] = {}
        self._receipts: list[Receipt] = []
        self._arrivals: Counter[tuple[str, str | None]] = Counter()
        self._unanswered: dict[tuple[str, str], list[str | None]] = {}
        self.overlaps: list[Overlap] = []
        self._changed = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # --- programming ----------------------------------------------------------------------------

    def add_endpoint(
        self, path: str, secret: str, *, default: Reply | int = 204, strict: bool = True
    ) -> str:
        """Register `path` with its signing secret; returns its URL. With `strict`, a request that
        fails verification is answered 401 (still recorded), whatever was programmed."""
        if not path.startswith("/"):
            raise ValueError("path must start with /")
        with self._changed:
            self._endpoints[path] = _Endpoint(secret, _as_reply(default), strict)
        return self.url(path)

    def respond(self, path: str, *replies: Reply | int) -> None:
        """Queue one-shot replies for the next requests to `path`; then the default applies."""
        with self._changed:
            self._endpoints[path].queue.extend(_as_reply(r) for r in replies)

    def clear_replies(self, path: str) -> None:
        """Drop the one-shot replies still queued for `path`."""
        with self._changed:
            self._endpoints[path].queue.clear()

    def set_default(self, path: str, reply: Reply | int) -> None:
        with self._changed:
            self._endpoints[path].default = _as_reply(reply)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    # --- what arrived ---------------------------------------------------------------------------

    def receipts(self, path: str | None = None) -> list[Receipt]:
        with self._changed:
            return [r for r in self._receipts if path is None or r.path == path]

    def ids(self, path: str | None = None) -> list[str | None]:
        """webhook-ids in arrival order (retries included)."""
        return [r.webhook_id for r in self.receipts(path)]

    def accepted(self, path: str | None = None) -> list[Receipt]:
        """Verified receipts that were answered 2xx without delay or reset: what a sender may
        count as delivered."""
        return [
            r
            for r in self.receipts(path)
            if r.verified
            and 200 <= r.reply.status < 300
            and not r.reply.reset
            and r.reply.delay == 0
        ]

    def clear(self) -> None:
        with self._changed:
            self._receipts.clear()
            self._arrivals.clear()
            self.overlaps.clear()

    def wait_for(
        self,
        count: int,
        *,
        path: str | None = None,
        where: Callable[[Receipt], bool] | None = None,
        timeout: float = 10.0,
    ) -> list[Receipt]:
        """Block until at least `count` matching receipts arrived; returns them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = self._matching(path, where)
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ReceiverTimeout(self._timeout_message(count, found, path, timeout))
                self._changed.wait(left)

    async def wait_for_async(
        self,
        count: int,
        *,
        path: str | None = None,
        where: Callable[[Receipt], bool] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - same signature as wait_for
        poll: float = 0.01,
    ) -> list[Receipt]:
        """Like wait_for, without blocking the caller's event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                found = self._matching(path, where)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise ReceiverTimeout(self._timeout_message(count, found, path, timeout))
            await asyncio.sleep(poll)

    def _matching(self, path: str | None, where: Callable[[Receipt], bool] | None) -> list[Receipt]:
        return [
            r
            for r in self._receipts
            if (path is None or r.path == path) and (where is None or where(r))
        ]

    @staticmethod
    def _timeout_message(
        count: int, found: Iterable[Receipt], path: str | None, timeout: float
    ) -> str:
        found = list(found)
        where = f" at {path}" if path else ""
        return f"expected {count} webhook requests{where} within {timeout}s, got {len(found)}"

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> Receiver:
        if self._thread is not None:
            return self
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(ready, errors), daemon=True, name="webhook-receiver"
        )
        self._thread.start()
        ready.wait(10)
        if errors or not self.port:
            raise RuntimeError("the webhook receiver did not start") from (
                errors[0] if errors else None
            )
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        if self._runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:
            errors.append(exc)
            return
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A request whose sender gave up (its timeout closed the connection) is no longer in
        # flight: its handler is cancelled rather than left to sleep out a long delay, so
        # `in_flight` and the overlap check count what the sender is waiting for.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5,
                                     handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, backlog=1024)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    # --- requests -------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        arrived_at = time.time()
        headers = {k.lower(): v for k, v in request.headers.items()}
        path = request.path
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        webhook_id = headers.get("webhook-id")
        try:
            timestamp: int | None = int(headers.get("webhook-timestamp", ""))
        except ValueError:
            timestamp = None

        with self._changed:
            endpoint = self._endpoints.get(path)
            verified, error = _verify(endpoint.secret if endpoint else None, raw, headers)
            if endpoint is None:
                reply = Reply(404)
            elif endpoint.strict and not verified:
                reply = Reply(401)
            elif endpoint.queue:
                reply = endpoint.queue.popleft()
            else:
                reply = endpoint.default
            self._arrivals[(path, webhook_id)] += 1
            subject = body.get("subject") if isinstance(body, dict) else None
            in_flight = (path, subject) if isinstance(subject, str) else None
            if in_flight is not None:
                unanswered = self._unanswered.setdefault(in_flight, [])
                if unanswered:
                    self.overlaps.append(Overlap(path, in_flight[1], webhook_id, tuple(unanswered)))
                unanswered.append(webhook_id)
            self._receipts.append(
                Receipt(
                    path=path,
                    webhook_id=webhook_id,
                    timestamp=timestamp,
                    body=body,
                    raw=raw,
                    verified=verified,
                    error=error,
                    headers=headers,
                    arrived_at=arrived_at,
                    reply=reply,
                    attempt=self._arrivals[(path, webhook_id)],
                )
            )
            self._changed.notify_all()

        if reply.informational is not None and request.transport is not None:
            request.transport.write(f"HTTP/1.1 {reply.informational} Interim\r\n\r\n".encode())
        try:
            if reply.delay:
                await asyncio.sleep(reply.delay)
            # A threading.Event, set from the test's thread: polled, so that a gate nobody opens
            # cannot keep a worker thread (and the test process) alive.
            while reply.gate is not None and not reply.gate.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            if reply.reset:
                _reset(request)
                raise web.HTTPServiceUnavailable()  # never sent: the connection is gone
            response_headers = dict(reply.headers)
            if reply.retry_after is not None:
                response_headers["Retry-After"] = str(reply.retry_after)
            if reply.location is not None:
                response_headers["Location"] = reply.location
            return web.Response(status=reply.status, body=reply.body, headers=response_headers)
        finally:
            if in_flight is not None:
                with self._changed:
                    self._unanswered[in_flight].remove(webhook_id)


def _verify(secret: str | None, raw: bytes, headers: Mapping[str, str]) -> tuple[bool, str | None]:
    if secret is None:
        return False, "no endpoint registered at this path"
    try:
        Webhook(secret).verify(raw, dict(headers), json_parse=False)
    except Exception as exc:  # the library raises ValueError and binascii errors too
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def _reset(request: web.Request) -> None:
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
