"""carrier operations and per-subscription key tokens

Revision ID: 0003
Revises: 0002
"""
# ruff: noqa
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('carrieroperation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('kind', sa.String(length=8), nullable=False),
    sa.Column('carrier_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('workflow_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('subscription_id', sa.Integer(), nullable=False),
    sa.Column('cycle', sa.Integer(), nullable=False),
    sa.Column('amount_minor', sa.Integer(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('last_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('ambiguous', sa.Boolean(), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('carrier_reference', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('carrier_code', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('message', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('reported_outcome', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('reported_reference', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('reported_code', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('reported_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('unsettled_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('carrieroperation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_carrieroperation_carrier_id'), ['carrier_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_carrieroperation_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_carrieroperation_subscription_id'), ['subscription_id'], unique=False)

    # existing subscriptions get a token from their id: unique, and never produced by the
    # random generator (which has no 'o'). (A plain ADD COLUMN: a batch rebuild of this table
    # would drop its partial unique index on SQLite.)
    op.add_column('subscription', sa.Column('key_token', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
    op.execute("UPDATE subscription SET key_token = 'o' || CAST(id AS VARCHAR)")
    op.create_index('ix_subscription_key_token', 'subscription', ['key_token'], unique=True)


def downgrade() -> None:
    op.drop_index('ix_subscription_key_token', table_name='subscription')
    with op.batch_alter_table('subscription', schema=None) as batch_op:
        batch_op.drop_column('key_token')
    with op.batch_alter_table('carrieroperation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_carrieroperation_subscription_id'))
        batch_op.drop_index(batch_op.f('ix_carrieroperation_state'))
        batch_op.drop_index(batch_op.f('ix_carrieroperation_carrier_id'))
    op.drop_table('carrieroperation')
