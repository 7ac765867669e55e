"""The JSON shapes of ledger objects, as the API returns them and events carry them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from outbox.envelope import rfc3339

Obj = dict[str, Any]


def account(
    id: str, currency: str, balance: int, created_at: datetime, metadata: dict[str, Any]
) -> Obj:
    return {
        "id": id,
        "object": "account",
        "currency": currency,
        "balance": balance,
        "created_at": rfc3339(created_at),
        "metadata": metadata,
    }


def entry(
    id: str, account: str, amount: int, balance_after: int, currency: str, ref: str,
    created_at: datetime,
) -> Obj:
    return {
        "id": id,
        "object": "ledger_entry",
        "account": account,
        "amount": amount,
        "balance_after": balance_after,
        "currency": currency,
        "ref": ref,
        "created_at": rfc3339(created_at),
    }


def deposit(id: str, account: str, amount: int, currency: str, created_at: datetime) -> Obj:
    return {
        "id": id,
        "object": "deposit",
        "account": account,
        "amount": amount,
        "currency": currency,
        "status": "succeeded",
        "created_at": rfc3339(created_at),
    }


def payment(
    id: str, source: str, destination: str, amount: int, amount_refunded: int, currency: str,
    status: str, failure_code: str | None, description: str | None, metadata: dict[str, Any],
    created_at: datetime,
) -> Obj:
    return {
        "id": id,
        "object": "payment",
        "source": source,
        "destination": destination,
        "amount": amount,
        "amount_refunded": amount_refunded,
        "currency": currency,
        "status": status,
        "failure_code": failure_code,
        "description": description,
        "metadata": metadata,
        "created_at": rfc3339(created_at),
    }


def refund(id: str, payment: str, amount: int, currency: str, created_at: datetime) -> Obj:
    return {
        "id": id,
        "object": "refund",
        "payment": payment,
        "amount": amount,
        "currency": currency,
        "status": "succeeded",
        "created_at": rfc3339(created_at),
    }


def payout(id: str, account: str, amount: int, currency: str, created_at: datetime) -> Obj:
    return {
        "id": id,
        "object": "payout",
        "account": account,
        "amount": amount,
        "currency": currency,
        "status": "paid",
        "created_at": rfc3339(created_at),
    }


def balance_changed(
    account: str, currency: str, delta: int, balance: int, cause_object: str, cause_id: str
) -> Obj:
    return {
        "account": account,
        "currency": currency,
        "delta": delta,
        "balance": balance,
        "cause": {"object": cause_object, "id": cause_id},
    }
