"""A subscription waiting for opt-in, paused or suspended still holds its subscriber's one
live subscription per product.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

OLD = "status IN ('active', 'past_due')"
NEW = "status IN ('pending_opt_in', 'active', 'past_due', 'paused', 'suspended')"


def _index(where: str) -> None:
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.drop_index('one_live_subscription_per_product')
        batch_op.create_index('one_live_subscription_per_product', ['subscriber_id', 'product_id'],
                              unique=True, sqlite_where=sa.text(where),
                              postgresql_where=sa.text(where))


def upgrade() -> None:
    _index(NEW)


def downgrade() -> None:
    _index(OLD)
