"""Request parsing and responses: bounded JSON bodies, problem+json, Stripe-style lists."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from api.errors import (
    InvalidRequest,
    LedgerError,
    PayloadTooLarge,
    Unauthenticated,
    UnsupportedMediaType,
    problem,
)

MAX_BODY = 64 * 1024


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return content if isinstance(content, bytes) else orjson.dumps(content)


def exact_integer(value: int | Decimal) -> int | orjson.Fragment:
    """A whole number as an exact JSON integer of any size (a `numeric` column's value): orjson
    writes integers of up to 64 bits itself, larger ones go in as their digits."""
    number = int(value)
    if -(2**63) <= number < 2**64:
        return number
    return orjson.Fragment(str(number).encode())


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return JSONResponse(body, status_code=status, headers=headers)


def problem_response(error: LedgerError, headers: dict[str, str] | None = None) -> Response:
    if isinstance(error, Unauthenticated):
        # RFC 9110 section 11.6.1: a 401 names the scheme that would be accepted.
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return Response(
        orjson.dumps(problem(error)),
        status_code=error.status,
        media_type="application/problem+json",
        headers=headers,
    )


async def read_body(request: Request) -> bytes:
    """The raw body, refused past 64 KiB whatever Content-Length claims."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > MAX_BODY:
                raise PayloadTooLarge(f"The body is larger than {MAX_BODY} bytes.")
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise PayloadTooLarge(f"The body is larger than {MAX_BODY} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is `{}`."""
    raw = await read_body(request)
    if not raw.strip():
        return {}
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    is_json = media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
    if not is_json:
        raise UnsupportedMediaType("The body must be application/json.")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The body is not valid JSON: {exc.msg}.") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The body must be a JSON object.")
    if b"\\u0000" in raw and _has_nul(data):
        raise InvalidRequest("Strings must not contain NUL characters (\\u0000).")
    return data


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def page(
    items: list[dict[str, Any]], limit: int, reverse: bool
) -> dict[str, Any]:
    """A list response from up to limit+1 rows (the extra row only says there is more)."""
    has_more = len(items) > limit
    items = items[:limit]
    if reverse:
        items.reverse()
    return {"object": "list", "data": items, "has_more": has_more}
