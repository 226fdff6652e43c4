"""The migrations keep what is stored: a database with readers, campaigns and a digest ledger is
upgraded to the current schema (and back) on a real SQLite file and a real PostgreSQL database, and
the schema they make is the one the models describe."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from mailer import digests
from mailer.db import engine_for
from mailer.migrate import alembic_config, upgrade
from mailer.models import Base
from tests.conftest import create_pg_database

WHEN = "2026-11-30 07:00:00"


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema yet, of either kind, dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    url, drop = create_pg_database()
    try:
        yield url
    finally:
        engine_for(url).dispose()
        drop()


def _fill_0005(connection: Connection) -> None:
    """Two readers, a broadcast, and a digest run whose ledger has two distinct contents."""
    for n in (1, 2):
        connection.execute(text(
            "INSERT INTO subscribers (id, email, email_key, name, frequency, status, created_at, updated_at, "
            "digest_cursor) VALUES (:n, :e, :e, '', 'daily', 'confirmed', :w, :w, :cursor)"),
            {"n": n, "e": f"r{n}@example.org", "w": WHEN, "cursor": WHEN if n == 1 else None})
        connection.execute(text(
            "INSERT INTO consent_events (subscriber_id, action, at, channel, details) "
            "VALUES (:n, 'confirm', :w, 'web', '{}')"), {"n": n, "w": WHEN})
        connection.execute(text(
            "INSERT INTO notices (subscriber_id, kind, state, created_at) VALUES (:n, 'welcome', 'sent', :w)"),
            {"n": n, "w": WHEN})
    for campaign, kind in ((1, "broadcast"), (2, "digest"), (3, "digest")):
        connection.execute(text(
            "INSERT INTO campaigns (id, kind, subject, html, text, categories, status, status_reason, created_at, "
            "total, building) VALUES (:c, :k, 's', '', '', '[]', 'finished', '', :w, 2, false)"),
            {"c": campaign, "k": kind, "w": WHEN})
    delivery = 0
    for campaign in (1, 2, 3):
        for reader in (1, 2):
            delivery += 1
            connection.execute(text(
                "INSERT INTO deliveries (id, campaign_id, subscriber_id, state, attempts) "
                "VALUES (:d, :c, :r, 'sent', 1)"), {"d": delivery, "c": campaign, "r": reader})
            if campaign == 1:
                continue
            # Both readers got the same digest in run 2; in run 3 they got different ones.
            sections = "[[1, [7, 8], [9]]]" if campaign == 2 or reader == 1 else "[[null, [8], []]]"
            connection.execute(text(
                "INSERT INTO digest_entries (delivery_id, subscriber_id, sections, created_at) "
                "VALUES (:d, :r, :s, :w)"), {"d": delivery, "r": reader, "s": sections, "w": WHEN})


def _count(connection: Connection, table: str) -> int:
    return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def test_the_digest_ledger_and_cursors_are_carried_over_and_back(empty_database: str) -> None:
    upgrade(empty_database, "0005")
    engine = engine_for(empty_database)
    with engine.begin() as connection:
        _fill_0005(connection)
        # The newest subscriber left and was deleted: their id is never handed out again.
        connection.execute(text("INSERT INTO subscribers (id, email, email_key, name, frequency, status, created_at, "
                                "updated_at) VALUES (3, 'gone@example.org', 'gone@example.org', '', 'daily', "
                                "'unsubscribed', :w, :w)"), {"w": WHEN})
        connection.execute(text("DELETE FROM subscribers WHERE id = 3"))

    upgrade(empty_database)
    with engine.begin() as connection:
        # Rebuilding tables on SQLite deleted nothing that points at them.
        assert [_count(connection, t) for t in ("subscribers", "deliveries", "consent_events", "notices")] == \
            [2, 6, 2, 2]
        pointers = dict(connection.execute(text("SELECT id, content_id FROM deliveries")).all())
        assert (pointers[1], pointers[2]) == (None, None), "a broadcast has no digest content"
        assert pointers[3] == pointers[4], "two readers with one digest share one content"
        assert len({pointers[3], pointers[5], pointers[6]}) == 3, "contents are per run and per distinct digest"
        carried = {row[0]: row[1] for row in connection.execute(text(
            "SELECT d.id, c.sections FROM deliveries d JOIN digest_contents c ON c.id = d.content_id"))}
        assert {k: v if isinstance(v, list) else json.loads(v) for k, v in carried.items()} == {
            3: [[1, [7, 8], [9]]], 4: [[1, [7, 8], [9]]], 5: [[1, [7, 8], [9]]], 6: [[None, [8], []]]}
        for key, sections in connection.execute(text("SELECT key, sections FROM digest_contents")):
            loaded = sections if isinstance(sections, list) else json.loads(sections)
            assert key == digests.content_key(json.dumps(loaded)), "carried-over contents keep the builder's key"
        cursors = connection.execute(text("SELECT subscriber_id FROM digest_cursors")).scalars().all()
        assert cursors == [1]
        assert "digest_cursor" not in {c["name"] for c in inspect(connection).get_columns("subscribers")}
        if connection.dialect.name == "sqlite":
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1, \
                "the migration turned foreign keys back on"
            connection.execute(text("INSERT INTO subscribers (email, email_key, name, frequency, status, created_at, "
                                    "updated_at) VALUES ('new@example.org', 'new@example.org', '', 'daily', "
                                    "'pending', :w, :w)"), {"w": WHEN})
            assert connection.execute(text("SELECT max(id) FROM subscribers")).scalar_one() == 4

    from alembic import command

    command.downgrade(alembic_config(empty_database), "0005")
    with engine.begin() as connection:
        assert _count(connection, "deliveries") == 6
        entries = dict(connection.execute(text("SELECT delivery_id, subscriber_id FROM digest_entries")).all())
        assert entries == {3: 1, 4: 2, 5: 1, 6: 2}
        restored = connection.execute(text("SELECT id, digest_cursor FROM subscribers ORDER BY id")).all()
        assert restored[0][1] is not None
        assert restored[1][1] is None


def test_the_migrations_make_the_schema_the_models_describe(empty_database: str) -> None:
    upgrade(empty_database)
    with engine_for(empty_database).connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_a_sqlite_migration_that_would_leave_broken_keys_changes_nothing(tmp_path: Path) -> None:
    """The keys are off while a rebuild runs, and checked before the migration commits: a database that
    holds a row pointing nowhere is not migrated, the operator is told it was broken before, and the
    connection goes back to the pool with its keys on."""
    url = f"sqlite:///{tmp_path / 'orphan.db'}"
    upgrade(url, "0005")
    engine = engine_for(url)
    with engine.begin() as connection:
        _fill_0005(connection)
    raw = sqlite3.connect(tmp_path / "orphan.db")
    raw.execute("INSERT INTO notices (subscriber_id, kind, state, created_at) VALUES (99, 'welcome', 'sent', ?)",
                (WHEN,))
    raw.commit()
    raw.close()
    with pytest.raises(RuntimeError, match=r"already point at rows that do not exist \(the first: notices row"):
        upgrade(url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == "0005"
        assert _count(connection, "digest_entries") == 4
