"""`mailer admin …` (console accounts), `mailer subscribers search|show|import|export|unsubscribe|erase`
and `mailer suppressions …`."""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mailer import admins, console, exports, imports, store, subscriptions, suppressions
from mailer.cli_campaigns import choice, fail, table
from mailer.db import session_scope
from mailer.errors import InvalidInput, MailerError
from mailer.models import Status, utcnow
from mailer.subscriptions import Origin

admin_app = typer.Typer(no_args_is_help=True, help="Admin console accounts.")
subscribers_app = typer.Typer(no_args_is_help=True,
                              help="Search, show, import, export, unsubscribe and erase subscribers.")
suppressions_app = typer.Typer(no_args_is_help=True, help="The suppression list.")


@admin_app.command("create")
def create(
    email: str,
    password: Annotated[str | None, typer.Option(
        envvar="MAILER_ADMIN_PASSWORD",
        help="The password; asked for when left out (better: it stays out of the shell history).")] = None,
    reset: Annotated[bool, typer.Option("--reset", help="Give an existing admin a new password.")] = False,
) -> None:
    """Create an admin who can sign in at /admin (argon2-hashed password)."""
    if password is None:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        with session_scope() as session:
            if reset:
                admins.reset_password(session, email=email, password=password)
            else:
                admins.create(session, email=email, password=password)
    except MailerError as error:
        raise fail(error) from None
    typer.echo(f"{'New password set for' if reset else 'Admin created:'} {email.strip().lower()}. Sign in at /admin.")


@admin_app.command("list")
def list_admins() -> None:
    """The console's admins, with their last sign-in."""
    with session_scope() as session:
        for admin in admins.all_admins(session):
            last = admin.last_login_at.strftime("%Y-%m-%d %H:%M UTC") if admin.last_login_at else "never"
            locked = " (locked)" if admin.locked_until and admin.locked_until > utcnow() else ""
            typer.echo(f"{admin.email}\tlast sign-in {last}{locked}")


@admin_app.command("remove")
def remove_admin(email: str) -> None:
    """Remove an admin; their browser sessions end at once."""
    try:
        with session_scope() as session:
            admins.remove(session, email=email)
    except MailerError as error:
        raise fail(error) from None
    typer.echo(f"Removed {email.strip().lower()}; their sessions are closed.")


def _subscriber_id(email: str) -> int:
    _address, key = subscriptions.normalize_email(email)
    with session_scope() as session:
        found = store.subscriber_by_email(session, key)
        if found is None:
            raise InvalidInput("email", f"No subscriber has the address {email.strip()}.")
        return found.id


def _when(moment: datetime | None) -> str:
    return moment.strftime("%Y-%m-%d %H:%M") if moment else ""


@subscribers_app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="Part of the address or the name; empty lists everyone.")] = "",
    status: Annotated[str | None, typer.Option(help="Only subscribers with this status.")] = None,
    after: Annotated[int, typer.Option(help="Start after this subscriber id (to page on).", min=0)] = 0,
    limit: Annotated[int, typer.Option(help="How many to show.", min=1, max=10_000)] = 50,
) -> None:
    """Find subscribers by address or name, as the console's search does (erased ones are left out)."""
    try:
        wanted = choice(Status, status, "--status")
        with session_scope() as session:
            rows = [(s.id, s.email, s.name, s.status.value, s.frequency.value,
                     ", ".join(c.slug for c in s.categories) or "(all)")
                    for s in store.find_subscribers(session, query=query, status=wanted, after_id=after, limit=limit)]
    except MailerError as error:
        raise fail(error) from None
    if not rows:
        typer.echo("Nobody matches.")
        return
    table(["id", "address", "name", "status", "frequency", "categories"], rows)
    if len(rows) == limit:
        typer.echo(f"More: add --after {rows[-1][0]}.")


@subscribers_app.command("show")
def show(email: str) -> None:
    """One subscriber: status, categories, frequency, consent history and recent deliveries."""
    try:
        subscriber_id = _subscriber_id(email)
        with session_scope() as session:
            view = console.subscriber_view(session, subscriber_id)
            s = view.subscriber
            typer.echo(f"{s.email} (subscriber {s.id}){'  ' + s.name if s.name else ''}")
            typer.echo(f"  status {s.status.value}; frequency {s.frequency.value}; time zone "
                       f"{s.timezone or 'the site’s'}")
            typer.echo(f"  categories: {', '.join(c.name for c in s.categories) or 'all'}")
            typer.echo(f"  joined {_when(s.created_at)} UTC" + (f"; confirmed {_when(s.confirmed_at)}"
                                                                 if s.confirmed_at else "")
                       + (f"; unsubscribed {_when(s.unsubscribed_at)}" if s.unsubscribed_at else ""))
            if view.suppressed:
                typer.echo(f"  suppressed: {view.suppressed}")
    except MailerError as error:
        raise fail(error) from None
    typer.echo("\nConsent history (newest first):")
    if view.consent:
        table(["when (UTC)", "what", "channel", "ip"],
              [(_when(e.at), e.action, e.channel, e.ip or "") for e in view.consent])
    else:
        typer.echo("  none")
    typer.echo("\nRecent deliveries (newest first):")
    if view.deliveries:
        table(["campaign", "subject", "state", "sent (UTC)", "code", "reply"],
              [(d.campaign_id, d.subject, d.state, _when(d.sent_at), d.smtp_code, d.smtp_text)
               for d in view.deliveries[:20]])
    else:
        typer.echo("  none")


