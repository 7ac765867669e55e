"""The OpenAPI 3.1 document of every route, built once."""

from __future__ import annotations

from functools import cache
from typing import Any

Schema = dict[str, Any]

_TS: Schema = {"type": "string", "format": "date-time"}
_AMOUNT: Schema = {"type": "integer", "minimum": 1, "maximum": 10**15}
_CURRENCY: Schema = {"type": "string", "pattern": "^[A-Z]{3}$", "example": "USD"}
_ID: Schema = {"type": "string", "minLength": 1, "maxLength": 128}
_METADATA: Schema = {
    "type": "object",
    "maxProperties": 50,
    "propertyNames": {"maxLength": 40},
    "additionalProperties": {"type": "string", "maxLength": 500},
}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Schema], required: list[str] | None = None, extra: bool = True) -> Schema:
    schema: Schema = {"type": "object", "properties": props}
    schema["required"] = list(props) if required is None else required
    if not extra:
        schema["additionalProperties"] = False
    return schema


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


_SCHEMAS: dict[str, Schema] = {
    "Problem": _obj(
        {
            "type": {
                "type": "string",
                "format": "uri-reference",
                "description": "/problems/<code>, relative to the API's address; GET it for "
                "what the code means.",
            },
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "param": {"type": "string"},
            "payment": _ref("Payment"),
        },
        required=["type", "title", "status", "detail", "code"],
    ),
    "ProblemType": _obj(
        {
            "object": {"const": "problem_type"},
            "type": {"type": "string", "format": "uri-reference"},
            "code": {"type": "string"},
            "status": {"type": "integer"},
            "title": {"type": "string"},
            "description": {"type": "string"},
        }
    ),
    "Account": _obj(
        {
            "id": {"type": "string", "pattern": "^acct_"},
            "object": {"const": "account"},
            "currency": _CURRENCY,
            "balance": {"type": "integer", "minimum": 0},
            "created_at": _TS,
            "metadata": {"type": "object"},
        }
    ),
    "LedgerEntry": _obj(
        {
            "id": {"type": "string"},
            "object": {"const": "ledger_entry"},
            "account": {"type": "string"},
            "amount": {"type": "integer"},
            "balance_after": {"type": "integer"},
            "currency": _CURRENCY,
            "ref": {"type": "string"},
            "created_at": _TS,
        }
    ),
    "Deposit": _obj(
        {
            "id": {"type": "string", "pattern": "^dep_"},
            "object": {"const": "deposit"},
            "account": {"type": "string"},
            "amount": _AMOUNT,
            "currency": _CURRENCY,
            "status": {"const": "succeeded"},
            "created_at": _TS,
        }
    ),
    "Payment": _obj(
        {
            "id": {"type": "string", "pattern": "^pay_"},
            "object": {"const": "payment"},
            "source": {"type": "string"},
            "destination": {"type": "string"},
            "amount": _AMOUNT,
            "amount_refunded": {"type": "integer", "minimum": 0},
            "currency": _CURRENCY,
            "status": {"enum": ["succeeded", "failed"]},
            "failure_code": _nullable({"enum": ["insufficient_funds", "risk_declined"]}),
            "description": _nullable({"type": "string"}),
            "metadata": {"type": "object"},
            "created_at": _TS,
        }
    ),
    "Refund": _obj(
        {
            "id": {"type": "string", "pattern": "^re_"},
            "object": {"const": "refund"},
            "payment": {"type": "string"},
            "amount": _AMOUNT,
            "currency": _CURRENCY,
            "status": {"const": "succeeded"},
            "created_at": _TS,
        }
    ),
    "Payout": _obj(
        {
            "id": {"type": "string", "pattern": "^po_"},
            "object": {"const": "payout"},
            "account": {"type": "string"},
            "amount": _AMOUNT,
            "currency": _CURRENCY,
            "status": {"const": "paid"},
            "created_at": _TS,
        }
    ),
    "Event": _obj(
        {
            "specversion": {"const": "1.0"},
            "id": {"type": "string", "pattern": "^evt_"},
            "source": {"type": "string"},
            "type": {"type": "string"},
            "subject": {"type": "string"},
            "sequence": {
                "type": "string",
                "pattern": "^[0-9]{19}$",
                "description": "CloudEvents sequence: the subject's counter 1, 2, 3, ... in "
                "decimal, zero-padded to 19 digits, so string order is numeric order.",
            },
            "time": _TS,
            "datacontenttype": {"const": "application/json"},
            "data": {"type": "object"},
        }
    ),
    "WebhookEndpoint": _obj(
        {
            "id": {"type": "string", "pattern": "^we_"},
            "object": {"const": "webhook_endpoint"},
            "url": {"type": "string"},
            "event_types": {"type": "array", "items": {"type": "string"}},
            "description": _nullable({"type": "string"}),
            "status": {"enum": ["enabled", "disabled"]},
            "secret": {"type": "string", "pattern": "^whsec_"},
            "created_at": _TS,
        },
        required=["id", "object", "url", "event_types", "status", "created_at"],
    ),
    "Delivery": _obj(
        {
            "object": {"const": "webhook_delivery"},
            "event": {"type": "string"},
            "status": {"enum": ["pending", "delivered", "dead"]},
            "attempts": {"type": "integer", "minimum": 0},
            "last_status_code": _nullable({"type": "integer"}),
            "last_error": _nullable({"type": "string"}),
            "next_attempt_at": _nullable(_TS),
            "delivered_at": _nullable(_TS),
        }
    ),
    "DailyReport": _obj(
        {
            "object": {"const": "daily_report"},
            "day": {"type": "string", "format": "date"},
            "currencies": {
                "type": "object",
                "additionalProperties": _obj(
                    {
                        "payments_count": {"type": "integer"},
                        "payments_amount": {"type": "integer"},
                        "refunds_amount": {"type": "integer"},
                        "deposits_amount": {"type": "integer"},
                        "payouts_amount": {"type": "integer"},
                    }
                ),
            },
        }
    ),
}


