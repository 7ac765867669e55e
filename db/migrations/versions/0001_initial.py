"""Initial schema: ledger, idempotency, webhook endpoints, reports and the outbox.

Revision ID: 0001
Revises: 
Create Date: 2026-11-27 01:44:09.999482
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

SQL_UP = [
    # A queue table: rows turn over fast. Analyze and vacuum it far more often than the defaults
    # (10% / 20% of the table), so the claim's plan never works from "the queue is empty"
    # statistics while a backlog has built up, and dead tuples do not pile up under SKIP LOCKED.
    """
    ALTER TABLE outbox.deliveries SET (
        autovacuum_analyze_scale_factor = 0.01, autovacuum_analyze_threshold = 500,
        autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 500)
    """,
    """
    CREATE FUNCTION outbox.type_matches(patterns text[], event_type text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT EXISTS (
            SELECT 1 FROM unnest(patterns) AS p
            WHERE p = '*' OR p = event_type
               OR (right(p, 2) = '.*' AND left(event_type, length(p) - 1) = left(p, -1))
        )
    $$
    """,
    "COMMENT ON FUNCTION outbox.type_matches(text[], text) IS "
    "'True when an event type matches one of the patterns: *, prefix.* or an exact type.'",
    """
    CREATE VIEW outbox.backlog AS
    SELECT c.name AS consumer,
           c.kind,
           c.merchant_id,
           c.enabled,
           p.pending,
           p.in_flight,
           (SELECT count(*) FROM outbox.deliveries d
             WHERE d.consumer = c.name AND d.status = 'dead') AS dead,
           (SELECT count(*) FROM outbox.deliveries d
             WHERE d.consumer = c.name AND d.status = 'delivered'
               AND d.delivered_at > now() - interval '5 minutes') AS delivered_5m,
           now() - p.oldest AS oldest_pending_age
    FROM outbox.consumers c
    CROSS JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.lease_token IS NULL) AS pending,
               count(*) FILTER (WHERE d.lease_token IS NOT NULL) AS in_flight,
               min(d.created_at) AS oldest
        FROM outbox.deliveries d
        WHERE d.consumer = c.name AND d.status = 'pending'
    ) AS p
    """,
    "COMMENT ON VIEW outbox.backlog IS 'One row per consumer: what waits, what is being "
    "delivered, what is dead, and how old the oldest waiting event is.'",
    """
    CREATE VIEW outbox.dead_letters AS
    SELECT d.consumer, d.event_id AS event, e.type, e.subject, d.attempts,
           d.last_status_code, d.last_error, d.dead_since, e.time AS event_time
    FROM outbox.deliveries d
    JOIN outbox.events e ON e.id = d.event_id
    WHERE d.status = 'dead'
    """,
    "COMMENT ON VIEW outbox.dead_letters IS 'Deliveries that ran out of retries, newest "
    "first when ordered by dead_since; redrive with paymentsctl outbox redrive.'",
    """
    INSERT INTO outbox.consumers (name, kind, merchant_id, event_types)
    VALUES ('reports', 'handler', NULL,
            ARRAY['deposit.succeeded', 'payment.succeeded', 'refund.succeeded', 'payout.paid'])
    """,
]

VIEW_COLUMN_COMMENTS = {
    "backlog": {
        "consumer": "Consumer name: endpoint id (we_...) or handler name.",
        "kind": "webhook or handler.",
        "merchant_id": "Owning merchant of a webhook endpoint; NULL for handlers.",
        "enabled": "False while a webhook endpoint is disabled (its deliveries wait).",
        "pending": "Deliveries waiting for an attempt.",
        "in_flight": "Deliveries claimed by a relay right now (or whose lease has not expired).",
        "dead": "Deliveries that ran out of retries.",
        "delivered_5m": "Deliveries acknowledged in the last 5 minutes.",
        "oldest_pending_age": "Age of the oldest undelivered event.",
    },
    "dead_letters": {
        "consumer": "Consumer name.",
        "event": "Event id.",
        "type": "Event type.",
        "subject": "Ordering key of the event.",
        "attempts": "Attempts made.",
        "last_status_code": "HTTP status of the last attempt.",
        "last_error": "Error of the last attempt.",
        "dead_since": "When the retry schedule ran out.",
        "event_time": "When the event happened.",
    },
}
for _view, _columns in VIEW_COLUMN_COMMENTS.items():
    for _column, _comment in _columns.items():
        SQL_UP.append(
            f"COMMENT ON COLUMN outbox.{_view}.{_column} IS '{_comment.replace(chr(39), chr(39) * 2)}'"
        )

SQL_DOWN = [
    "DROP VIEW IF EXISTS outbox.dead_letters",
    "DROP VIEW IF EXISTS outbox.backlog",
    "DROP FUNCTION IF EXISTS outbox.type_matches(text[], text)",
]


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS outbox")
    op.execute("COMMENT ON SCHEMA outbox IS 'Transactional outbox: events, consumers, deliveries.'")
    op.create_table('daily_reports',
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('day', sa.Date(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('payments_count', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('payments_amount', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('refunds_amount', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('deposits_amount', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('payouts_amount', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.PrimaryKeyConstraint('merchant_id', 'day', 'currency', name=op.f('pk_daily_reports')),
    comment='Daily totals per merchant and currency, maintained by the reports handler consumer.'
    )
    op.create_table('merchants',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('risk_max_amount', sa.BigInteger(), server_default=sa.text('1000000000000000'), nullable=False),
    sa.Column('risk_max_payments_per_minute', sa.Integer(), server_default=sa.text('600'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_merchants')),
    comment='A tenant of the API. Every object belongs to one merchant.'
    )
    op.create_table('attempts',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False, comment='Attempt number.'),
    sa.Column('consumer', sa.Text(), nullable=False, comment='outbox.consumers.name.'),
    sa.Column('event_id', sa.Text(), nullable=False, comment='outbox.events.id.'),
    sa.Column('attempted_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When it ended.'),
    sa.Column('status_code', sa.Integer(), nullable=True, comment='HTTP status, NULL when no answer came.'),
    sa.Column('latency_ms', sa.Integer(), nullable=True, comment='Duration of the attempt.'),
    sa.Column('error', sa.Text(), nullable=True, comment='Why it failed, NULL on success.'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_attempts')),
    schema='outbox',
    comment='Log of webhook attempts (status, latency, error), newest last.'
    )
    op.create_index(op.f('ix_attempts_attempted_at'), 'attempts', ['attempted_at'], unique=False, schema='outbox')
    op.create_index(op.f('ix_attempts_consumer_event_id'), 'attempts', ['consumer', 'event_id'], unique=False, schema='outbox')
    op.create_table('consumers',
    sa.Column('name', sa.Text(), nullable=False, comment='Endpoint id (we_…) or handler name.'),
    sa.Column('kind', sa.Text(), nullable=False, comment='webhook or handler.'),
    sa.Column('merchant_id', sa.Text(), nullable=True, comment='Webhooks: owning merchant. Handlers: NULL (all).'),
    sa.Column('event_types', postgresql.ARRAY(sa.Text()), nullable=False, comment='Patterns: *, prefix.*, exact.'),
    sa.Column('enabled', sa.Boolean(), server_default=sa.text('true'), nullable=False, comment='False while disabled: no new fan-out, pending deliveries parked.'),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When the consumer was registered; it receives events from then on.'),
    sa.CheckConstraint("kind IN ('webhook', 'handler')", name=op.f('ck_consumers_kind')),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_consumers')),
    schema='outbox',
    comment='Who receives events. Fan-out writes one delivery per matching enabled consumer.'
    )
    op.create_index(op.f('ix_consumers_merchant_id'), 'consumers', ['merchant_id'], unique=False, schema='outbox')
    op.create_table('deliveries',
    sa.Column('consumer', sa.Text(), nullable=False, comment='outbox.consumers.name.'),
    sa.Column('event_id', sa.Text(), nullable=False, comment='outbox.events.id.'),
    sa.Column('subject', sa.Text(), nullable=False, comment="Copy of the event's subject."),
    sa.Column('sequence', sa.BigInteger(), nullable=False, comment="Copy of the event's sequence."),
    sa.Column('status', sa.Text(), server_default=sa.text("'pending'"), nullable=False, comment='pending, delivered or dead.'),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False, comment='Attempts made so far.'),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='Pending: when it may be claimed. A claim pushes it to the end of the lease.'),
    sa.Column('lease_token', sa.UUID(), nullable=True, comment='Token of the current claim; completion must present it.'),
    sa.Column('leased_by', sa.Text(), nullable=True, comment='Relay that holds the lease (host:pid).'),
    sa.Column('last_attempt_at', sa.DateTime(timezone=True), nullable=True, comment='When the latest attempt ended.'),
    sa.Column('last_status_code', sa.Integer(), nullable=True, comment='HTTP status of the latest attempt.'),
    sa.Column('last_error', sa.Text(), nullable=True, comment='Error of the latest attempt, if any.'),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True, comment='When the consumer acknowledged it.'),
    sa.Column('dead_since', sa.DateTime(timezone=True), nullable=True, comment='When the retry schedule ran out.'),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When the event was published.'),
    sa.CheckConstraint("status IN ('pending', 'delivered', 'dead')", name=op.f('ck_deliveries_status')),
    sa.PrimaryKeyConstraint('consumer', 'event_id', name=op.f('pk_deliveries')),
    schema='outbox',
    comment='One row per (consumer, event): the delivery state machine the relays work on.'
    )
    op.create_index('ix_deliveries_consumer_delivered', 'deliveries', ['consumer', 'delivered_at'], unique=False, schema='outbox', postgresql_where=sa.text("status = 'delivered'"))
    op.create_index('ix_deliveries_event_id', 'deliveries', ['event_id'], unique=False, schema='outbox')
    op.create_index('ix_deliveries_claim', 'deliveries', ['next_attempt_at'], unique=False, schema='outbox', postgresql_where=sa.text("status = 'pending'"))
    op.create_index('ix_deliveries_dead', 'deliveries', ['consumer', 'dead_since'], unique=False, schema='outbox', postgresql_where=sa.text("status = 'dead'"))
    op.create_index('ix_deliveries_delivered', 'deliveries', ['delivered_at'], unique=False, schema='outbox', postgresql_where=sa.text("status = 'delivered'"))
    op.create_index('ix_deliveries_subject_pending', 'deliveries', ['consumer', 'subject', 'sequence'], unique=False, schema='outbox', postgresql_where=sa.text("status = 'pending'"))
    op.create_table('events',
    sa.Column('id', sa.Text(), nullable=False, comment='evt_ id; the webhook-id of every delivery.'),
    sa.Column('merchant_id', sa.Text(), nullable=True, comment='Owner of the event; webhooks only see their own.'),
    sa.Column('type', sa.Text(), nullable=False, comment='Event type, e.g. payment.succeeded.'),
    sa.Column('subject', sa.Text(), nullable=False, comment='Ordering key: the object id.'),
    sa.Column('sequence', sa.BigInteger(), nullable=False, comment='1, 2, 3 ... per subject.'),
    sa.Column('time', sa.DateTime(timezone=True), nullable=False, comment='When the event happened (transaction time).'),
    sa.Column('data', postgresql.JSONB(astext_type=sa.Text()), nullable=False, comment='The object the event is about.'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_events')),
    sa.UniqueConstraint('subject', 'sequence', name=op.f('uq_events_subject_sequence')),
    schema='outbox',
    comment='Events, written in the same transaction as the change they describe.'
    )
    op.create_index(op.f('ix_events_time'), 'events', ['time'], unique=False, schema='outbox')
    op.create_index(op.f('ix_events_merchant_id_id'), 'events', ['merchant_id', 'id'], unique=False, schema='outbox')
    op.create_index(op.f('ix_events_merchant_id_type_id'), 'events', ['merchant_id', 'type', 'id'], unique=False, schema='outbox')
    op.create_table('sleepers',
    sa.Column('relay', sa.Text(), nullable=False, comment='host:pid of a relay that is idle.'),
    sa.Column('since', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False, comment='When it went to sleep.'),
    sa.PrimaryKeyConstraint('relay', name=op.f('pk_sleepers')),
    schema='outbox',
    comment='Relays waiting for NOTIFY. Publishers notify only while a row exists here.'
    )
    op.create_table('subjects',
    sa.Column('subject', sa.Text(), nullable=False, comment='Ordering key (an object id).'),
    sa.Column('last_sequence', sa.BigInteger(), nullable=False, comment="Sequence of the subject's latest event; the next event gets this + 1."),
    sa.PrimaryKeyConstraint('subject', name=op.f('pk_subjects')),
    schema='outbox',
    comment="Per-subject event counters. The row lock serialises a subject's publishers, so sequences are gap-free and in commit order."
    )
    op.create_table('accounts',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False, comment='customer, or a system account: funding (deposits) or settlement (payouts).'),
    sa.Column('balance', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("kind <> 'customer' OR balance >= 0", name=op.f('ck_accounts_customer_balance_non_negative')),
    sa.CheckConstraint("kind IN ('customer', 'funding', 'settlement')", name=op.f('ck_accounts_kind')),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_accounts_merchant_id_merchants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_accounts')),
    comment='Ledger accounts, one currency each. Balances change only with ledger entries.'
    )
    op.create_index(op.f('ix_accounts_merchant_id_id'), 'accounts', ['merchant_id', 'id'], unique=False)
    op.create_index('uq_accounts_system', 'accounts', ['merchant_id', 'currency', 'kind'], unique=True, postgresql_where=sa.text("kind <> 'customer'"))
    op.create_table('api_keys',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('key_hash', sa.LargeBinary(), nullable=False, comment='SHA-256 of the secret key.'),
    sa.Column('key_hint', sa.Text(), nullable=False, comment='Last four characters, for people.'),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_api_keys_merchant_id_merchants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash')),
    comment='Secret API keys, stored only as hashes.'
    )
    op.create_index(op.f('ix_api_keys_merchant_id'), 'api_keys', ['merchant_id'], unique=False)
    op.create_table('idempotency_keys',
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('route', sa.Text(), nullable=False, comment='METHOD and path of the first request.'),
    sa.Column('request_hash', sa.LargeBinary(), nullable=False),
    sa.Column('response_status', sa.SmallInteger(), nullable=False),
    sa.Column('response_body', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_idempotency_keys_merchant_id_merchants')),
    sa.PrimaryKeyConstraint('merchant_id', 'key', name=op.f('pk_idempotency_keys')),
    comment='Idempotency keys, written in the transaction of the request they protect.'
    )
    op.create_index(op.f('ix_idempotency_keys_created_at'), 'idempotency_keys', ['created_at'], unique=False)
    op.create_table('webhook_endpoints',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('event_types', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('status', sa.Text(), server_default=sa.text("'enabled'"), nullable=False),
    sa.Column('secret', sa.Text(), nullable=False, comment='whsec_ signing secret.'),
    sa.Column('previous_secret', sa.Text(), nullable=True, comment='The secret before the last rotation; requests are signed with it too until previous_secret_expires_at.'),
    sa.Column('previous_secret_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('disabled_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('(previous_secret IS NULL) = (previous_secret_expires_at IS NULL)', name=op.f('ck_webhook_endpoints_previous_secret')),
    sa.CheckConstraint("status IN ('enabled', 'disabled')", name=op.f('ck_webhook_endpoints_status')),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_webhook_endpoints_merchant_id_merchants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_endpoints'))
    )
    op.create_index(op.f('ix_webhook_endpoints_merchant_id_id'), 'webhook_endpoints', ['merchant_id', 'id'], unique=False)
    op.create_table('deposits',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('account_id', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_deposits_account_id_accounts')),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_deposits_merchant_id_merchants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deposits'))
    )
    op.create_index(op.f('ix_deposits_merchant_id_id'), 'deposits', ['merchant_id', 'id'], unique=False)
    op.create_table('ledger_entries',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('account_id', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False, comment='Signed: credit > 0, debit < 0.'),
    sa.Column('balance_after', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('ref', sa.Text(), nullable=False, comment='Id of the deposit, payment, refund or payout.'),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_ledger_entries_account_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_entries')),
    comment='Append-only double-entry lines; the entries of one movement sum to zero.'
    )
    op.create_index(op.f('ix_ledger_entries_account_id_id'), 'ledger_entries', ['account_id', 'id'], unique=False)
    op.create_index(op.f('ix_ledger_entries_ref'), 'ledger_entries', ['ref'], unique=False)
    op.create_table('payments',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('source_id', sa.Text(), nullable=False),
    sa.Column('destination_id', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('amount_refunded', sa.BigInteger(), server_default=sa.text('0'), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('failure_code', sa.Text(), nullable=True),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint('amount_refunded >= 0 AND amount_refunded <= amount', name=op.f('ck_payments_refund_bounds')),
    sa.ForeignKeyConstraint(['destination_id'], ['accounts.id'], name=op.f('fk_payments_destination_id_accounts')),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_payments_merchant_id_merchants')),
    sa.ForeignKeyConstraint(['source_id'], ['accounts.id'], name=op.f('fk_payments_source_id_accounts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payments'))
    )
    op.create_index(op.f('ix_payments_merchant_id_id'), 'payments', ['merchant_id', 'id'], unique=False)
    op.create_index(op.f('ix_payments_source_id_created_at'), 'payments', ['source_id', 'created_at'], unique=False)
    op.create_table('payouts',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('account_id', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], name=op.f('fk_payouts_account_id_accounts')),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_payouts_merchant_id_merchants')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_payouts'))
    )
    op.create_index(op.f('ix_payouts_merchant_id_id'), 'payouts', ['merchant_id', 'id'], unique=False)
    op.create_table('refunds',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('merchant_id', sa.Text(), nullable=False),
    sa.Column('payment_id', sa.Text(), nullable=False),
    sa.Column('amount', sa.BigInteger(), nullable=False),
    sa.Column('currency', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['merchant_id'], ['merchants.id'], name=op.f('fk_refunds_merchant_id_merchants')),
    sa.ForeignKeyConstraint(['payment_id'], ['payments.id'], name=op.f('fk_refunds_payment_id_payments')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_refunds'))
    )
    op.create_index(op.f('ix_refunds_payment_id'), 'refunds', ['payment_id'], unique=False)
    for statement in SQL_UP:
        op.execute(statement)


def downgrade() -> None:
    for statement in SQL_DOWN:
        op.execute(statement)
    op.drop_index(op.f('ix_refunds_payment_id'), table_name='refunds')
    op.drop_table('refunds')
    op.drop_index(op.f('ix_payouts_merchant_id_id'), table_name='payouts')
    op.drop_table('payouts')
    op.drop_index(op.f('ix_payments_source_id_created_at'), table_name='payments')
    op.drop_index(op.f('ix_payments_merchant_id_id'), table_name='payments')
    op.drop_table('payments')
    op.drop_index(op.f('ix_ledger_entries_ref'), table_name='ledger_entries')
    op.drop_index(op.f('ix_ledger_entries_account_id_id'), table_name='ledger_entries')
    op.drop_table('ledger_entries')
    op.drop_index(op.f('ix_deposits_merchant_id_id'), table_name='deposits')
    op.drop_table('deposits')
    op.drop_index(op.f('ix_webhook_endpoints_merchant_id_id'), table_name='webhook_endpoints')
    op.drop_table('webhook_endpoints')
    op.drop_index(op.f('ix_idempotency_keys_created_at'), table_name='idempotency_keys')
    op.drop_table('idempotency_keys')
    op.drop_index(op.f('ix_api_keys_merchant_id'), table_name='api_keys')
    op.drop_table('api_keys')
    op.drop_index('uq_accounts_system', table_name='accounts', postgresql_where=sa.text("kind <> 'customer'"))
    op.drop_index(op.f('ix_accounts_merchant_id_id'), table_name='accounts')
    op.drop_table('accounts')
    op.drop_table('subjects', schema='outbox')
    op.drop_table('sleepers', schema='outbox')
    op.drop_index(op.f('ix_events_merchant_id_type_id'), table_name='events', schema='outbox')
    op.drop_index(op.f('ix_events_time'), table_name='events', schema='outbox')
    op.drop_index(op.f('ix_events_merchant_id_id'), table_name='events', schema='outbox')
    op.drop_table('events', schema='outbox')
    op.drop_index('ix_deliveries_subject_pending', table_name='deliveries', schema='outbox', postgresql_where=sa.text("status = 'pending'"))
    op.drop_index('ix_deliveries_delivered', table_name='deliveries', schema='outbox', postgresql_where=sa.text("status = 'delivered'"))
    op.drop_index('ix_deliveries_dead', table_name='deliveries', schema='outbox', postgresql_where=sa.text("status = 'dead'"))
    op.drop_index('ix_deliveries_consumer_delivered', table_name='deliveries', schema='outbox', postgresql_where=sa.text("status = 'delivered'"))
    op.drop_index('ix_deliveries_event_id', table_name='deliveries', schema='outbox')
    op.drop_index('ix_deliveries_claim', table_name='deliveries', schema='outbox', postgresql_where=sa.text("status = 'pending'"))
    op.drop_table('deliveries', schema='outbox')
    op.drop_index(op.f('ix_consumers_merchant_id'), table_name='consumers', schema='outbox')
    op.drop_table('consumers', schema='outbox')
    op.drop_index(op.f('ix_attempts_consumer_event_id'), table_name='attempts', schema='outbox')
    op.drop_index(op.f('ix_attempts_attempted_at'), table_name='attempts', schema='outbox')
    op.drop_table('attempts', schema='outbox')
    op.drop_table('merchants')
    op.drop_table('daily_reports')
    op.execute("DROP SCHEMA IF EXISTS outbox")
