"""Money movements: accounts, deposits, payments, refunds, payouts.

Every function runs inside the caller's transaction and never commits. Each one
1. locks the rows it depends on (accounts in id order, so opposite transfers cannot deadlock;
   a refund locks its payment first),
2. checks everything that can refuse the request before writing anything,
3. writes ledger entries that sum to zero, the balances, the business row, and publishes the events
   in the same transaction.
Customer balances are kept non-negative by a CHECK constraint as well as by the checks here.
A payment does all of it in one SQL function, `ledger_create_payment` (its hot path: one
statement, no round trips in between); the other movements are written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb

from ledger import objects
from ledger.errors import (
    CurrencyMismatch,
    InsufficientFunds,
    InvalidRequest,
    NotFound,
    RefundExceedsPayment,
    RiskDeclined,
)
from ledger.ids import new_id
from outbox.envelope import NewEvent
from outbox.publish import publish

Obj = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Merchant:
    id: str
    risk_max_amount: int = 10**15
    risk_max_payments_per_minute: int = 600


@dataclass(slots=True)
class _Account:
    id: str
    currency: str
    kind: str
    balance: int


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """A payment is recorded even when it fails; `error` then says why (402)."""

    payment: Obj
    error: InsufficientFunds | RiskDeclined | None = None


# --- accounts -----------------------------------------------------------------------------------

_CREATE_ACCOUNT = """
WITH sys AS (
    INSERT INTO accounts (id, merchant_id, currency, kind)
    VALUES (%(funding)s, %(merchant)s, %(currency)s, 'funding'),
           (%(settlement)s, %(merchant)s, %(currency)s, 'settlement')
    ON CONFLICT DO NOTHING
)
INSERT INTO accounts (id, merchant_id, currency, kind, metadata)
VALUES (%(id)s, %(merchant)s, %(currency)s, 'customer', %(metadata)s)
RETURNING created_at
"""


async def create_account(
    conn: AsyncConnection, merchant: Merchant, currency: str, metadata: dict[str, Any]
) -> Obj:
    account_id = new_id("acct")
    cur = await conn.execute(
        _CREATE_ACCOUNT,
        {
            "id": account_id,
            "funding": new_id("acct"),
            "settlement": new_id("acct"),
            "merchant": merchant.id,
            "currency": currency,
            "metadata": Jsonb(metadata),
        },
    )
    row = await cur.fetchone()
    assert row is not None
    created_at: datetime = row[0]
    obj = objects.account(account_id, currency, 0, created_at, metadata)
    await publish(
        conn, [NewEvent("account.created", account_id, obj, merchant.id)], created_at
    )
    return obj


# --- locking and moving -------------------------------------------------------------------------

_LOCK_ACCOUNTS = """
SELECT id, currency, kind, balance, now()
FROM accounts
WHERE merchant_id = %(merchant)s
  AND id = ANY(%(ids)s::text[] || ARRAY(
        SELECT s.id FROM accounts s
        WHERE s.merchant_id = %(merchant)s AND s.kind = %(kind)s AND s.currency = %(currency)s
            AND s.kind <> 'customer'))
ORDER BY id
FOR UPDATE
"""


async def _lock(
    conn: AsyncConnection,
    merchant: Merchant,
    wanted: dict[str, str],
    currency: str,
    system_kind: str = "",
) -> tuple[dict[str, _Account], _Account | None, datetime]:
    """Lock the merchant's customer accounts `wanted` (id -> request parameter) and, when asked,
    its system account of `system_kind` in `currency`, in id order. Returns the accounts, the
    system account and the transaction time. An unknown or foreign id raises NotFound naming its
    parameter; an account in another currency raises CurrencyMismatch."""
    cur = await conn.execute(
        _LOCK_ACCOUNTS,
        {"merchant": merchant.id, "ids": list(wanted), "kind": system_kind, "currency": currency},
    )
    rows = await cur.fetchall()
    found: dict[str, _Account] = {}
    system: _Account | None = None
    for id_, cur_, kind, balance, _ in rows:
        acct = _Account(id_, cur_, kind, balance)
        if kind == "customer" and id_ in wanted:
            found[id_] = acct
        elif kind == system_kind and cur_ == currency:
            system = acct
    for account_id, param in wanted.items():
        acct_ = found.get(account_id)
        if acct_ is None:
            raise NotFound(f"No such account: {account_id}", param=param)
        if acct_.currency != currency:
            raise CurrencyMismatch(
                f"Account {account_id} holds {acct_.currency}, the request is in {currency}.",
                param=param,
            )
    return found, system, rows[0][4]


_MOVE = """
WITH upd AS (
    UPDATE accounts a SET balance = a.balance + v.delta
    FROM unnest(%s::text[], %s::bigint[]) AS v(id, delta)
    WHERE a.id = v.id
)
INSERT INTO ledger_entries (id, account_id, amount, balance_after, currency, ref, created_at)
SELECT e.id, e.account_id, e.amount, e.balance_after, %s, %s, %s
FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])
     AS e(id, account_id, amount, balance_after)
