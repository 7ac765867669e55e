"""Errors of the money-moving layer. Each carries the HTTP status and the contract's code, so the
API translates them in one handler."""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    """An error the client can see: its HTTP status, stable `code` and `title`; the class
    docstring says what the code means (served at /problems/<code>). Raised as is, a 400."""

    status = 400
    code = "invalid_request"
    title = "Invalid request"

    def __init__(self, detail: str, param: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.param = param
        self.extra = extra


class InvalidRequest(LedgerError):
    """The request is malformed: JSON that does not parse, a body that is not an object, a
    missing, unknown or wrong-typed field, an amount outside 1..10^15, an unknown currency, a bad
    list parameter, a NUL character, a balance that would overflow. `param` names the input."""


class NotFound(LedgerError):
    """No such object, or another merchant's (the two are answered alike), or no such path."""

    status = 404
    code = "not_found"
    title = "Not found"


class CurrencyMismatch(LedgerError):
    """An account of the request holds another currency than the request's; `param` names it."""

    status = 400
    code = "currency_mismatch"
    title = "Currency mismatch"


class InsufficientFunds(LedgerError):
    """The balance is smaller than the amount. A payment is still recorded, as failed (the
    `payment` member), and `payment.failed` is emitted."""

    status = 402
    code = "insufficient_funds"
    title = "Insufficient funds"


class RiskDeclined(LedgerError):
    """A risk rule of the merchant refused the payment (single-payment limit, payments per
    minute). The payment is recorded as failed, like `insufficient_funds`."""

    status = 402
    code = "risk_declined"
    title = "Declined by a risk rule"


class RefundExceedsPayment(LedgerError):
    """The refund would make the payment's refunds exceed its amount."""

    status = 409
    code = "refund_exceeds_payment"
    title = "Refund exceeds payment"
