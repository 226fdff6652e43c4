"""Alembic environment: the URL comes from mailer's settings, the schema from mailer.models."""

from __future__ import annotations

from alembic import context

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
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
