"""digest ledger on the delivery, digest cursors in their own table, the builder's heartbeat

The ledger kept one `digest_entries` row per digest delivery, with its own three indexes, and a run
moved every due reader's `subscribers.digest_cursor`, which rewrote each subscriber row and its four
indexes. Now a digest delivery points at its run's distinct content (`digest_contents`, a few dozen rows
a run), and cursors live in the narrow `digest_cursors`. Every entry and cursor is carried over.
`campaigns.built_at` records when a run's builder last committed a batch.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

import mailer.models

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), 'sqlite')
CHUNK = 5000


def _key(sections: Any) -> str:
    """The same key the builder writes (mailer.digests.content_key): SHA-256 of the JSON text."""
    return hashlib.sha256(json.dumps(sections).encode()).hexdigest()


def _loaded(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def upgrade() -> None:
    op.create_table('digest_contents',
    sa.Column('id', BIGID, nullable=False),
    sa.Column('campaign_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('sections', sa.JSON(), nullable=False),
    sa.Column('created_at', mailer.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['campaign_id'], ['campaigns.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('campaign_id', 'key', name='uq_digest_contents_campaign_key')
    )
    with op.batch_alter_table('digest_contents', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_digest_contents_created_at'), ['created_at'], unique=False)

    op.create_table('digest_cursors',
    sa.Column('subscriber_id', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('at', mailer.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['subscriber_id'], ['subscribers.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('subscriber_id'),
    postgresql_with={'fillfactor': 50}
    )

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('content_id', BIGID, nullable=True))
        batch_op.create_foreign_key('fk_deliveries_content_id_digest_contents', 'digest_contents',
                                    ['content_id'], ['id'], ondelete='CASCADE')
        batch_op.drop_index('ix_deliveries_subscriber')
        batch_op.create_index('ix_deliveries_subscriber_content', ['subscriber_id', 'content_id'], unique=False)

    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.add_column(sa.Column('built_at', mailer.models.UTCDateTime(), nullable=True))

    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        _carry_entries_over_in_sql(bind)
    else:
        _carry_entries_over(bind)
    bind.execute(sa.text("INSERT INTO digest_cursors (subscriber_id, at) "
                         "SELECT id, digest_cursor FROM subscribers WHERE digest_cursor IS NOT NULL"))

    if bind.dialect.name == 'sqlite':
        # In place, not a batch rebuild: a rebuilt table would lose AUTOINCREMENT and its high-water mark,
        # and a deleted subscriber's id (which old links carry) could be handed out again.
        op.execute("ALTER TABLE subscribers DROP COLUMN digest_cursor")
    else:
        op.drop_column('subscribers', 'digest_cursor')

    with op.batch_alter_table('digest_entries', schema=None) as batch_op:
        batch_op.drop_index('ix_digest_entries_reader')
    op.drop_table('digest_entries')


def _carry_entries_over_in_sql(bind: sa.Connection) -> None:
    """PostgreSQL: one content per distinct (run, sections text), then every delivery's pointer, as two
    set-based statements. `json` keeps its text as written, which was json.dumps of the sections, so
    the key is the one the builder computes."""
    bind.execute(sa.text(
        "INSERT INTO digest_contents (campaign_id, key, sections, created_at) "
        "SELECT campaign_id, key, min(sections)::json, min(created_at) FROM ("
        "  SELECT d.campaign_id, encode(sha256(convert_to(e.sections::text, 'UTF8')), 'hex') AS key, "
        "         e.sections::text AS sections, e.created_at "
        "  FROM digest_entries e JOIN deliveries d ON d.id = e.delivery_id) AS t "
        "GROUP BY campaign_id, key"))
    bind.execute(sa.text(
        "UPDATE deliveries SET content_id = c.id FROM digest_entries e, digest_contents c "
        "WHERE e.delivery_id = deliveries.id AND c.campaign_id = deliveries.campaign_id "
        "AND c.key = encode(sha256(convert_to(e.sections::text, 'UTF8')), 'hex')"))


def _carry_entries_over(bind: sa.Connection) -> None:
    """SQLite: one content per distinct (run, sections); each delivery points at its own. The entries are
    read in id order, in chunks, so a large ledger is never held in memory at once."""
    contents: dict[tuple[int, str], int] = {}
    last = 0
    while True:
        rows = bind.execute(sa.text(
            "SELECT e.id, e.delivery_id, d.campaign_id, e.created_at, e.sections FROM digest_entries e "
            "JOIN deliveries d ON d.id = e.delivery_id WHERE e.id > :last ORDER BY e.id LIMIT :chunk"),
            {"last": last, "chunk": CHUNK}).all()
        if not rows:
            return
        pointers = []
        for entry_id, delivery_id, campaign_id, created_at, sections in rows:
            sections = _loaded(sections)
            key = _key(sections)
            content_id = contents.get((campaign_id, key))
            if content_id is None:
                content_id = contents[(campaign_id, key)] = bind.execute(sa.text(
                    "INSERT INTO digest_contents (campaign_id, key, sections, created_at) "
                    "VALUES (:campaign_id, :key, :sections, :created_at) RETURNING id"),
                    {"campaign_id": campaign_id, "key": key, "sections": json.dumps(sections),
                     "created_at": created_at}).scalar_one()
            pointers.append({"content_id": content_id, "delivery_id": delivery_id})
            last = entry_id
        bind.execute(sa.text("UPDATE deliveries SET content_id = :content_id WHERE id = :delivery_id"), pointers)


def downgrade() -> None:
    op.create_table('digest_entries',
    sa.Column('id', BIGID, nullable=False),
    sa.Column('delivery_id', BIGID, nullable=False),
    sa.Column('subscriber_id', sa.Integer(), nullable=False),
    sa.Column('sections', sa.JSON(), nullable=False),
    sa.Column('created_at', mailer.models.UTCDateTime(), nullable=False),
    sa.ForeignKeyConstraint(['delivery_id'], ['deliveries.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['subscriber_id'], ['subscribers.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('delivery_id')
    )
    with op.batch_alter_table('digest_entries', schema=None) as batch_op:
        batch_op.create_index('ix_digest_entries_reader', ['subscriber_id', 'created_at'], unique=False)
    with op.batch_alter_table('subscribers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('digest_cursor', mailer.models.UTCDateTime(), nullable=True))

    bind = op.get_bind()
    bind.execute(sa.text(
        "INSERT INTO digest_entries (delivery_id, subscriber_id, sections, created_at) "
        "SELECT d.id, d.subscriber_id, c.sections, c.created_at FROM deliveries d "
        "JOIN digest_contents c ON c.id = d.content_id"))
    bind.execute(sa.text("UPDATE subscribers SET digest_cursor = (SELECT at FROM digest_cursors "
                         "WHERE digest_cursors.subscriber_id = subscribers.id)"))

    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_subscriber_content')
        batch_op.create_index('ix_deliveries_subscriber', ['subscriber_id'], unique=False)
        batch_op.drop_constraint('fk_deliveries_content_id_digest_contents', type_='foreignkey')
        batch_op.drop_column('content_id')
    op.drop_table('digest_cursors')
    with op.batch_alter_table('campaigns', schema=None) as batch_op:
        batch_op.drop_column('built_at')
    with op.batch_alter_table('digest_contents', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_digest_contents_created_at'))
    op.drop_table('digest_contents')
