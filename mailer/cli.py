"""The `mailer` command."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from mailer.cli_admin import admin_app, subscribers_app, suppressions_app
from mailer.cli_campaigns import app as campaign_app
from mailer.cli_digests import articles_app, digest_app, preview
from mailer.cli_inbound import app as inbound_app
from mailer.config import Settings, describe_error, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Newsletter and subscriber mailer.")
db_app = typer.Typer(no_args_is_help=True, help="Database schema.")
app.add_typer(db_app, name="db")
app.add_typer(campaign_app, name="campaign")
app.add_typer(articles_app, name="articles")
app.add_typer(digest_app, name="digest")
app.add_typer(inbound_app, name="inbound")
app.command("preview")(preview)
app.add_typer(admin_app, name="admin")
app.add_typer(subscribers_app, name="subscribers")
app.add_typer(suppressions_app, name="suppressions")


def settings() -> Settings:
    """The settings, or a one-sentence error naming the variable and exit code 2."""
    try:
        return get_settings()
    except ValidationError as error:
        typer.secho(f"Configuration error: {describe_error(error)}", fg="red", err=True)
        raise typer.Exit(2) from None


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Bring the database schema up to date."""
    from mailer.logs import configure
    from mailer.migrate import upgrade

    current = settings()
    configure()
    upgrade(current.database_url, revision)
    typer.echo(f"Database is up to date ({current.database_url.split('@')[-1]}).")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
) -> None:
    """Run the web server (public pages, admin API). A SQLite database is migrated first."""
    import uvicorn

    from mailer.logs import configure
    from mailer.migrate import upgrade
    from mailer.web.app import create_app

    current = settings()
    if "base_url" not in current.model_fields_set:
        # Links in mails should point at this server unless MAILER_BASE_URL says otherwise.
        os.environ["MAILER_BASE_URL"] = f"http://{host}:{port}"
        get_settings.cache_clear()
        current = settings()
    configure()
    if current.is_sqlite:
        upgrade(current.database_url)
    current.signing_key()
    where = f"the Maildir {current.outbox_dir.resolve()} (also at /admin/outbox)" if not current.smtp_url else "SMTP"
    tasks = "Celery on " + current.broker_url if current.broker_url else "in-process"
    typer.echo(f"mailer on {current.base_url}: sign-up form at {current.base_url}/subscribe; "
               f"tasks {tasks}; mail to {where}.")
    # Proxy headers are handled by mailer itself (MAILER_TRUSTED_PROXIES), not by uvicorn.
    uvicorn.run(create_app(background=True), host=host, port=port, proxy_headers=False, log_level="info")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except ValidationError as error:
        # Settings are read lazily by most commands; a bad one still ends in one sentence.
        typer.secho(f"Configuration error: {describe_error(error)}", fg="red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