@subscribers_app.command("unsubscribe")
def unsubscribe(email: str, reason: Annotated[str, typer.Option(help="Why; kept in the audit trail.")]) -> None:
    """Unsubscribe a reader on their behalf (asked by phone, by letter…)."""
    try:
        if not reason.strip():
            raise InvalidInput("--reason", "Say why, in a few words.")
        subscriber_id = _subscriber_id(email)
        with session_scope() as session:
            subscriptions.unsubscribe(session, subscriber_id=subscriber_id, origin=Origin(channel="cli"))
            admins.record(session, actor="cli", action="unsubscribe", target=email.strip(), reason=reason)
    except MailerError as error:
        raise fail(error) from None
    typer.echo(f"Unsubscribed {email.strip()}.")


@suppressions_app.command("list")
def suppression_list(query: Annotated[str, typer.Option(help="Part of the address or reason.")] = "") -> None:
    """The suppression list, newest first."""
    with session_scope() as session:
        for entry in suppressions.entries(session, query=query, limit=1000):
            typer.echo(f"{entry.id}\t{entry.email or '(erased)'}\t{entry.reason}\t{entry.detail}")


@suppressions_app.command("add")
def suppression_add(email: str, reason: Annotated[str, typer.Option(help="Why; kept with the entry.")]) -> None:
    """Suppress an address: it gets no mail of any kind."""
    try:
        with session_scope() as session:
            suppressions.add(session, email=email, reason=reason, actor="cli")
    except MailerError as error:
        raise fail(error) from None
    typer.echo(f"{email.strip()} is suppressed.")


@suppressions_app.command("remove")
def suppression_remove(entry_id: int, reason: Annotated[str, typer.Option(help="Why; kept in the audit trail.")]
                       ) -> None:
    """Remove an entry (its id from `mailer suppressions list`)."""
    try:
        with session_scope() as session:
            suppressions.remove(session, entry_id=entry_id, reason=reason, actor="cli")
    except MailerError as error:
        raise fail(error) from None
    typer.echo(f"Removed entry {entry_id}.")


@subscribers_app.command("import")
def import_csv(
    path: Annotated[Path, typer.Argument(help="A CSV file with columns email, name, categories, frequency, status.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every row and report; change nothing.")] = False,
    default_status: Annotated[str, typer.Option(help="For rows with no status: confirmed or pending.")]
    = "confirmed",
    send_confirmation: Annotated[bool, typer.Option(help="Mail a confirmation link to pending rows.")] = False,
) -> None:
    """Import subscribers from a CSV file, with a progress bar and a report of the rows left out."""
    try:
        if default_status not in {"confirmed", "pending"}:
            raise InvalidInput("--default-status", "Use confirmed or pending.")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise InvalidInput("path", f"Cannot read {path}: {error.strerror}.") from None
        with session_scope() as session:
            job = imports.create_job(session, content=imports.decode(data), filename=path.name, actor="cli",
                                     dry_run=dry_run, default_status=Status(default_status),
                                     send_confirmation=send_confirmation)
            job_id, total = job.id, job.total
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=not sys.stderr.isatty()) as bar:
            task = bar.add_task("Checking" if dry_run else "Importing", total=total)
            imports.run(job_id, progress=lambda done, _total: bar.update(task, completed=done))
        with session_scope() as session:
            report = imports.report(session, job_id)
    except MailerError as error:
        raise fail(error) from None
    counts = report.counts
    verb = "would add" if dry_run else "added"
    typer.echo(f"{report.processed} rows: {verb} {counts['added']}, updated {counts['updated']}, unchanged "
               f"{counts['unchanged']}, skipped {counts['skipped']}, errors {counts['errors']}.")
    if report.message:
        typer.echo(report.message)
    for problem in report.errors[:50]:
        typer.echo(f"  line {problem['row']}: {problem['email']}: {problem['error']}")
    if len(report.errors) > 50:
        typer.echo(f"  … and {len(report.errors) - 50} more (see /admin/import/{job_id}).")
    if report.state == "failed":
        raise typer.Exit(1)


@subscribers_app.command("export")
def export(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of standard output.")] = None,
    status: Annotated[str | None, typer.Option(help="Only subscribers with this status.")] = None,
) -> None:
    """Export subscribers as CSV, in the columns `import` takes."""
    if status is not None and status not in Status.__members__:
        typer.secho(f"Error: --status: use one of {', '.join(Status.__members__)}.", fg="red", err=True)
        raise typer.Exit(1)
    wanted = Status(status) if status else None
    with (out.open("w", encoding="utf-8", newline="") if out else sys.stdout) as stream:
        for chunk in exports.csv_lines(status=wanted):
            stream.write(chunk)


@subscribers_app.command("erase")
def erase(
    email: str,
    reason: Annotated[str, typer.Option(help="Why, e.g. 'request by mail on 2026-11-20'; kept in the audit trail.")],
) -> None:
    """Erase a subscriber's personal data (GDPR art. 17); the address stays suppressed as a hash."""
    try:
        if not reason.strip():
            raise InvalidInput("--reason", "Say why, in a few words.")
        _address, key = subscriptions.normalize_email(email)
        with session_scope() as session:
            found = store.subscriber_by_email(session, key)
            if found is None:
                raise InvalidInput("email", f"No subscriber has the address {email.strip()}.")
            subscriptions.erase(session, subscriber_id=found.id, reason=reason, origin=Origin(channel="cli"))
            admins.record(session, actor="cli", action="erase", target=f"subscriber {found.id}", reason=reason)
    except MailerError as error:
        raise fail(error) from None
    typer.echo(f"Erased subscriber {found.id}; the address stays on the suppression list as a hash.")