"""


async def _move(
    conn: AsyncConnection,
    lines: list[tuple[_Account, int]],
    currency: str,
    ref: str,
    now: datetime,
) -> None:
    """Apply ledger lines (account, signed amount) that sum to zero, to locked accounts."""
    assert sum(delta for _, delta in lines) == 0, "ledger lines must sum to zero"
    for acct, delta in lines:
        acct.balance += delta
    ids = [a.id for a, _ in lines]
    deltas = [d for _, d in lines]
    await conn.execute(
        _MOVE,
        (
            ids,
            deltas,
            currency,
            ref,
            now,
            [new_id("ent") for _ in lines],
            ids,
            deltas,
            [a.balance for a, _ in lines],
        ),
    )


def _balance_event(
    merchant: Merchant, acct: _Account, delta: int, cause_object: str, cause_id: str
) -> NewEvent:
    return NewEvent(
        "account.balance_changed",
        acct.id,
        objects.balance_changed(
            acct.id, acct.currency, delta, acct.balance, cause_object, cause_id
        ),
        merchant.id,
    )


# --- deposits -----------------------------------------------------------------------------------


async def create_deposit(
    conn: AsyncConnection, merchant: Merchant, account_id: str, amount: int, currency: str
) -> Obj:
    found, funding, now = await _lock(conn, merchant, {account_id: "account"}, currency, "funding")
    acct = found[account_id]
    assert funding is not None, "a customer account implies its system accounts"
    deposit_id = new_id("dep")
    await _move(conn, [(funding, -amount), (acct, amount)], currency, deposit_id, now)
    await conn.execute(
        "INSERT INTO deposits (id, merchant_id, account_id, amount, currency, status, created_at)"
        " VALUES (%s, %s, %s, %s, %s, 'succeeded', %s)",
        (deposit_id, merchant.id, account_id, amount, currency, now),
    )
    obj = objects.deposit(deposit_id, account_id, amount, currency, now)
    await publish(
        conn,
        [
            NewEvent("deposit.succeeded", deposit_id, obj, merchant.id),
            _balance_event(merchant, acct, amount, "deposit", deposit_id),
        ],
        now,
    )
    return obj


# --- payouts ------------------------------------------------------------------------------------


async def create_payout(
    conn: AsyncConnection, merchant: Merchant, account_id: str, amount: int, currency: str
) -> Obj:
    found, settlement, now = await _lock(
        conn, merchant, {account_id: "account"}, currency, "settlement"
    )
    acct = found[account_id]
    assert settlement is not None, "a customer account implies its system accounts"
    if acct.balance < amount:
        raise InsufficientFunds(
            f"Account {account_id} has {acct.balance}, the payout needs {amount}.",
            param="amount",
        )
    payout_id = new_id("po")
    await _move(conn, [(acct, -amount), (settlement, amount)], currency, payout_id, now)
    await conn.execute(
        "INSERT INTO payouts (id, merchant_id, account_id, amount, currency, status, created_at)"
        " VALUES (%s, %s, %s, %s, %s, 'paid', %s)",
        (payout_id, merchant.id, account_id, amount, currency, now),
    )
    obj = objects.payout(payout_id, account_id, amount, currency, now)
    await publish(
        conn,
        [
            NewEvent("payout.paid", payout_id, obj, merchant.id),
            _balance_event(merchant, acct, -amount, "payout", payout_id),
        ],
        now,
    )
    return obj


# --- payments -----------------------------------------------------------------------------------

# The payment's whole transaction body is the PL/pgSQL function ledger_create_payment
# (db/migrations/versions/0003_payment_functions.py): lock both accounts in id order, check,
# move, record the payment (failed ones too), publish. `api_create_payment` wraps it for the API.
CREATE_PAYMENT = """
SELECT outcome, param, held_currency, source_balance, moved_at, recent_payments
FROM ledger_create_payment(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


async def create_payment(
    conn: AsyncConnection,
    merchant: Merchant,
    source_id: str,
    destination_id: str,
    amount: int,
    currency: str,
    description: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> PaymentResult:
    metadata = metadata or {}
    payment_id = new_id("pay")
    cur = await conn.execute(
        CREATE_PAYMENT,
        (
            merchant.id, merchant.risk_max_amount, merchant.risk_max_payments_per_minute,
            source_id, destination_id, amount, currency, description, Jsonb(metadata),
            payment_id, [new_id("ent"), new_id("ent")], [new_id("evt") for _ in range(3)],
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    outcome, param, held_currency, source_balance, now, _ = row
    if outcome == "same_account":
        raise InvalidRequest("source and destination must be different accounts", "destination")
    account_id = source_id if param == "source" else destination_id
    if outcome == "not_found":
        raise NotFound(f"No such account: {account_id}", param=param)
    if outcome == "currency_mismatch":
        raise CurrencyMismatch(
            f"Account {account_id} holds {held_currency}, the request is in {currency}.",
            param=param,
        )
    error: InsufficientFunds | RiskDeclined | None = None
    if outcome == "risk_amount":
        error = RiskDeclined(
            f"The amount exceeds the merchant's single-payment limit of "
            f"{merchant.risk_max_amount}."
        )
    elif outcome == "risk_velocity":
        error = RiskDeclined(
            f"The source account made {merchant.risk_max_payments_per_minute} payments in "
            "the last minute, the merchant's limit."
        )
    elif outcome == "insufficient_funds":
        error = InsufficientFunds(
            f"Account {source_id} has {source_balance}, the payment needs {amount}.",
            param="amount",
        )
    status = "failed" if error else "succeeded"
    obj = objects.payment(
        payment_id, source_id, destination_id, amount, 0, currency, status,
        error.code if error else None, description, metadata, now,
    )
    return PaymentResult(obj, error)


# --- refunds ------------------------------------------------------------------------------------

_LOCK_PAYMENT = """
SELECT source_id, destination_id, amount, amount_refunded, currency, status, failure_code,
       description, metadata, created_at
FROM payments WHERE id = %s AND merchant_id = %s
FOR UPDATE
"""


async def create_refund(
    conn: AsyncConnection, merchant: Merchant, payment_id: str, amount: int | None
) -> Obj:
    cur = await conn.execute(_LOCK_PAYMENT, (payment_id, merchant.id))
    row = await cur.fetchone()
    if row is None:
        raise NotFound(f"No such payment: {payment_id}", param="payment")
    (source_id, destination_id, paid, refunded, currency, status, failure_code, description,
     metadata, created_at) = row
    if status != "succeeded":
        raise InvalidRequest(f"Payment {payment_id} did not succeed; there is nothing to refund.")
    remaining = paid - refunded
    if amount is None and remaining == 0:
        raise RefundExceedsPayment(
            f"Payment {payment_id} is already fully refunded.", param="amount"
        )
    if amount is None:
        amount = remaining
    if amount > remaining:
        raise RefundExceedsPayment(
            f"Payment {payment_id} has {remaining} left to refund; {amount} was asked.",
            param="amount",
        )
    found, _, now = await _lock(
        conn, merchant, {source_id: "payment", destination_id: "payment"}, currency
    )
    source, destination = found[source_id], found[destination_id]
    if destination.balance < amount:
        raise InsufficientFunds(
            f"Account {destination_id} has {destination.balance}, the refund needs {amount}.",
            param="amount",
        )
    refund_id = new_id("re")
    await _move(conn, [(destination, -amount), (source, amount)], currency, refund_id, now)
    await conn.execute(
        "INSERT INTO refunds (id, merchant_id, payment_id, amount, currency, status, created_at)"
        " VALUES (%s, %s, %s, %s, %s, 'succeeded', %s)",
        (refund_id, merchant.id, payment_id, amount, currency, now),
    )
    await conn.execute(
        "UPDATE payments SET amount_refunded = amount_refunded + %s WHERE id = %s",
        (amount, payment_id),
    )
    refund_obj = objects.refund(refund_id, payment_id, amount, currency, now)
    payment_obj = objects.payment(
        payment_id, source_id, destination_id, paid, refunded + amount, currency, status,
        failure_code, description, metadata, created_at,
    )
    await publish(
        conn,
        [
            NewEvent("refund.succeeded", payment_id, refund_obj, merchant.id),
            NewEvent("payment.refunded", payment_id, payment_obj, merchant.id),
            _balance_event(merchant, destination, -amount, "refund", refund_id),
            _balance_event(merchant, source, amount, "refund", refund_id),
        ],
        now,
    )
    return refund_obj
