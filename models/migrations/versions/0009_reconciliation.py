"""reconciliation with the carriers' settlement reports: runs per carrier and day, their items

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'reconciliationrun',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('carrier_id', sa.String(length=64), nullable=False),
        sa.Column('day', sa.Date(), nullable=False),
        sa.Column('final', sa.Boolean(), nullable=False),
        sa.Column('report_rows', sa.Integer(), nullable=False),
        sa.Column('missing', sa.Integer(), nullable=False),
        sa.Column('extra', sa.Integer(), nullable=False),
        sa.Column('amount_differs', sa.Integer(), nullable=False),
        sa.Column('reconciled', sa.Integer(), nullable=False),
        sa.Column('not_charged', sa.Integer(), nullable=False),
        sa.Column('unresolved', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('carrier_id', 'day'),
    )
    op.create_index('ix_reconciliationrun_carrier_id', 'reconciliationrun', ['carrier_id'])
    op.create_index('ix_reconciliationrun_day', 'reconciliationrun', ['day'])
    op.create_table(
        'reconciliationitem',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('run_id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('match_key', sa.String(length=200), nullable=False),
        sa.Column('idempotency_key', sa.String(length=128), nullable=True),
        sa.Column('carrier_reference', sa.String(), nullable=True),
        sa.Column('ledger_amount_minor', sa.Integer(), nullable=True),
        sa.Column('report_amount_minor', sa.Integer(), nullable=True),
        sa.Column('currency', sa.String(length=3), nullable=False),
        sa.Column('resolution', sa.String(length=16), nullable=True),
        sa.Column('detail', sa.String(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['reconciliationrun.id']),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('run_id', 'kind', 'match_key'),
    )
    op.create_index('ix_reconciliationitem_run_id', 'reconciliationitem', ['run_id'])
    op.create_index('ix_reconciliationitem_idempotency_key', 'reconciliationitem',
                    ['idempotency_key'])


def downgrade() -> None:
    op.drop_index('ix_reconciliationitem_idempotency_key', table_name='reconciliationitem')
    op.drop_index('ix_reconciliationitem_run_id', table_name='reconciliationitem')
    op.drop_table('reconciliationitem')
    op.drop_index('ix_reconciliationrun_day', table_name='reconciliationrun')
    op.drop_index('ix_reconciliationrun_carrier_id', table_name='reconciliationrun')
    op.drop_table('reconciliationrun')
