"""Alembic environment: the URL comes from mailer's settings, the schema from mailer.models."""

from __future__ import annotations

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
    # SQLite cannot ALTER most things in place; batch mode rebuilds the table instead.
    with connectable.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # A rebuild copies the table and drops the old one. With foreign keys on, SQLite's DROP TABLE
            # first deletes every row, and ON DELETE CASCADE would empty the tables that point at it. The
            # pragma takes effect only outside a transaction, so it is set before Alembic begins one,
            # and the keys are checked before the migration commits.
            _foreign_keys(connection, on=False)
        try:
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                    if broken:
                        raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
            connection.commit()
        finally:
            if sqlite:
                _foreign_keys(connection, on=True)


def _foreign_keys(connection: Connection, *, on: bool) -> None:
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")  # type: ignore[union-attr]


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
