"""Request-head limits. uvicorn's httptools parser accepts heads of any size, so the app refuses
oversized ones itself (431) before any handler runs."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from api.errors import RequestHeaderFieldsTooLarge, problem

MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_COUNT = 100


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            size = sum(len(k) + len(v) + 4 for k, v in headers)
            if len(headers) > MAX_HEADER_COUNT or size > MAX_HEADER_BYTES:
                await _refuse(send)
                return
        await self.app(scope, receive, send)


async def _refuse(send: Send) -> None:
    body = orjson.dumps(
        problem(
            RequestHeaderFieldsTooLarge(
                f"Request headers are limited to {MAX_HEADER_COUNT} fields and "
                f"{MAX_HEADER_BYTES} bytes."
            )
        )
    )
    await send(
        {
            "type": "http.response.start",
            "status": 431,
            "headers": [
                (b"content-type", b"application/problem+json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
