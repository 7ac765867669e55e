"""API errors. Everything the client can get wrong is a `LedgerError` (the ledger's own errors
and the HTTP layer's below), so one handler renders all of them as RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any

from ledger.errors import InvalidRequest, LedgerError, NotFound

__all__ = [
    "IdempotencyKeyInUse",
    "IdempotencyKeyReused",
    "InvalidRequest",
    "LedgerError",
    "NotFound",
    "PayloadTooLarge",
    "Unauthenticated",
    "Unavailable",
    "UnsupportedMediaType",
    "WebhookEndpointLimit",
    "problem",
]

PROBLEM_TYPE = "https://docs.payments.local/errors#"


class Unauthenticated(LedgerError):
    status = 401
    code = "unauthenticated"
    title = "Unauthenticated"


class IdempotencyKeyInUse(LedgerError):
    status = 409
    code = "idempotency_key_in_use"
    title = "Idempotency key in use"


class IdempotencyKeyReused(LedgerError):
    status = 422
    code = "idempotency_key_reused"
    title = "Idempotency key reused"


class PayloadTooLarge(LedgerError):
    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaType(LedgerError):
    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class Unavailable(LedgerError):
    status = 503
    code = "unavailable"
    title = "Service unavailable"


class WebhookEndpointLimit(LedgerError):
    status = 409
    code = "webhook_endpoint_limit_reached"
    title = "Webhook endpoint limit reached"


class MethodNotAllowed(LedgerError):
    status = 405
    code = "method_not_allowed"
    title = "Method not allowed"


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
