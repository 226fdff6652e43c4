"""Alembic environment: the URL comes from mailer's settings, the schema from mailer.models."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from mailer.db import engine_for
from mailer.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""
if not url:
    from mailer.config import get_settings

    url = get_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection") or engine_for(url)
    with connectable.connect() as connection:
        if connection.dialect.name == "sqlite":
            _run_on_sqlite(connection)
            return
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


def _run_on_sqlite(connection: Connection) -> None:
    """SQLite cannot ALTER most things in place: batch mode rebuilds the table, copying it and dropping
    the old one. With foreign keys on, SQLite's DROP TABLE first deletes every row, and ON DELETE CASCADE
    would empty the tables that point at it. So the keys are off while migrations run (the pragma only
    takes effect outside a transaction), all of them run in one transaction, and if any ran, the keys
    are checked before it commits."""
    if connection.in_transaction():
        raise RuntimeError("SQLite migrations need a connection outside a transaction, to turn foreign keys off")
    _foreign_keys(connection, on=False)
    try:
        applied: list[object] = []
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                          transactional_ddl=True, on_version_apply=lambda **step: applied.append(step))
        try:
            with context.begin_transaction():
                context.run_migrations()
                broken = _broken_keys(connection) if applied else []
                if broken:
                    raise _BrokenKeys(broken)
        except _BrokenKeys as error:
            # Rolled back. Say whether the migration broke them or they were broken before it ran.
            connection.rollback()
            before = _broken_keys(connection)
            table, row, parent = error.rows[0][:3]
            if before:
                raise RuntimeError(f"{len(before)} rows already point at rows that do not exist (the first: {table} "
                                   f"row {row}, in {parent}); mend them, then migrate again. Nothing was changed.") \
                    from None
            raise RuntimeError(f"after migrating, {len(error.rows)} rows would point at rows that do not exist (the "
                               f"first: {table} row {row}, in {parent}); nothing was changed") from None
    finally:
        connection.rollback()
        try:
            _foreign_keys(connection, on=True)
        except Exception:
            # Never hand a connection with its keys off back to the pool the app uses.
            connection.invalidate()
            raise


class _BrokenKeys(Exception):
    def __init__(self, rows: list[Any]) -> None:
        super().__init__(f"{len(rows)} rows point nowhere")
        self.rows = rows


def _broken_keys(connection: Connection) -> list[Any]:
    return list(connection.exec_driver_sql("PRAGMA foreign_key_check").all())


def _foreign_keys(connection: Connection, *, on: bool) -> None:
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")
    if bool(driver.execute("PRAGMA foreign_keys").fetchone()[0]) is not on:
        raise RuntimeError("SQLite did not change foreign_keys; a transaction is open on this connection")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
