"""The claim index holds only due-able deliveries: pending and not parked.

`ix_deliveries_claim` (consumer, next_attempt_at) had the same predicate as
`ix_deliveries_subject_pending` (consumer, subject, sequence), `status = 'pending'`, so every
query on one consumer's pending deliveries could use either. After autovacuum has seen the queue
drained, both indexes are recorded with zero rows and PostgreSQL believes a scan of either
returns one row; it then picked the claim index for the per-subject order checks, which walked a
consumer's whole backlog once per candidate (a 20,000-delivery backlog: seconds per claim).
With `next_attempt_at < 'infinity'` in its predicate, only the claims (which say so) can use the
claim index, and the order checks can use only the subject index. Parked deliveries
('infinity') are never due, so the claims lose nothing.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_PENDING = sa.text("status = 'pending'")
_DUE_ABLE = sa.text("status = 'pending' AND next_attempt_at < 'infinity'")


def upgrade() -> None:
    op.drop_index('ix_deliveries_claim', table_name='deliveries', schema='outbox',
                  postgresql_where=_PENDING)
    op.create_index('ix_deliveries_claim', 'deliveries', ['consumer', 'next_attempt_at'],
                    unique=False, schema='outbox', postgresql_where=_DUE_ABLE)


def downgrade() -> None:
    op.drop_index('ix_deliveries_claim', table_name='deliveries', schema='outbox',
                  postgresql_where=_DUE_ABLE)
    op.create_index('ix_deliveries_claim', 'deliveries', ['consumer', 'next_attempt_at'],
                    unique=False, schema='outbox', postgresql_where=_PENDING)
