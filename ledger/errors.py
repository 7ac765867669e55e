"""Errors of the money-moving layer. Each carries the HTTP status and the contract's code, so the
API translates them in one handler."""

from __future__ import annotations

from typing import Any


class LedgerError(Exception):
    status = 400
    code = "invalid_request"
    title = "Invalid request"

    def __init__(self, detail: str, param: str | None = None, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.param = param
        self.extra = extra


class InvalidRequest(LedgerError):
    pass


class NotFound(LedgerError):
    status = 404
    code = "not_found"
    title = "Not found"


class CurrencyMismatch(LedgerError):
    status = 400
    code = "currency_mismatch"
    title = "Currency mismatch"


class InsufficientFunds(LedgerError):
    status = 402
    code = "insufficient_funds"
    title = "Insufficient funds"


class RiskDeclined(LedgerError):
    status = 402
    code = "risk_declined"
    title = "Declined by a risk rule"


class RefundExceedsPayment(LedgerError):
    status = 409
    code = "refund_exceeds_payment"
    title = "Refund exceeds payment"