def _list_of(name: str) -> Schema:
    return _obj(
        {
            "object": {"const": "list"},
            "data": {"type": "array", "items": _ref(name)},
            "has_more": {"type": "boolean"},
        }
    )


_PROBLEM_CODES = {
    400: "invalid_request or currency_mismatch",
    401: "unauthenticated",
    402: "insufficient_funds or risk_declined",
    404: "not_found",
    409: "idempotency_key_in_use, refund_exceeds_payment or webhook_endpoint_limit_reached",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "idempotency_key_reused",
    503: "unavailable",
}


def _problems(*statuses: int) -> dict[str, Any]:
    return {
        str(s): {
            "description": _PROBLEM_CODES[s],
            "content": {"application/problem+json": {"schema": _ref("Problem")}},
        }
        for s in statuses
    }


def _json(schema: Schema, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_READ_ERRORS = (400, 401, 404, 503)
_WRITE_ERRORS = (400, 401, 404, 409, 413, 415, 422, 503)
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": _ID}
_IDEMPOTENCY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
_LIST_PARAMS = [
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100}},
    {"name": "starting_after", "in": "query", "schema": _ID},
    {"name": "ending_before", "in": "query", "schema": _ID},
]


def _get(summary: str, schema: Schema, params: list[Any] | None = None) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": params or [],
        "responses": {"200": _json(schema), **_problems(*_READ_ERRORS)},
    }


def _post(
    summary: str,
    body: Schema | None,
    status: int,
    schema: Schema,
    params: list[Any] | None = None,
    errors: tuple[int, ...] = _WRITE_ERRORS,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "parameters": [*(params or []), _IDEMPOTENCY],
        "responses": {str(status): _json(schema, "Created"), **_problems(*errors)},
    }
    if body is not None:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": body}},
        }
    return op


_MOVEMENT = _obj(
    {"account": _ID, "amount": _AMOUNT, "currency": _CURRENCY}, extra=False
)


def _rotate_secret() -> dict[str, Any]:
    op = _post(
        "Rotate the signing secret; the old one stays valid for expires_in seconds",
        _obj(
            {
                "expires_in": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": 7 * 24 * 3600,
                    "default": 24 * 3600,
                    "description": "Seconds during which requests are signed with the old "
                    "secret as well; 0 retires it at once.",
                }
            },
            [],
            extra=False,
        ),
        200,
        _ref("WebhookEndpoint"),
        [_ID_PARAM],
    )
    op["requestBody"]["required"] = False
    op["responses"]["200"]["description"] = "The endpoint, with its new secret"
    return op


