"""inbound: bounces, complaints, mailto unsubscribes

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import mailer.models

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')


def upgrade() -> None:
    op.create_table('inbound_messages',
    sa.Column('id', BIGID, nullable=False),
    sa.Column('channel', sa.String(length=20), nullable=False),
    sa.Column('source_ref', sa.String(length=300), nullable=True),
    sa.Column('received_at', mailer.models.UTCDateTime(), nullable=False),
    sa.Column('mail_from', sa.String(length=500), nullable=False),
    sa.Column('rcpt_to', sa.Text(), nullable=False),
    sa.Column('subject', sa.Text(), nullable=False),
    sa.Column('raw', sa.LargeBinary(), nullable=False),
    sa.Column('kind', sa.Enum('pending', 'unsubscribe', 'bounce', 'delay', 'complaint', 'ignored', 'unclassified',
                              name='inbound_kind', native_enum=False, create_constraint=True, length=20),
              nullable=False),
    sa.Column('severity', sa.String(length=10), nullable=False),
    sa.Column('status_code', sa.String(length=20), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.Column('subscriber_id', sa.Integer(), nullable=True),
    sa.Column('delivery_id', BIGID, nullable=True),
    sa.Column('campaign_id', sa.Integer(), nullable=True),
    sa.Column('processed_at', mailer.models.UTCDateTime(), nullable=True),
    sa.Column('removed_at', mailer.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['subscriber_id'], ['subscribers.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['delivery_id'], ['deliveries.id'], ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('source_ref'),
    sqlite_autoincrement=True,
    )
    with op.batch_alter_table('inbound_messages', schema=None) as batch_op:
        batch_op.create_index('ix_inbound_kind', ['kind', 'id'], unique=False)
        batch_op.create_index('ix_inbound_campaign_kind', ['campaign_id', 'kind'], unique=False)

    with op.batch_alter_table('subscribers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('bounce_score', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('last_bounce_at', mailer.models.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('subscribers', schema=None) as batch_op:
        batch_op.drop_column('last_bounce_at')
        batch_op.drop_column('bounce_score')
    with op.batch_alter_table('inbound_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_inbound_campaign_kind')
        batch_op.drop_index('ix_inbound_kind')
    op.drop_table('inbound_messages')
