"""product variants by edition, country, locale and price point; deliveries

Revision ID: 0004
Revises: 0003
"""
# ruff: noqa
from alembic import op
import sqlalchemy as sa
import sqlmodel


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('productvariant', schema=None) as batch_op:
        batch_op.add_column(sa.Column('edition', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=True))
        batch_op.add_column(sa.Column('country_code', sqlmodel.sql.sqltypes.AutoString(length=2), nullable=True))
        batch_op.add_column(sa.Column('locale', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True))
        batch_op.add_column(sa.Column('price_point_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True))
        batch_op.add_column(sa.Column('quantity', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('is_default', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_foreign_key('fk_productvariant_country_code_country', 'country', ['country_code'], ['code'])
        batch_op.create_foreign_key('fk_productvariant_price_point_id_pricepoint', 'pricepoint', ['price_point_id'], ['id'])
        batch_op.create_index('ix_productvariant_selection', ['product_id', 'edition', 'country_code'], unique=False)

    # the variants seeded before 0004 are the editions' global defaults, named "<product>-<edition>";
    # the next seeding fills in the rest
    op.execute("UPDATE productvariant SET edition = substr(id, length(product_id) + 2)")
    with op.batch_alter_table('productvariant', schema=None) as batch_op:
        batch_op.alter_column('edition', existing_type=sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False)

    op.create_table('delivery',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('grant_id', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('subscription_id', sa.Integer(), nullable=False),
    sa.Column('subscriber_id', sa.Integer(), nullable=False),
    sa.Column('cycle', sa.Integer(), nullable=False),
    sa.Column('product_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('variant_id', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('sku', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('quantity', sa.Integer(), nullable=True),
    sa.Column('until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('paid_minor', sa.Integer(), nullable=False),
    sa.Column('currency', sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('sends', sa.Integer(), nullable=False),
    sa.Column('entitlement_id', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('revoke_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['variant_id'], ['productvariant.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('grant_id')
    )
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_delivery_state'), ['state'], unique=False)
        batch_op.create_index(batch_op.f('ix_delivery_subscription_id'), ['subscription_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_delivery_subscription_id'))
        batch_op.drop_index(batch_op.f('ix_delivery_state'))
    op.drop_table('delivery')
    # the generated variants go; the editions' global defaults stay, as before 0004
    op.execute("DELETE FROM productvariant WHERE id <> product_id || '-' || edition")
    with op.batch_alter_table('productvariant', schema=None) as batch_op:
        batch_op.drop_index('ix_productvariant_selection')
        batch_op.drop_constraint('fk_productvariant_price_point_id_pricepoint', type_='foreignkey')
        batch_op.drop_constraint('fk_productvariant_country_code_country', type_='foreignkey')
        batch_op.drop_column('is_default')
        batch_op.drop_column('quantity')
        batch_op.drop_column('price_point_id')
        batch_op.drop_column('locale')
        batch_op.drop_column('country_code')
        batch_op.drop_column('edition')