@cache
def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/accounts": {
            "post": _post(
                "Create an account",
                _obj({"currency": _CURRENCY, "metadata": _METADATA}, ["currency"], extra=False),
                201,
                _ref("Account"),
            ),
            "get": _get("List accounts", _list_of("Account"), _LIST_PARAMS),
        },
        "/v1/accounts/{id}": {"get": _get("Retrieve an account", _ref("Account"), [_ID_PARAM])},
        "/v1/accounts/{id}/entries": {
            "get": _get(
                "List an account's ledger entries",
                _list_of("LedgerEntry"),
                [_ID_PARAM, *_LIST_PARAMS],
            )
        },
        "/v1/deposits": {"post": _post("Deposit money", _MOVEMENT, 201, _ref("Deposit"))},
        "/v1/payments": {
            "post": _post(
                "Create a payment",
                _obj(
                    {
                        "source": _ID,
                        "destination": _ID,
                        "amount": _AMOUNT,
                        "currency": _CURRENCY,
                        "description": {"type": "string", "maxLength": 1000},
                        "metadata": _METADATA,
                    },
                    ["source", "destination", "amount", "currency"],
                    extra=False,
                ),
                201,
                _ref("Payment"),
                errors=(*_WRITE_ERRORS, 402),
            ),
            "get": _get("List payments", _list_of("Payment"), _LIST_PARAMS),
        },
        "/v1/payments/{id}": {"get": _get("Retrieve a payment", _ref("Payment"), [_ID_PARAM])},
        "/v1/payments/{id}/refunds": {
            "post": _post(
                "Refund a payment",
                _obj({"amount": _AMOUNT}, [], extra=False),
                201,
                _ref("Refund"),
                [_ID_PARAM],
                errors=(*_WRITE_ERRORS, 402),
            )
        },
        "/v1/payouts": {
            "post": _post(
                "Pay out", _MOVEMENT, 201, _ref("Payout"), errors=(*_WRITE_ERRORS, 402)
            )
        },
        "/v1/events": {
            "get": _get(
                "List events, newest first",
                _list_of("Event"),
                [
                    {"name": "type", "in": "query", "schema": {"type": "string"}},
                    {"name": "subject", "in": "query", "schema": _ID},
                    *_LIST_PARAMS,
                ],
            )
        },
        "/v1/events/{id}": {"get": _get("Retrieve an event", _ref("Event"), [_ID_PARAM])},
        "/v1/webhook_endpoints": {
            "post": _post(
                "Create a webhook endpoint",
                _obj(
                    {
                        "url": {"type": "string", "maxLength": 2048},
                        "event_types": {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "string"},
                        },
                        "description": {"type": "string", "maxLength": 1000},
                    },
                    ["url", "event_types"],
                    extra=False,
                ),
                201,
                _ref("WebhookEndpoint"),
            ),
            "get": _get("List webhook endpoints", _list_of("WebhookEndpoint"), _LIST_PARAMS),
        },
        "/v1/webhook_endpoints/{id}": {
            "get": _get("Retrieve a webhook endpoint", _ref("WebhookEndpoint"), [_ID_PARAM]),
            "patch": {
                **_post(
                    "Update a webhook endpoint",
                    _obj(
                        {
                            "url": {"type": "string", "maxLength": 2048},
                            "event_types": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "string"},
                            },
                            "status": {"enum": ["enabled", "disabled"]},
                            "description": {"type": "string", "maxLength": 1000},
                        },
                        [],
                        extra=False,
                    ),
                    200,
                    _ref("WebhookEndpoint"),
                    [_ID_PARAM],
                ),
            },
            "delete": {
                "summary": "Delete a webhook endpoint",
                "parameters": [_ID_PARAM, _IDEMPOTENCY],
                "responses": {
                    "204": {"description": "Deleted"},
                    **_problems(*_READ_ERRORS, 409, 422),
                },
            },
        },
        "/v1/webhook_endpoints/{id}/deliveries": {
            "get": _get(
                "List an endpoint's deliveries, newest event first",
                _list_of("Delivery"),
                [
                    _ID_PARAM,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"enum": ["pending", "delivered", "dead"]},
                    },
                    *_LIST_PARAMS,
                ],
            )
        },
        "/v1/webhook_endpoints/{id}/recover": {
            "post": _post(
                "Requeue dead deliveries since a time",
                _obj({"since": _TS}, ["since"], extra=False),
                202,
                _obj(
                    {
                        "requeued": {"type": "integer", "minimum": 0},
                        "out_of_order_subjects": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Subjects (ordering keys) whose events the endpoint "
                            "will receive out of order: a requeued event arrives after a later "
                            "event of the same subject that was delivered, or was in flight, "
                            "when the request ran. The receiver sees a `sequence` lower than one "
                            "it already processed for that subject.",
                        },
                    }
                ),
                [_ID_PARAM],
            )
        },
        "/v1/webhook_endpoints/{id}/rotate_secret": {
            "post": _rotate_secret(),
        },
        "/v1/reports/daily": {
            "get": _get(
                "Daily totals of one UTC day",
                _ref("DailyReport"),
                [
                    {
                        "name": "day",
                        "in": "query",
                        "required": True,
                        "schema": {"type": "string", "format": "date"},
                    }
                ],
            )
        },
        "/healthz": {
            "get": {
                "summary": "Liveness",
                "security": [],
                "responses": {"200": _json(_obj({"status": {"type": "string"}}))},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Readiness: the database answers",
                "security": [],
                "responses": {
                    "200": _json(_obj({"status": {"type": "string"}})),
                    **_problems(503),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/problems/{code}": {
            "get": {
                "summary": "What a problem code means (the `type` of problem bodies)",
                "security": [],
                "parameters": [
                    {"name": "code", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "responses": {"200": _json(_ref("ProblemType")), **_problems(404)},
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"})},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Payments API",
            "version": "1.0.0",
            "description": "Accounts on a double-entry ledger, money movements, events and "
            "webhooks. Errors are RFC 9457 problem+json.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
        "paths": paths,
    }
