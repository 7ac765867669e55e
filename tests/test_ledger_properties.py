"""Property-based tests of the ledger service (ledger/service.py), called directly, without HTTP.

A hypothesis state machine runs random sequences of account creations, deposits, payments,
refunds (partial, repeated, too large) and payouts across accounts in three currencies, mixed with
requests that must be refused (wrong currency, unknown or another merchant's ids, a payment to
itself, refunds of failed payments), and compares the database with a small in-memory model after
every step:

- every customer account's balance and both system accounts (funding, settlement) per currency;
- conservation: per currency, all the merchant's balances (system accounts included) sum to zero;
- the ledger entries of every movement (grouped by `ref`) sum to zero and are the expected lines;
  each account's entries chain (`balance_after` = previous + amount) and end at its balance;
- payments: status and failure code, `amount_refunded <= amount` and equal to the sum of their
  refunds; a failed payment is recorded (with `payment.failed`) and moves no money;
- events: per subject, `sequence` runs 1..n without gaps and the events are the expected ones;
  each account's `account.balance_changed` events chain (balance = previous balance + delta).

A refused request (a `ledger.errors` exception) rolls its transaction back: every row the service
could write, outbox counters included, is exactly as before.

Each example starts from a clean ledger: the previous example's rows are deleted (a few
milliseconds, where TRUNCATE takes a few hundred), leaving only a neighbour merchant's accounts,
payment and refund, whose ids must answer NotFound and whose rows must never change.

The service is async; the test drives one event loop of its own with `run_until_complete`, so
hypothesis stays synchronous.

Budget: `LEDGER_PROPERTY_EXAMPLES` examples (default 40) of up to 30 steps each, about 10 s. A
longer run: `LEDGER_PROPERTY_EXAMPLES=1000 python -m pytest tests/test_ledger_properties.py`.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import AsyncConnection
from psycopg.pq import TransactionStatus

from ledger import service
from ledger.errors import (
    CurrencyMismatch,
    InsufficientFunds,
    InvalidRequest,
    LedgerError,
    NotFound,
    RefundExceedsPayment,
)
from ledger.ids import new_id
from ledger.service import Merchant

T = TypeVar("T")
Call = Callable[[AsyncConnection], Awaitable[Any]]

CURRENCIES = ("USD", "EUR", "JPY")
MAX_AMOUNT = 10**15
EXAMPLES = int(os.environ.get("LEDGER_PROPERTY_EXAMPLES", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Small amounts make refusals (insufficient funds, refunds beyond the payment) frequent; the
# maximum exercises the upper bound. "half"/"rest"/"rest+1" are resolved against the model at run
# time, to hit the boundaries exactly.
amounts = st.one_of(st.integers(1, 3_000), st.just(MAX_AMOUNT))
refund_amounts = st.one_of(
    st.none(), st.integers(1, 3_000), st.sampled_from(["half", "rest", "rest+1"])
)
# As the API accepts it: string keys and values, no NUL characters.
metadata = st.dictionaries(
    st.text("abcxyz_", min_size=1, max_size=6),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
    max_size=3,
)


# --- the model ----------------------------------------------------------------------------------


@dataclass
class ModelAccount:
    currency: str
    metadata: dict[str, Any]
    balance: int = 0


@dataclass
class ModelPayment:
    source: str
    destination: str
    amount: int
    currency: str
    status: str
    failure_code: str | None
    refunds: list[tuple[str, int]] = field(default_factory=list)

    @property
    def refunded(self) -> int:
        return sum(amount for _, amount in self.refunds)


def digest(type_: str, data: dict[str, Any]) -> tuple[Any, ...]:
    """What the checks compare of an event: its type and the fields that matter for it."""
    if type_ == "account.created":
        return (type_, data["id"], data["currency"], data["balance"])
    if type_ == "account.balance_changed":
        cause = data["cause"]
        return (type_, data["account"], data["currency"], data["delta"], data["balance"],
                cause["object"], cause["id"])
    if type_ in ("deposit.succeeded", "payout.paid"):
        return (type_, data["id"], data["account"], data["amount"], data["currency"])
    if type_.startswith("payment."):
        return (type_, data["id"], data["status"], data["failure_code"], data["amount"],
                data["amount_refunded"])
    if type_ == "refund.succeeded":
        return (type_, data["id"], data["payment"], data["amount"])
    raise AssertionError(f"unexpected event type {type_}")


# --- running the service ------------------------------------------------------------------------


class Database:
    """One connection (autocommit: each call below is its own transaction) on a private event
    loop, and a neighbour merchant with a few rows of its own."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn: AsyncConnection = self.run(AsyncConnection.connect(url, autocommit=True))
        # Durability is not under test; waiting for the WAL flush of each commit would dominate.
        self.rows("SELECT set_config('synchronous_commit', 'off', false)")
        self.neighbour = n = self.new_merchant(MAX_AMOUNT, 600)
        self.neighbour_account = self.transact(
            lambda c: service.create_account(c, n, "USD", {})
        )["id"]
        other = self.transact(lambda c: service.create_account(c, n, "USD", {}))["id"]
        self.transact(lambda c: service.create_deposit(c, n, self.neighbour_account, 500, "USD"))
        self.neighbour_payment = self.transact(
            lambda c: service.create_payment(c, n, self.neighbour_account, other, 200, "USD")
        ).payment["id"]
        self.transact(lambda c: service.create_refund(c, n, self.neighbour_payment, 50))

    def close(self) -> None:
        self.run(self.conn.close())
        self.loop.close()

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def transact(self, call: Call, pipeline: bool = False) -> Any:
        """Run `call` in a transaction of its own; in pipeline mode, as the API runs its writes."""

        async def go() -> Any:
            async with self.conn.transaction():
                return await call(self.conn)

        async def go_pipelined() -> Any:
            async with self.conn.pipeline():
                return await go()

        return self.run(go_pipelined() if pipeline else go())

    def rows(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        async def go() -> list[tuple[Any, ...]]:
            cur = await self.conn.execute(query, params)
            return await cur.fetchall()

        return self.run(go())

    def reset(self) -> None:
        """Delete every row but the neighbour's."""

        async def empty(conn: AsyncConnection) -> None:
            async with conn.pipeline():
                for statement in _RESET:
                    await conn.execute(statement, {"n": self.neighbour.id})

        self.transact(empty)

    def new_merchant(self, risk_max_amount: int, per_minute: int) -> Merchant:
        merchant = Merchant(new_id("mer"), risk_max_amount, per_minute)
        self.rows(
            "INSERT INTO merchants (id, name, risk_max_amount, risk_max_payments_per_minute)"
            " VALUES (%s, 'property test', %s, %s) RETURNING id",
            (merchant.id, risk_max_amount, per_minute),
        )
        return merchant

    def snapshot(self) -> dict[str, Any]:
        """The whole database as far as money movements go (it holds one example at a time)."""
        state: dict[str, Any] = self.rows(_SNAPSHOT)[0][0]
        return state


# Child tables first. outbox.consumers stays: it holds the built-in `reports` consumer.
_RESET = (
    "DELETE FROM ledger_entries WHERE account_id NOT IN"
    " (SELECT id FROM accounts WHERE merchant_id = %(n)s)",
    "DELETE FROM refunds WHERE merchant_id <> %(n)s",
    "DELETE FROM payments WHERE merchant_id <> %(n)s",
    "DELETE FROM deposits WHERE merchant_id <> %(n)s",
    "DELETE FROM payouts WHERE merchant_id <> %(n)s",
    "DELETE FROM accounts WHERE merchant_id <> %(n)s",
    "DELETE FROM merchants WHERE id <> %(n)s",
    "DELETE FROM outbox.attempts",
    "DELETE FROM outbox.deliveries WHERE event_id NOT IN"
    " (SELECT id FROM outbox.events WHERE merchant_id = %(n)s)",
    "DELETE FROM outbox.subjects WHERE subject NOT IN"
    " (SELECT subject FROM outbox.events WHERE merchant_id = %(n)s)",
    "DELETE FROM outbox.events WHERE merchant_id <> %(n)s",
)

# Everything of one merchant that the checks compare, in one round trip (JSON arrays of rows).
_MERCHANT_STATE = """
SELECT
  (SELECT coalesce(json_agg(json_build_array(id, currency, kind, balance, metadata)), '[]')
   FROM accounts WHERE merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(e.account_id, e.amount, e.balance_after, e.currency,
                                             e.ref, a.currency) ORDER BY e.id), '[]')
   FROM ledger_entries e JOIN accounts a ON a.id = e.account_id WHERE a.merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(id, source_id, destination_id, amount,
                                             amount_refunded, currency, status, failure_code)),
                   '[]')
   FROM payments WHERE merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(id, payment_id, amount, currency, status)), '[]')
   FROM refunds WHERE merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(id, account_id, amount, currency)), '[]')
   FROM deposits WHERE merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(id, account_id, amount, currency)), '[]')
   FROM payouts WHERE merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(subject, sequence, type, data)
                            ORDER BY subject, sequence), '[]')
   FROM outbox.events WHERE merchant_id = %(m)s),
  (SELECT coalesce(json_agg(json_build_array(subject, last_sequence)), '[]')
   FROM outbox.subjects
   WHERE subject IN (SELECT subject FROM outbox.events WHERE merchant_id = %(m)s)),
  (SELECT json_build_array(
     (SELECT json_agg(json_build_array(id, balance) ORDER BY id)
      FROM accounts WHERE merchant_id = %(n)s),
     (SELECT json_agg(json_build_array(id, amount_refunded) ORDER BY id)
      FROM payments WHERE merchant_id = %(n)s),
     (SELECT count(*) FROM outbox.events WHERE merchant_id = %(n)s)))
"""

# Every row of every table a money movement writes, for "a refused request changed nothing".
_SNAPSHOT = """
SELECT json_build_object(
  'accounts', (SELECT json_agg(t ORDER BY t.id) FROM accounts t),
  'ledger_entries', (SELECT json_agg(t ORDER BY t.id) FROM ledger_entries t),
  'deposits', (SELECT json_agg(t ORDER BY t.id) FROM deposits t),
  'payments', (SELECT json_agg(t ORDER BY t.id) FROM payments t),
  'refunds', (SELECT json_agg(t ORDER BY t.id) FROM refunds t),
  'payouts', (SELECT json_agg(t ORDER BY t.id) FROM payouts t),
  'events', (SELECT json_agg(t ORDER BY t.id) FROM outbox.events t),
  'deliveries', (SELECT json_agg(t ORDER BY t.consumer, t.event_id) FROM outbox.deliveries t),
  'subjects', (SELECT json_agg(t ORDER BY t.subject) FROM outbox.subjects t))
"""


# --- the state machine --------------------------------------------------------------------------


class LedgerMachine(RuleBasedStateMachine):
    db: Database  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.merchant = Merchant("")
        self.model_accounts: dict[str, ModelAccount] = {}
        self.system: dict[tuple[str, str], int] = {}  # (kind, currency) -> balance
        self.model_payments: dict[str, ModelPayment] = {}
        self.deposits: dict[str, tuple[str, int, str]] = {}
        self.payouts: dict[str, tuple[str, int, str]] = {}
        self.refunds: dict[str, tuple[str, int, str]] = {}
        self.entries: dict[str, Counter[tuple[str, int]]] = {}
        self.events: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        self.neighbour: Any = None
        self.pipeline = False

    # --- helpers ---

    def state(self) -> tuple[Any, ...]:
        params = {"m": self.merchant.id, "n": self.db.neighbour.id}
        return self.db.rows(_MERCHANT_STATE, params)[0]

    def neighbour_state(self) -> Any:
        return self.state()[-1]

    def transact(self, call: Call) -> Any:
        return self.db.transact(call, self.pipeline)

    def refused(self, error: type[LedgerError], param: str | None, call: Call) -> None:
        """`call` must raise exactly `error` naming `param`, and leave the database unchanged."""
        before = self.db.snapshot()
        with pytest.raises(LedgerError) as info:
            self.transact(call)
        assert type(info.value) is error, f"expected {error.__name__}, got {info.value!r}"
        assert info.value.param == param, info.value
        assert self.db.conn.info.transaction_status == TransactionStatus.IDLE
        assert self.db.snapshot() == before, "a refused request changed the database"

    def account(
        self,
        data: st.DataObject,
        currency: str | None = None,
        exclude: str | None = None,
        funded: bool = False,
    ) -> str:
        """One of the merchant's accounts (with money in it, if `funded` and there is one)."""
        ids = sorted(
            k for k, a in self.model_accounts.items()
            if currency in (None, a.currency) and k != exclude
        )
        with_money = [k for k in ids if self.model_accounts[k].balance > 0]
        return data.draw(st.sampled_from(with_money if funded and with_money else ids))

    def paying_accounts(self) -> list[str]:
        """Accounts that share their currency with another account."""
        currencies = Counter(a.currency for a in self.model_accounts.values())
        return sorted(k for k, a in self.model_accounts.items() if currencies[a.currency] > 1)

    def balance_event(self, account_id: str, delta: int, cause: str, cause_id: str) -> None:
        acct = self.model_accounts[account_id]
        acct.balance += delta
        self.events[account_id].append(
            ("account.balance_changed", account_id, acct.currency, delta, acct.balance, cause,
             cause_id)
        )

    def payment_event(self, type_: str, payment_id: str) -> tuple[Any, ...]:
        p = self.model_payments[payment_id]
        return (type_, payment_id, p.status, p.failure_code, p.amount, p.refunded)

    @staticmethod
    def spend(balance: int) -> st.SearchStrategy[int]:
        """An amount to take from an account: often affordable, sometimes exactly everything,
        sometimes more than there is."""
        affordable = st.integers(1, balance) if balance > 0 else st.just(1)
        return st.one_of(affordable, st.just(max(1, balance)), st.just(balance + 1), amounts)

    def has_payments(self) -> bool:
        return bool(self.model_payments)

    # --- steps ---

    @initialize(
        risk_max_amount=st.sampled_from([MAX_AMOUNT, 2_000]),
        per_minute=st.sampled_from([600, 3]),
        openings=st.lists(st.one_of(st.none(), amounts), min_size=4, max_size=4),
        pipeline=st.booleans(),
    )
    def start(
        self, risk_max_amount: int, per_minute: int, openings: list[int | None], pipeline: bool
    ) -> None:
        """A clean ledger, a fresh merchant (its risk limits drawn too) with two accounts in each
        of two currencies, so that payments are possible from the first step. The example calls
        the service in pipeline mode (as the API does) or not."""
        self.db.reset()
        self.pipeline = pipeline
        self.neighbour = self.neighbour_state()
        self.merchant = self.db.new_merchant(risk_max_amount, per_minute)
        for currency, opening in zip(("USD", "USD", "EUR", "EUR"), openings, strict=True):
            self.open_account(currency, {}, opening)

    @rule(
        currency=st.sampled_from(CURRENCIES),
        meta=metadata,
        opening=st.one_of(st.none(), amounts),
    )
    def create_account(self, currency: str, meta: dict[str, Any], opening: int | None) -> None:
        self.open_account(currency, meta, opening)

    def open_account(self, currency: str, meta: dict[str, Any], opening: int | None) -> None:
        """A new account, with an opening deposit (its own transaction) unless `opening` is None."""
        obj = self.transact(lambda c: service.create_account(c, self.merchant, currency, meta))
        assert obj["object"] == "account" and obj["id"].startswith("acct_")
        assert (obj["currency"], obj["balance"], obj["metadata"]) == (currency, 0, meta)
        account_id: str = obj["id"]
        self.model_accounts[account_id] = ModelAccount(currency, meta)
        for kind in ("funding", "settlement"):
            self.system.setdefault((kind, currency), 0)
        self.events[account_id].append(("account.created", account_id, currency, 0))
        if opening is not None:
            self.deposit_into(account_id, opening)

    @rule(data=st.data(), amount=amounts)
    def deposit(self, data: st.DataObject, amount: int) -> None:
        self.deposit_into(self.account(data), amount)

    def deposit_into(self, account: str, amount: int) -> None:
        currency = self.model_accounts[account].currency
        obj = self.transact(
            lambda c: service.create_deposit(c, self.merchant, account, amount, currency)
        )
        assert (obj["object"], obj["account"], obj["amount"], obj["currency"], obj["status"]) == (
            "deposit", account, amount, currency, "succeeded")
        dep = obj["id"]
        self.deposits[dep] = (account, amount, currency)
        self.system["funding", currency] -= amount
        self.entries[dep] = Counter({(f"funding:{currency}", -amount): 1, (account, amount): 1})
        self.events[dep].append(("deposit.succeeded", dep, account, amount, currency))
        self.balance_event(account, amount, "deposit", dep)

    @rule(data=st.data(), funded=st.booleans())
    def payout(self, data: st.DataObject, funded: bool) -> None:
        account = self.account(data, funded=funded)
        acct = self.model_accounts[account]
        value = data.draw(self.spend(acct.balance))
        currency = acct.currency

        def call(c: AsyncConnection) -> Awaitable[Any]:
            return service.create_payout(c, self.merchant, account, value, currency)

        if acct.balance < value:
            self.refused(InsufficientFunds, "amount", call)
            return
        obj = self.transact(call)
        assert (obj["object"], obj["account"], obj["amount"], obj["currency"], obj["status"]) == (
            "payout", account, value, currency, "paid")
        po = obj["id"]
        self.payouts[po] = (account, value, currency)
        self.system["settlement", currency] += value
        self.entries[po] = Counter({(f"settlement:{currency}", value): 1, (account, -value): 1})
        self.events[po].append(("payout.paid", po, account, value, currency))
        self.balance_event(account, -value, "payout", po)

    @rule(data=st.data(), funded=st.booleans(), refunds=st.lists(refund_amounts, max_size=3))
    def payment(self, data: st.DataObject, funded: bool, refunds: list[int | str | None]) -> None:
        """A payment, then (each in its own transaction) up to three refunds of it."""
        self.pay(data, funded)
        for amount in refunds:
            self.refund_payment(next(reversed(self.model_payments)), amount)

    def pay(self, data: st.DataObject, funded: bool) -> None:
        candidates = self.paying_accounts()
        with_money = [k for k in candidates if self.model_accounts[k].balance > 0]
        source = data.draw(st.sampled_from(with_money if funded and with_money else candidates))
        src = self.model_accounts[source]
        currency = src.currency
        destination = self.account(data, currency, exclude=source)
        value = data.draw(self.spend(src.balance))

        def call(c: AsyncConnection) -> Awaitable[Any]:
            return service.create_payment(
                c, self.merchant, source, destination, value, currency, "order", {"n": 1}
            )

        recent = sum(1 for p in self.model_payments.values() if p.source == source)
        failure: str | None = None
        if value > self.merchant.risk_max_amount:
            failure = "risk_declined"
        elif recent >= self.merchant.risk_max_payments_per_minute:
            failure = "risk_declined"
        elif src.balance < value:
            failure = "insufficient_funds"

        before = self.db.snapshot()
        result = self.transact(call)
        obj = result.payment
        pay: str = obj["id"]
        status = "failed" if failure else "succeeded"
        assert (result.error.code if result.error else None) == failure, result.error
        assert (obj["object"], obj["source"], obj["destination"], obj["amount"], obj["currency"],
                obj["status"], obj["failure_code"], obj["amount_refunded"]) == (
            "payment", source, destination, value, currency, status, failure, 0)
        self.model_payments[pay] = ModelPayment(
            source, destination, value, currency, status, failure
        )
        if failure:
            # Recorded, but no money moved: balances and entries are as before.
            after = self.db.snapshot()
            for table in ("accounts", "ledger_entries"):
                assert after[table] == before[table], f"a failed payment changed {table}"
            self.events[pay].append(self.payment_event("payment.failed", pay))
            return
        self.entries[pay] = Counter({(source, -value): 1, (destination, value): 1})
        self.events[pay].append(self.payment_event("payment.succeeded", pay))
        self.balance_event(source, -value, "payment", pay)
        self.balance_event(destination, value, "payment", pay)

    @precondition(has_payments)
    @rule(data=st.data(), amount=refund_amounts, refundable=st.booleans())
    def refund(self, data: st.DataObject, amount: int | str | None, refundable: bool) -> None:
        ids = sorted(self.model_payments)
        open_ = [k for k in ids if self.model_payments[k].status == "succeeded"
                 and self.model_payments[k].refunded < self.model_payments[k].amount]
        self.refund_payment(data.draw(st.sampled_from(open_ if refundable and open_ else ids)),
                            amount)

    def refund_payment(self, payment: str, amount: int | str | None) -> None:
        p = self.model_payments[payment]
        remaining = p.amount - p.refunded
        value: int | None
        if amount == "half":
            value = max(1, remaining // 2)
        elif amount == "rest":
            value = max(1, remaining)
        elif amount == "rest+1":
            value = remaining + 1
        else:
            value = None if amount is None else int(amount)

        def call(c: AsyncConnection) -> Awaitable[Any]:
            return service.create_refund(c, self.merchant, payment, value)

        if p.status != "succeeded":
            self.refused(InvalidRequest, None, call)
            return
        wanted = remaining if value is None else value
        if wanted == 0 or wanted > remaining:
            self.refused(RefundExceedsPayment, "amount", call)
            return
        if self.model_accounts[p.destination].balance < wanted:
            self.refused(InsufficientFunds, "amount", call)
            return
        obj = self.transact(call)
        assert (obj["object"], obj["payment"], obj["amount"], obj["currency"], obj["status"]) == (
            "refund", payment, wanted, p.currency, "succeeded")
        re_id: str = obj["id"]
        p.refunds.append((re_id, wanted))
        self.refunds[re_id] = (payment, wanted, p.currency)
        self.entries[re_id] = Counter({(p.destination, -wanted): 1, (p.source, wanted): 1})
        self.events[payment].append(("refund.succeeded", re_id, payment, wanted))
        self.events[payment].append(self.payment_event("payment.refunded", payment))
        self.balance_event(p.destination, -wanted, "refund", re_id)
        self.balance_event(p.source, wanted, "refund", re_id)

    @rule(
        data=st.data(),
        operation=st.sampled_from(
            ["deposit", "payout", "payment source", "payment destination", "payment to itself"]
        ),
    )
    def mismatched(self, data: st.DataObject, operation: str) -> None:
        """Wrong currencies and a payment to its own source are refused before anything moves."""
        account = self.account(data)
        own = self.model_accounts[account].currency
        wrong = data.draw(st.sampled_from([c for c in CURRENCIES if c != own]))
        # Never empty: every example has accounts in USD and in EUR.
        others = sorted(k for k, a in self.model_accounts.items() if a.currency != own)
        call: Call
        error: type[LedgerError]
        if operation == "deposit":
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_deposit(c, self.merchant, account, 10, wrong)
            error, param = CurrencyMismatch, "account"
        elif operation == "payout":
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payout(c, self.merchant, account, 10, wrong)
            error, param = CurrencyMismatch, "account"
        elif operation == "payment source":
            # The source is checked first: its currency differs from the request's, whatever the
            # destination's.
            destination = data.draw(st.sampled_from(others))

            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payment(c, self.merchant, account, destination, 10, wrong)
            error, param = CurrencyMismatch, "source"
        elif operation == "payment destination":
            destination = data.draw(st.sampled_from(others))

            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payment(c, self.merchant, account, destination, 10, own)
            error, param = CurrencyMismatch, "destination"
        else:
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payment(c, self.merchant, account, account, 10, own)
            error, param = InvalidRequest, "destination"
        self.refused(error, param, call)

    @rule(
        data=st.data(),
        operation=st.sampled_from(
            ["deposit", "payout", "payment source", "payment destination", "refund"]
        ),
        foreign=st.booleans(),
    )
    def unknown_or_foreign_id(self, data: st.DataObject, operation: str, foreign: bool) -> None:
        """Another merchant's ids answer exactly like ids that do not exist: NotFound."""
        account = self.account(data)
        other = self.db.neighbour_account if foreign else new_id("acct")
        own = self.model_accounts[account].currency
        call: Call
        if operation == "deposit":
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_deposit(c, self.merchant, other, 10, "USD")
            param = "account"
        elif operation == "payout":
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payout(c, self.merchant, other, 10, "USD")
            param = "account"
        elif operation == "payment source":
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payment(c, self.merchant, other, account, 10, own)
            param = "source"
        elif operation == "payment destination":
            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_payment(c, self.merchant, account, other, 10, own)
            param = "destination"
        else:
            payment_id = self.db.neighbour_payment if foreign else new_id("pay")

            def call(c: AsyncConnection) -> Awaitable[Any]:
                return service.create_refund(c, self.merchant, payment_id, None)
            param = "payment"
        self.refused(NotFound, param, call)

    # --- the checks, after every step ---

    @invariant()
    def database_matches_model(self) -> None:
        rows, entries, payments, refunds, deposits, payouts, events, counters, neighbour = (
            self.state()
        )
        assert neighbour == self.neighbour, "the neighbour merchant's ledger changed"
        key_of: dict[str, str] = {}
        balances: dict[str, int] = {}
        customers: dict[str, tuple[str, int, Any]] = {}
        system: dict[tuple[str, str], int] = {}
        totals: Counter[str] = Counter()
        for id_, currency, kind, balance, meta in rows:
            totals[currency] += balance
            balances[id_] = balance
            if kind == "customer":
                key_of[id_] = id_
                customers[id_] = (currency, balance, meta)
            else:
                key_of[id_] = f"{kind}:{currency}"
                system[kind, currency] = balance
        assert customers == {
            k: (a.currency, a.balance, a.metadata) for k, a in self.model_accounts.items()
        }
        assert system == self.system
        assert all(b >= 0 for _, b, _ in customers.values())
        assert all(total == 0 for total in totals.values()), f"money not conserved: {totals}"

        # Entries: each movement sums to zero and is what the model expects; each account's
        # entries chain to its balance.
        by_ref: dict[str, Counter[tuple[str, int]]] = defaultdict(Counter)
        running: Counter[str] = Counter()
        for account_id, amount, balance_after, currency, ref, account_currency in entries:
            assert currency == account_currency
            by_ref[ref][key_of[account_id], amount] += 1
            running[account_id] += amount
            assert balance_after == running[account_id], "entries do not chain"
        for ref, lines in by_ref.items():
            assert sum(amount * n for (_, amount), n in lines.items()) == 0, ref
        assert by_ref == self.entries
        for account_id, balance in balances.items():
            assert running[account_id] == balance, account_id

        # Business rows.
        refunded: Counter[str] = Counter()
        for _, payment_id, amount, _, status in refunds:
            assert status == "succeeded"
            refunded[payment_id] += amount
        for id_, _, _, amount, amount_refunded, _, _, _ in payments:
            assert 0 <= amount_refunded <= amount
            assert amount_refunded == refunded[id_]
        assert {r[0]: tuple(r[1:]) for r in payments} == {
            k: (p.source, p.destination, p.amount, p.refunded, p.currency, p.status,
                p.failure_code)
            for k, p in self.model_payments.items()
        }
        assert {r[0]: tuple(r[1:4]) for r in refunds} == self.refunds
        assert {r[0]: tuple(r[1:]) for r in deposits} == self.deposits
        assert {r[0]: tuple(r[1:]) for r in payouts} == self.payouts

        # Events: gap-free sequences per subject, the expected events, balance chains.
        seen: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        chain: dict[str, int] = {}
        for subject, sequence, type_, data in events:
            seen[subject].append(digest(type_, data))
            assert sequence == len(seen[subject]), f"sequence gap for {subject}"
            if type_ == "account.balance_changed":
                previous = chain.get(subject, 0)
                assert data["balance"] == previous + data["delta"], "balance_changed chain broke"
                chain[subject] = data["balance"]
        assert seen == dict(self.events)
        for account_id, acct in self.model_accounts.items():
            assert chain.get(account_id, 0) == acct.balance
        # The subjects' counters agree: the next event of a subject continues without a gap.
        assert dict(counters) == {s: len(e) for s, e in self.events.items()}


# --- the test -----------------------------------------------------------------------------------


@pytest.fixture
def database(db_url: str) -> Iterator[Database]:
    db = Database(db_url)
    try:
        yield db
    finally:
        db.close()


def test_ledger_matches_model(database: Database) -> None:
    class Machine(LedgerMachine):
        db = database

    run_state_machine_as_test(Machine, settings=SETTINGS)
