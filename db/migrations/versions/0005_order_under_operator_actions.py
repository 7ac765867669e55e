"""One delivery of a subject in flight whatever operators do; exact daily totals.

- `ix_deliveries_leased (consumer, subject) WHERE lease_token IS NOT NULL`: the claim's
  in-flight check (no other delivery of the subject holds a live lease) probes it. Leases are
  few (what the relays hold), so the index stays small; only a claim adds an entry to it.
- `ix_deliveries_subject_dead (consumer, subject, sequence) WHERE status = 'dead'`: a redrive
  walks a consumer's dead deliveries in subject order through it, so each subject's dead
  deliveries go back together (and are counted once). Deliveries enter it only when they die.
- `outbox.is_first_pending(consumer, subject, sequence)`: the claim's order check again, under a
  snapshot of its own (docs/relay.md, Ordering).
- `daily_reports` amounts become `numeric`: the sum of a day's amounts, each up to 10^15, has no
  upper bound, and `bigint` overflowed after 9,224 payments of 10^15.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_AMOUNTS = ('payments_amount', 'refunds_amount', 'deposits_amount', 'payouts_amount')

# VOLATILE, so each call reads with a snapshot taken at the call, not the calling statement's:
# PostgreSQL re-checks a claim's predicate on a row that changed after the claim's snapshot
# (EvalPlanQual), but its sub-selects still read that old snapshot, where a predecessor that a
# redrive brought back from dead may not be pending yet. plpgsql keeps the query's plan for the
# session. The high COST makes the planner evaluate it after the claim's cheaper conditions.
_IS_FIRST_PENDING = """
CREATE FUNCTION outbox.is_first_pending(p_consumer text, p_subject text, p_sequence bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE COST 100000
AS $fn$
BEGIN
    RETURN NOT EXISTS (
        SELECT 1 FROM outbox.deliveries p
        WHERE p.consumer = p_consumer AND p.subject = p_subject
          AND p.status = 'pending' AND p.sequence < p_sequence);
END
$fn$
"""

_IS_FIRST_PENDING_COMMENT = (
    "COMMENT ON FUNCTION outbox.is_first_pending(text, text, bigint) IS "
    "'True when no pending delivery of the consumer and subject has a smaller sequence, read "
    "with a snapshot taken at the call (the claims'' order check, docs/relay.md).'"
)


def upgrade() -> None:
    op.create_index('ix_deliveries_leased', 'deliveries', ['consumer', 'subject'],
                    unique=False, schema='outbox',
                    postgresql_where=sa.text('lease_token IS NOT NULL'))
    op.create_index('ix_deliveries_subject_dead', 'deliveries',
                    ['consumer', 'subject', 'sequence'], unique=False, schema='outbox',
                    postgresql_where=sa.text("status = 'dead'"))
    op.execute(_IS_FIRST_PENDING)
    op.execute(_IS_FIRST_PENDING_COMMENT)
    for column in _AMOUNTS:
        op.alter_column('daily_reports', column, type_=sa.Numeric(),
                        existing_type=sa.BigInteger(), existing_nullable=False,
                        existing_server_default=sa.text('0'))


def downgrade() -> None:
    for column in _AMOUNTS:
        op.alter_column('daily_reports', column, type_=sa.BigInteger(),
                        existing_type=sa.Numeric(), existing_nullable=False,
                        existing_server_default=sa.text('0'),
                        postgresql_using=f'{column}::bigint')
    op.execute("DROP FUNCTION outbox.is_first_pending(text, text, bigint)")
    op.drop_index('ix_deliveries_subject_dead', table_name='deliveries', schema='outbox',
                  postgresql_where=sa.text("status = 'dead'"))
    op.drop_index('ix_deliveries_leased', table_name='deliveries', schema='outbox',
                  postgresql_where=sa.text('lease_token IS NOT NULL'))
