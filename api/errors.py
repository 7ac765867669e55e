"""API errors. Everything the client can get wrong is a `LedgerError` (the ledger's own errors
and the HTTP layer's below), so one handler renders all of them as RFC 9457 problem+json.

A problem's `type` is the relative URI reference `/problems/<code>` (RFC 9457 allows relative
references; they resolve against the API's own address), and `GET /problems/<code>` says what it
means (api/problems.py). PROBLEM_TYPE is the one place in Python that states the prefix; the SQL
function `api_json_problem` (db/migrations/versions/0006_comments_problem_types.py) is the only
other renderer, and a test holds them equal.
"""

from __future__ import annotations

from typing import Any

from ledger.errors import InvalidRequest, LedgerError, NotFound

__all__ = [
    "PROBLEM_TYPE",
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidRequest",
    "LedgerError",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "RequestHeaderFieldsTooLarge",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "WebhookEndpointLimit",
    "problem",
]

PROBLEM_TYPE = "/problems/"


class Unauthenticated(LedgerError):
    """The API key is missing, malformed, unknown or revoked. The answer carries
    `WWW-Authenticate: Bearer`."""

    status = 401
    code = "unauthenticated"
    title = "Unauthenticated"


class IdempotencyKeyInUse(LedgerError):
    """A request with the same `Idempotency-Key` is still running; retry once it has answered."""

    status = 409
    code = "idempotency_key_in_use"
    title = "Idempotency key in use"


class IdempotencyKeyReused(LedgerError):
    """The `Idempotency-Key` was first used with another route or another body."""

    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class PayloadTooLarge(LedgerError):
    """The body is larger than 64 KiB, whatever `Content-Length` says."""

    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaType(LedgerError):
    """A non-empty body that is not `application/json` (or `application/…+json`)."""

    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class Unavailable(LedgerError):
    """The database cannot be reached, is read-only, or the write kept conflicting with others.
    Temporary: retry after `Retry-After` seconds, with the same `Idempotency-Key`."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"


class WebhookEndpointLimit(LedgerError):
    """The merchant already has as many webhook endpoints as allowed (16 by default, enabled or
    disabled); delete one to make room."""

    status = 409
    code = "webhook_endpoint_limit_reached"
    title = "Webhook endpoint limit reached"


class MethodNotAllowed(LedgerError):
    """The path exists but not with this method; the `Allow` header lists the methods it has."""

    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


class RequestHeaderFieldsTooLarge(LedgerError):
    """More than 100 request header fields, or more than 32 KiB of them."""

    status = 431
    code = "request_header_fields_too_large"
    title = "Request header fields too large"


class InternalError(LedgerError):
    """A bug on our side. The body carries no internals; the server logged it with the
    request's `Request-Id`."""

    status = 500
    code = "internal_error"
    title = "Internal error"


def problem(error: LedgerError) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE + error.code,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "code": error.code,
    }
    if error.param is not None:
        body["param"] = error.param
    body.update(error.extra)
    return body
