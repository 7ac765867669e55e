"""Request ids: every response carries a `Request-Id` header, and every log line written while
the request is served names it (`request_id`), so a client's report and the server's log meet.

A client may send its own `Request-Id` (1 to 128 letters, digits and `_ . : - + / = @`, e.g.
a UUID); anything else is replaced by a generated `req_…` id. The middleware wraps the whole
application, outside Starlette's error handling, so 500s, 431s and 404s carry the header too.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledger.ids import new_id

HEADER = b"request-id"
_WELL_FORMED = re.compile(rb"[A-Za-z0-9_.:+/=@-]{1,128}")

current: ContextVar[str | None] = ContextVar("request_id", default=None)


def request_id(scope: Scope) -> str:
    """The client's Request-Id when it is well-formed, else a new `req_…` id."""
    for name, value in scope["headers"]:
        if name == HEADER:
            if _WELL_FORMED.fullmatch(value):
                return value.decode()
            break
    return new_id("req")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope)
        header = (HEADER, rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        token = current.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside a request) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current.get()
        return True
