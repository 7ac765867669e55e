"""A TCP proxy that tests can use to break connections on purpose.

It runs an asyncio loop in its own thread, so it works the same from sync and async tests (a test's
event loop never has to drive it). Put it in front of PostgreSQL and point the code under test at
`proxy.url_for(...)`:

- `cut()` resets every open connection (RST on both sides), like a network failure;
- `block("hang")` lets new connections in but never forwards them (until `unblock()`), like a
  black-holed route; `block("refuse")` resets them at once; existing connections keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from tests.support import with_database

BlockMode = Literal["hang", "refuse"]
T = TypeVar("T")

_CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: the peer sees 'connection reset', not a clean end."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None

    def reset(self) -> None:
        _reset(self.client)
        if self.upstream is not None:
            _reset(self.upstream)


class TcpProxy:
    """Forward 127.0.0.1:`port` to `target_host`:`target_port` (or to a unix socket)."""

    def __init__(
        self,
        target_host: str = "127.0.0.1",
        target_port: int = 5432,
        *,
        target_unix: str | None = None,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.target_unix = target_unix
        self.host = listen_host
        self.port = 0
        self.accepted = 0
        self._links: set[_Link] = set()
        self._block: BlockMode | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._unblocked: asyncio.Event | None = None

    @classmethod
    def for_url(cls, url: str) -> TcpProxy:
        """A proxy to the server of a libpq URL: host and port, or the unix socket it names."""
        parts = urlsplit(url)
        if parts.hostname and not parts.hostname.startswith("/"):
            return cls(parts.hostname, parts.port or 5432)
        query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
        directory = query.get("host", "/var/run/postgresql")
        port = parts.port or int(query.get("port", "5432"))
        return cls(target_unix=f"{directory}/.s.PGSQL.{port}")

    def url_for(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user and database are kept)."""
        parts = urlsplit(url)
        user = f"{parts.username}@" if parts.username else ""
        dbname = parts.path.lstrip("/") or "postgres"
        query = "&".join(
            p for p in parts.query.split("&") if p and p.split("=", 1)[0] not in ("host", "port")
        )
        base = f"{parts.scheme}://{user}{self.host}:{self.port}/"
        return with_database(base + (f"?{query}" if query else ""), dbname)

    # --- control (from any thread) --------------------------------------------------------------

    def start(self) -> TcpProxy:
        if self._thread is not None:
            return self
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(ready,),
            daemon=True,
            name=f"tcpproxy->{self.target_unix or self.target_port}",
        )
        self._thread.start()
        ready.wait(10)
        if self._server is None:
            raise RuntimeError("the proxy did not start")
        return self

    def stop(self) -> None:
        """Close the listener and reset every connection."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None

    def cut(self) -> int:
        """Reset every open connection; returns how many were cut. New connections still work."""
        return self._call(self._cut())

    def block(self, mode: BlockMode = "hang") -> None:
        self._call(self._set_block(mode))

    def unblock(self) -> None:
        """Accept normally again; connections held by `block("hang")` are forwarded now."""
        self._call(self._set_block(None))

    @property
    def connections(self) -> int:
        """Connections open right now."""
        return len(self._links)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the loop thread ------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(10)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._unblocked = asyncio.Event()
            self._unblocked.set()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._accept, self.host, self.port or 0, backlog=512)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        finally:
            ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._set_block(None)
        await self._cut()
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            _, pending = await asyncio.wait(others, timeout=2)
            for task in pending:
                task.cancel()

    async def _cut(self) -> int:
        links = list(self._links)
        self._links.clear()
        for link in links:
            link.reset()
        return len(links)

    async def _set_block(self, mode: BlockMode | None) -> None:
        assert self._unblocked is not None
        self._block = mode
        if mode == "hang":
            self._unblocked.clear()
        else:
            self._unblocked.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._block == "refuse":
            _reset(writer)
            return
        link = _Link(writer)
        self._links.add(link)
        try:
            if self._block == "hang":
                assert self._unblocked is not None
                await self._unblocked.wait()
                if link not in self._links:
                    return
            try:
                if self.target_unix is not None:
                    up_reader, up_writer = await asyncio.open_unix_connection(self.target_unix)
                else:
                    up_reader, up_writer = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except OSError:
                _reset(writer)
                return
            link.upstream = up_writer
            if link not in self._links:
                _reset(up_writer)
                return
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        except asyncio.CancelledError:
            # Only stop() cancels, and a cancelled stream handler makes Python 3.11 log a
            # spurious traceback.
            link.reset()
        finally:
            self._links.discard(link)
            for end in (link.client, link.upstream):
                if end is not None and not end.is_closing():
                    end.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link
    ) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except OSError:
            # One side failed: fail the other too, or its pump would wait for data forever.
            link.reset()
            return
        # A clean end of one direction is passed on as a half-close; the other may still talk.
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
