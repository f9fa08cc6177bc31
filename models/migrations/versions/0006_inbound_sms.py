"""inbound SMS (texts subscribers send to our short codes) and the notices we send them

Revision ID: 0006
Revises: 0005
"""
# ruff: noqa
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('inbound_sms',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('carrier_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('dedup_key', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
    sa.Column('smsc_message_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('msisdn', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('short_code', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('text', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('action', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('carrier_id', 'dedup_key')
    )
    with op.batch_alter_table('inbound_sms', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inbound_sms_carrier_id'), ['carrier_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_sms_msisdn'), ['msisdn'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_sms_state'), ['state'], unique=False)

    op.create_table('sms_notice',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('carrier_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('msisdn', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('kind', sqlmodel.sql.sqltypes.AutoString(length=24), nullable=False),
    sa.Column('locale', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('state', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('outcome', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('sms_notice', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_sms_notice_carrier_id'), ['carrier_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('sms_notice', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_sms_notice_carrier_id'))
    op.drop_table('sms_notice')
    with op.batch_alter_table('inbound_sms', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inbound_sms_state'))
        batch_op.drop_index(batch_op.f('ix_inbound_sms_msisdn'))
        batch_op.drop_index(batch_op.f('ix_inbound_sms_carrier_id'))
    op.drop_table('inbound_sms')
