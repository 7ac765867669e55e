"""Table metadata (SQLAlchemy Core): the single description of the schema.

Alembic migrations create exactly this (a test runs `alembic check` against it). Ledger tables live
in `public`, the outbox in the schema `outbox`; every table and column of both has a comment,
because operators read them from psql.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Numeric,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

TS = DateTime(timezone=True)
NOW = text("now()")

# --- merchants and keys -------------------------------------------------------------------------

merchants = Table(
    "merchants",
    metadata,
    Column("id", Text, primary_key=True, comment="mer_ id."),
    Column("name", Text, nullable=False,
           comment="Display name, as given to paymentsctl merchant create."),
    Column("risk_max_amount", BigInteger, nullable=False, server_default=text("1000000000000000"),
           comment="Risk rule: the largest single payment in minor units."),
    Column("risk_max_payments_per_minute", Integer, nullable=False, server_default=text("600"),
           comment="Risk rule: payments per source account per minute."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the merchant was created."),
    comment="A tenant of the API. Every object belongs to one merchant.",
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True, comment="key_ id; paymentsctl key revoke takes it."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False,
           comment="The merchant the key acts for."),
    Column("key_hash", LargeBinary, nullable=False, comment="SHA-256 of the secret key."),
    Column("key_hint", Text, nullable=False, comment="Last four characters, for people."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the key was created."),
    Column("revoked_at", TS, comment="When it was revoked; NULL while it works."),
    UniqueConstraint("key_hash"),
    Index(None, "merchant_id"),
    comment="Secret API keys, stored only as hashes.",
)

# --- the ledger ---------------------------------------------------------------------------------

accounts = Table(
    "accounts",
    metadata,
    Column("id", Text, primary_key=True, comment="acct_ id."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False, comment="Owner."),
    Column("currency", Text, nullable=False,
           comment="ISO 4217 code; every entry of the account is in it."),
    Column(
        "kind",
        Text,
        nullable=False,
        comment="customer, or a system account: funding (deposits) or settlement (payouts).",
    ),
    Column("balance", BigInteger, nullable=False, server_default=text("0"),
           comment="Sum of the account's ledger entries, in minor units."),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb"),
           comment="The merchant's key-value strings."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the account was created."),
    CheckConstraint("kind IN ('customer', 'funding', 'settlement')", name="kind"),
    CheckConstraint("kind <> 'customer' OR balance >= 0", name="customer_balance_non_negative"),
    Index(None, "merchant_id", "id"),
    Index(
        "uq_accounts_system",
        "merchant_id",
        "currency",
        "kind",
        unique=True,
        postgresql_where=text("kind <> 'customer'"),
    ),
    comment="Ledger accounts, one currency each. Balances change only with ledger entries.",
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", Text, primary_key=True,
           comment="ent_ id; an account's entries sort in the order they were applied."),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False,
           comment="The account whose balance the entry changed."),
    Column("amount", BigInteger, nullable=False, comment="Signed: credit > 0, debit < 0."),
    Column("balance_after", BigInteger, nullable=False,
           comment="The account's balance after this entry."),
    Column("currency", Text, nullable=False, comment="The account's currency."),
    Column("ref", Text, nullable=False, comment="Id of the deposit, payment, refund or payout."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the entry was written (transaction time)."),
    Index(None, "account_id", "id"),
    Index(None, "ref"),
    comment="Append-only double-entry lines; the entries of one movement sum to zero.",
)

deposits = Table(
    "deposits",
    metadata,
    Column("id", Text, primary_key=True, comment="dep_ id."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False, comment="Owner."),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False,
           comment="The customer account credited."),
    Column("amount", BigInteger, nullable=False, comment="Minor units, 1 to 10^15."),
    Column("currency", Text, nullable=False, comment="ISO 4217 code."),
    Column("status", Text, nullable=False, comment="Always succeeded."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the deposit was made."),
    Index(None, "merchant_id", "id"),
    comment="Money entering a customer account from the merchant's funding system account.",
)

payments = Table(
    "payments",
    metadata,
    Column("id", Text, primary_key=True, comment="pay_ id."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False, comment="Owner."),
    Column("source_id", Text, ForeignKey("accounts.id"), nullable=False,
           comment="The account debited."),
    Column("destination_id", Text, ForeignKey("accounts.id"), nullable=False,
           comment="The account credited."),
    Column("amount", BigInteger, nullable=False, comment="Minor units, 1 to 10^15."),
    Column("amount_refunded", BigInteger, nullable=False, server_default=text("0"),
           comment="Sum of the payment's refunds."),
    Column("currency", Text, nullable=False, comment="ISO 4217 code."),
    Column("status", Text, nullable=False, comment="succeeded or failed."),
    Column("failure_code", Text,
           comment="insufficient_funds or risk_declined when failed, else NULL."),
    Column("description", Text, comment="The merchant's free text."),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb"),
           comment="The merchant's key-value strings."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the payment was made."),
    CheckConstraint("amount_refunded >= 0 AND amount_refunded <= amount", name="refund_bounds"),
    Index(None, "merchant_id", "id"),
    Index(None, "source_id", "created_at"),
    comment="Payments between two customer accounts of one merchant; failed ones are kept.",
)

refunds = Table(
    "refunds",
    metadata,
    Column("id", Text, primary_key=True, comment="re_ id."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False, comment="Owner."),
    Column("payment_id", Text, ForeignKey("payments.id"), nullable=False,
           comment="The payment refunded."),
    Column("amount", BigInteger, nullable=False, comment="Minor units."),
    Column("currency", Text, nullable=False, comment="The payment's currency."),
    Column("status", Text, nullable=False, comment="Always succeeded."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the refund was made."),
    Index(None, "payment_id"),
    comment="Refunds of payments: money back from the destination to the source.",
)

payouts = Table(
    "payouts",
    metadata,
    Column("id", Text, primary_key=True, comment="po_ id."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False, comment="Owner."),
    Column("account_id", Text, ForeignKey("accounts.id"), nullable=False,
           comment="The customer account debited."),
    Column("amount", BigInteger, nullable=False, comment="Minor units, 1 to 10^15."),
    Column("currency", Text, nullable=False, comment="ISO 4217 code."),
    Column("status", Text, nullable=False, comment="Always paid."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the payout was made."),
    Index(None, "merchant_id", "id"),
    comment="Money leaving a customer account to the merchant's settlement system account.",
)

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False,
           comment="The merchant the key is scoped to."),
    Column("key", Text, nullable=False, comment="The Idempotency-Key header as sent."),
    Column("route", Text, nullable=False, comment="METHOD and path of the first request."),
    Column("request_hash", LargeBinary, nullable=False,
           comment="SHA-256 of the route and the canonical body of the first request."),
    Column("response_status", SmallInteger, nullable=False,
           comment="HTTP status of the first response, replayed with it."),
    Column("response_body", LargeBinary, nullable=False,
           comment="Body of the first response, replayed byte for byte."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the key was first used; kept at least 24 hours."),
    PrimaryKeyConstraint("merchant_id", "key"),
    Index(None, "created_at"),
    comment="Idempotency keys, written in the transaction of the request they protect.",
)

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", Text, primary_key=True,
           comment="we_ id; also its consumer name in outbox.consumers."),
    Column("merchant_id", Text, ForeignKey("merchants.id"), nullable=False,
           comment="Owner; the endpoint receives only this merchant's events."),
    Column("url", Text, nullable=False, comment="Where the events are POSTed."),
    Column("event_types", ARRAY(Text), nullable=False,
           comment="Patterns: *, prefix.*, or an exact type."),
    Column("description", Text, comment="The merchant's free text."),
    Column("status", Text, nullable=False, server_default=text("'enabled'"),
           comment="enabled or disabled (by the merchant, or by a 410 from the endpoint)."),
    Column("secret", Text, nullable=False, comment="whsec_ signing secret."),
    Column(
        "previous_secret",
        Text,
        comment="The secret before the last rotation; requests are signed with it too until"
        " previous_secret_expires_at.",
    ),
    Column("previous_secret_expires_at", TS, comment="When previous_secret stops signing."),
    Column("disabled_reason", Text,
           comment="Why it was disabled, e.g. the endpoint answered 410 Gone."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the endpoint was created."),
    CheckConstraint("status IN ('enabled', 'disabled')", name="status"),
    CheckConstraint(
        "(previous_secret IS NULL) = (previous_secret_expires_at IS NULL)",
        name="previous_secret",
    ),
    Index(None, "merchant_id", "id"),
    comment="Merchants' webhook endpoints; each is an outbox consumer of the same name.",
)

daily_reports = Table(
    "daily_reports",
    metadata,
    Column("merchant_id", Text, nullable=False, comment="The merchant the totals belong to."),
    Column("day", Date, nullable=False, comment="UTC day."),
    Column("currency", Text, nullable=False, comment="ISO 4217 code."),
    Column("payments_count", BigInteger, nullable=False, server_default=text("0"),
           comment="Succeeded payments."),
    # numeric: a day's sum of amounts (each up to 10^15) has no upper bound.
    Column("payments_amount", Numeric, nullable=False, server_default=text("0"),
           comment="Sum of succeeded payments, minor units."),
    Column("refunds_amount", Numeric, nullable=False, server_default=text("0"),
           comment="Sum of refunds, minor units."),
    Column("deposits_amount", Numeric, nullable=False, server_default=text("0"),
           comment="Sum of deposits, minor units."),
    Column("payouts_amount", Numeric, nullable=False, server_default=text("0"),
           comment="Sum of payouts, minor units."),
    PrimaryKeyConstraint("merchant_id", "day", "currency"),
    comment="Daily totals per merchant and currency, maintained by the reports handler consumer.",
)

# --- the outbox ---------------------------------------------------------------------------------

OUTBOX = "outbox"

subjects = Table(
    "subjects",
    metadata,
    Column("subject", Text, primary_key=True, comment="Ordering key (an object id)."),
    Column(
        "last_sequence",
        BigInteger,
        nullable=False,
        comment="Sequence of the subject's latest event; the next event gets this + 1.",
    ),
    schema=OUTBOX,
    comment="Per-subject event counters. The row lock serialises a subject's publishers, "
    "so sequences are gap-free and in commit order.",
)

events = Table(
    "events",
    metadata,
    Column("id", Text, primary_key=True, comment="evt_ id; the webhook-id of every delivery."),
    Column("merchant_id", Text, comment="Owner of the event; webhooks only see their own."),
    Column("type", Text, nullable=False, comment="Event type, e.g. payment.succeeded."),
    Column("subject", Text, nullable=False, comment="Ordering key: the object id."),
    Column("sequence", BigInteger, nullable=False, comment="1, 2, 3 ... per subject."),
    Column("time", TS, nullable=False, comment="When the event happened (transaction time)."),
    Column("data", JSONB, nullable=False, comment="The object the event is about."),
    UniqueConstraint("subject", "sequence"),
    Index(None, "merchant_id", "id"),
    Index(None, "merchant_id", "type", "id"),
    Index(None, "time"),
    schema=OUTBOX,
    comment="Events, written in the same transaction as the change they describe.",
)

consumers = Table(
    "consumers",
    metadata,
    Column("name", Text, primary_key=True, comment="Endpoint id (we_…) or handler name."),
    Column("kind", Text, nullable=False, comment="webhook or handler."),
    Column("merchant_id", Text, comment="Webhooks: owning merchant. Handlers: NULL (all)."),
    Column("event_types", ARRAY(Text), nullable=False, comment="Patterns: *, prefix.*, exact."),
    Column(
        "enabled",
        Boolean,
        nullable=False,
        server_default=text("true"),
        comment="False while disabled: no new fan-out, pending deliveries parked.",
    ),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the consumer was registered; it receives events from then on."),
    CheckConstraint("kind IN ('webhook', 'handler')", name="kind"),
    Index(None, "merchant_id"),
    schema=OUTBOX,
    comment="Who receives events. Fan-out writes one delivery per matching enabled consumer.",
)

deliveries = Table(
    "deliveries",
    metadata,
    Column("consumer", Text, nullable=False, comment="outbox.consumers.name."),
    Column("event_id", Text, nullable=False, comment="outbox.events.id."),
    Column("subject", Text, nullable=False, comment="Copy of the event's subject."),
    Column("sequence", BigInteger, nullable=False, comment="Copy of the event's sequence."),
    Column("status", Text, nullable=False, server_default=text("'pending'"),
           comment="pending, delivered or dead."),
    Column("attempts", Integer, nullable=False, server_default=text("0"),
           comment="Attempts made so far."),
    Column(
        "next_attempt_at",
        TS,
        nullable=False,
        server_default=NOW,
        comment="Pending: when it may be claimed. A claim pushes it to the end of the lease.",
    ),
    Column("lease_token", UUID(as_uuid=True),
           comment="Token of the current claim; completion must present it."),
    Column("leased_by", Text, comment="Relay that holds the lease (host:pid)."),
    Column("last_attempt_at", TS, comment="When the latest attempt ended."),
    Column("last_status_code", Integer, comment="HTTP status of the latest attempt."),
    Column("last_error", Text, comment="Error of the latest attempt, if any."),
    Column("delivered_at", TS, comment="When the consumer acknowledged it."),
    Column("dead_since", TS, comment="When the retry schedule ran out."),
    Column("created_at", TS, nullable=False, server_default=NOW,
           comment="When the event was published."),
    PrimaryKeyConstraint("consumer", "event_id"),
    CheckConstraint("status IN ('pending', 'delivered', 'dead')", name="status"),
    Index(
        "ix_deliveries_claim",
        "consumer",
        "next_attempt_at",
        postgresql_where=text("status = 'pending' AND next_attempt_at < 'infinity'"),
    ),
    Index(
        "ix_deliveries_subject_pending",
        "consumer",
        "subject",
        "sequence",
        postgresql_where=text("status = 'pending'"),
    ),
    Index("ix_deliveries_dead", "consumer", "dead_since", postgresql_where=text("status = 'dead'")),
    Index(
        "ix_deliveries_subject_dead",
        "consumer",
        "subject",
        "sequence",
        postgresql_where=text("status = 'dead'"),
    ),
    Index(
        "ix_deliveries_leased",
        "consumer",
        "subject",
        postgresql_where=text("lease_token IS NOT NULL"),
    ),
    Index(
        "ix_deliveries_delivered",
        "delivered_at",
        postgresql_where=text("status = 'delivered'"),
    ),
    Index(
        "ix_deliveries_consumer_delivered",
        "consumer",
        "delivered_at",
        postgresql_where=text("status = 'delivered'"),
    ),
    Index("ix_deliveries_event_id", "event_id"),
    schema=OUTBOX,
    comment="One row per (consumer, event): the delivery state machine the relays work on.",
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True, comment="Attempt number."),
    Column("consumer", Text, nullable=False, comment="outbox.consumers.name."),
    Column("event_id", Text, nullable=False, comment="outbox.events.id."),
    Column("attempted_at", TS, nullable=False, server_default=NOW, comment="When it ended."),
    Column("status_code", Integer, comment="HTTP status, NULL when no answer came."),
    Column("latency_ms", Integer, comment="Duration of the attempt."),
    Column("error", Text, comment="Why it failed, NULL on success."),
    Index(None, "consumer", "event_id"),
    Index(None, "attempted_at"),
    schema=OUTBOX,
    comment="Log of webhook attempts (status, latency, error), newest last.",
)

sleepers = Table(
    "sleepers",
    metadata,
    Column("relay", Text, primary_key=True, comment="host:pid of a relay that is idle."),
    Column("since", TS, nullable=False, server_default=NOW, comment="When it went to sleep."),
    schema=OUTBOX,
    comment="Relays waiting for NOTIFY. Publishers notify only while a row exists here.",
)
