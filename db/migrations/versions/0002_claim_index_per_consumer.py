"""The claim index leads with the consumer: each consumer is claimed on its own.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 20:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.drop_index('ix_deliveries_claim', table_name='deliveries', schema='outbox',
                  postgresql_where=_PENDING)
    op.create_index('ix_deliveries_claim', 'deliveries', ['consumer', 'next_attempt_at'],
                    unique=False, schema='outbox', postgresql_where=_PENDING)


def downgrade() -> None:
    op.drop_index('ix_deliveries_claim', table_name='deliveries', schema='outbox',
                  postgresql_where=_PENDING)
    op.create_index('ix_deliveries_claim', 'deliveries', ['next_attempt_at'],
                    unique=False, schema='outbox', postgresql_where=_PENDING)
