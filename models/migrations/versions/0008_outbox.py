"""trace_outbox: documents waiting to be indexed into OpenSearch (traceability)

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'trace_outbox',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('doc_id', sa.String(length=160), nullable=False),
        sa.Column('index_name', sa.String(length=64), nullable=False),
        sa.Column('document', sa.String(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('indexed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('last_error', sa.String(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_trace_outbox_doc_id', 'trace_outbox', ['doc_id'])
    op.create_index('ix_trace_outbox_pending', 'trace_outbox', ['indexed_at', 'id'])


def downgrade() -> None:
    op.drop_index('ix_trace_outbox_pending', table_name='trace_outbox')
    op.drop_index('ix_trace_outbox_doc_id', table_name='trace_outbox')
    op.drop_table('trace_outbox')
