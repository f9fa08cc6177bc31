"""ledger: the full price a partial payment relates to; kinds up to 16 characters

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (no table rebuild on SQLite): the ledger's append-only triggers stay
    op.add_column('ledgerentry', sa.Column('list_price_minor', sa.Integer(), nullable=True))
    if op.get_bind().dialect.name == 'postgresql':  # SQLite does not enforce lengths
        op.alter_column('ledgerentry', 'kind', type_=sa.String(16),
                        existing_type=sa.String(8), existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column('ledgerentry', 'kind', type_=sa.String(8),
                        existing_type=sa.String(16), existing_nullable=False)
    op.drop_column('ledgerentry', 'list_price_minor')
