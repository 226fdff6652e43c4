"""`mailer campaign …`: create, preview, test, send (with a live progress bar) or schedule, status, pause,
resume, cancel, and the delivery log. The same `mailer.*` calls as the API and the console."""

from __future__ import annotations

import enum
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mailer import campaigns, queue
from mailer import console as views
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidInput, MailerError
from mailer.models import DeliveryState

app = typer.Typer(no_args_is_help=True, help="Broadcast campaigns.")
E = TypeVar("E", bound=enum.Enum)
console = Console()


def fail(error: MailerError, options: Mapping[str, str] | None = None) -> typer.Exit:
    """Print a deliberate error as one line naming the field, and return the exit to raise.
    `options` names the command-line option for a library field (at → --at), so the reader knows
    which of their words to change."""
    field = getattr(error, "field", None)
    field = (options or {}).get(field or "", field)
    prefix = f"{field}: " if field else ""
    typer.secho(f"Error: {prefix}{getattr(error, 'message', None) or error}", fg="red", err=True)
    return typer.Exit(1)


def _read(path: str, what: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        typer.secho(f"Error: --{what}: cannot read {path}: {error}", fg="red", err=True)
        raise typer.Exit(1) from None


def _show(campaign_id: int) -> campaigns.Progress:
    with session_scope() as session:
        return campaigns.progress(session, campaign_id)


def _print(progress: campaigns.Progress) -> None:
    counts = ", ".join(f"{state} {count}" for state, count in progress.counts.items() if count)
    console.print(f"Campaign {progress.id} [bold]{progress.status}[/bold]: {progress.subject!r}")
    if progress.status == "scheduled" and progress.scheduled_at:
        console.print(f"  sends at {progress.scheduled_at.isoformat(timespec='seconds')}")
    console.print(f"  audience {progress.total}; {counts or 'no deliveries yet'}")
    if progress.status_reason:
        console.print(f"  {progress.status_reason}")


def choice(kind: type[E], value: str | None, option: str) -> E | None:
    """The member of `kind` that an option names (None when the option was left out); a sentence listing
    the choices when it names none."""
    if value is None:
        return None
    if value not in kind.__members__:
        raise InvalidInput(option, f"Use one of {', '.join(kind.__members__)}.")
    return kind(value)


def table(headings: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print rows as plain columns: readable in a terminal, and whole when piped (no wrapping, no cut)."""
    cells = [[("" if value is None else str(value)).replace("\n", " ") for value in row] for row in rows]
    widths = [max([len(heading)] + [len(row[i]) for row in cells]) for i, heading in enumerate(headings)]
    for row in [list(headings), *cells]:
        typer.echo("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip())


@app.command()
def create(
    subject: Annotated[str, typer.Option(help="Subject (a Jinja template).")],
    html: Annotated[str | None, typer.Option(help="File with the HTML body, or - for standard input.")] = None,
    markdown: Annotated[str | None, typer.Option(help="Instead of --html: a file with the body in Markdown.")]
    = None,
    text: Annotated[str | None, typer.Option(help="File with the text part; made from the HTML if absent.")] = None,
    category: Annotated[list[str] | None,
                        typer.Option(help="Category slug; repeat for several. None: everyone.")] = None,
) -> None:
    """Create a draft broadcast (body in HTML or Markdown) and print its id."""
    try:
        if (html is None) == (markdown is None):
            raise InvalidInput("--html", "Give the body as --html FILE or as --markdown FILE (one of them).")
        with session_scope() as session:
            campaign = campaigns.create(session, subject=subject, html=_read(html, "html") if html else "",
                                        markdown=_read(markdown, "markdown") if markdown else None,
                                        text=_read(text, "text") if text else "", categories=category or [])
            campaign_id = campaign.id
    except MailerError as error:
        raise fail(error, {"html": "--markdown" if markdown else "--html", "text": "--text",
                           "categories": "--category"}) from None
    console.print(f"Created campaign {campaign_id} (draft). Send it with: mailer campaign send {campaign_id} --wait")


def _wait(campaign_id: int) -> None:
    in_process = not get_settings().broker_url
    progress = _show(campaign_id)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:>7.0f}/s"), TimeRemainingColumn(), console=console) as bar:
        # A campaign that finished before the first look shows its full count, not 0.
        task = bar.add_task(progress.status, total=max(progress.total, 1), completed=progress.done, rate=0.0)
        started, first_done, last_tick = time.monotonic(), progress.done, 0.0
        while progress.status in {"sending", "scheduled"}:
            if in_process and time.monotonic() - last_tick > get_settings().tick_seconds:
                campaigns.tick()
                last_tick = time.monotonic()
            time.sleep(0.5)
            progress = _show(campaign_id)
            rate = (progress.done - first_done) / max(time.monotonic() - started, 1e-6)
            bar.update(task, completed=progress.done, total=max(progress.total, 1), description=progress.status,
                       rate=rate)
    if in_process:
        queue.drain(timeout=60)
    _print(_show(campaign_id))


@app.command()
def send(
    campaign_id: int,
    wait: Annotated[bool, typer.Option("--wait", help="Show live progress until the campaign stops.")] = False,
) -> None:
    """Start sending a campaign (starting it twice starts it once)."""
    try:
        with session_scope() as session:
            started = campaigns.start(session, campaign_id)
    except MailerError as error:
        raise fail(error) from None
    _kick_and_show(campaign_id, moved=started, wait=wait)


def _kick_and_show(campaign_id: int, *, moved: bool, wait: bool) -> None:
    """Start the batch loops of a campaign this command just started or resumed, then show it.

    Without a broker the loops would run in this process, which would then keep sending quietly after
    printing its answer: only with --wait (a progress bar until the campaign stops) do they start here.
    Otherwise a running `mailer serve` (its tick) picks the campaign up."""
    in_process = not get_settings().broker_url
    if moved and (wait or not in_process):
        campaigns.kick(campaign_id)
    if wait:
        _wait(campaign_id)
        return
    _print(_show(campaign_id))
    if in_process:
        console.print("No MAILER_BROKER_URL: a running `mailer serve` sends it, or use --wait to send from here.")


@app.command()
def schedule(
    campaign_id: int,
    at: Annotated[str, typer.Option(help="When, in ISO 8601 with a time zone: 2026-12-01T08:00:00+00:00.")],
) -> None:
    """Schedule a draft (or move a scheduled campaign) to go out at a given time."""
    try:
        try:
            moment = datetime.fromisoformat(at.strip())
        except ValueError:
            raise InvalidInput("at", f"{at!r} is not a time such as 2026-12-01T08:00:00+00:00.") from None
        with session_scope() as session:
            campaigns.schedule(session, campaign_id, moment)
        _print(_show(campaign_id))
    except MailerError as error:
        raise fail(error, {"at": "--at"}) from None


@app.command()
def preview(
    campaign_id: int,
    email: Annotated[str | None, typer.Option(help="As the subscriber with this address; a sample reader "
                                                   "without it.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the HTML part to this file.")] = None,
) -> None:
    """Show the subject and text part as one reader would get them; the HTML part goes to --out."""
    try:
        with session_scope() as session:
            found = views.preview(session, campaign_id, email_address=email)
        if out is not None:
            try:
                out.write_text(found.html, encoding="utf-8")
            except OSError as error:
                raise InvalidInput("--out", f"Cannot write {out}: {error.strerror}.") from None
    except MailerError as error:
        raise fail(error, {"email": "--email"}) from None
    typer.echo(f"To: {found.to}\nSubject: {found.subject}\n\n{found.text.rstrip()}\n")
    typer.echo(f"HTML part written to {out}." if out else "Add --out FILE to save the HTML part.")


@app.command()
def deliveries(
    campaign_id: int,
    state: Annotated[str | None, typer.Option(help="Only deliveries in this state (sent, failed, deferred…).")]
    = None,
    query: Annotated[str, typer.Option(help="Part of the address or of the SMTP reply.")] = "",
    after: Annotated[int, typer.Option(help="Start after this delivery id (to page on).", min=0)] = 0,
    limit: Annotated[int, typer.Option(help="How many to show.", min=1, max=10_000)] = 100,
) -> None:
    """The delivery log: each reader's state, attempts and the SMTP code and reply."""
    try:
        wanted = choice(DeliveryState, state, "--state")
        with session_scope() as session:
            lines = views.delivery_log(session, campaign_id, query=query, after_id=after, limit=limit,
                                       state=wanted)
    except MailerError as error:
        raise fail(error) from None
    if not lines:
        typer.echo("No deliveries match.")
        return
    table(["id", "address", "state", "tries", "sent (UTC)", "code", "reply"],
          [(d.id, d.email, d.state, d.attempts, d.sent_at.strftime("%Y-%m-%d %H:%M:%S") if d.sent_at else "",
            d.smtp_code, d.smtp_text) for d in lines])
    if len(lines) == limit:
        typer.echo(f"More: add --after {lines[-1].id}.")


@app.command()
def status(campaign_id: int) -> None:
    """Show a campaign's status and its deliveries by state."""
    try:
        _print(_show(campaign_id))
    except MailerError as error:
        raise fail(error) from None


def _move(campaign_id: int, action: str, *, wait: bool = False) -> None:
    try:
        with session_scope() as session:
            moved = getattr(campaigns, action)(session, campaign_id)
    except MailerError as error:
        raise fail(error) from None
    if action == "resume":
        _kick_and_show(campaign_id, moved=moved, wait=wait)
        return
    _print(_show(campaign_id))


@app.command()
def pause(campaign_id: int) -> None:
    """Pause a sending campaign; it stops within seconds."""
    _move(campaign_id, "pause")


@app.command()
def resume(
    campaign_id: int,
    wait: Annotated[bool, typer.Option("--wait", help="Show live progress until the campaign stops.")] = False,
) -> None:
    """Resume a paused campaign where it stopped."""
    _move(campaign_id, "resume", wait=wait)


@app.command()
def cancel(campaign_id: int) -> None:
    """Cancel a campaign; nothing more goes out."""
    _move(campaign_id, "cancel")


@app.command()
def test(campaign_id: int, email: Annotated[list[str], typer.Option(help="Address to send the test to.")]) -> None:
    """Send a test of the campaign, marked [Test], to the given addresses."""
    from mailer.subscriptions import normalize_email

    try:
        addresses = [normalize_email(address)[0] for address in email]
        results = campaigns.send_test_sync(campaign_id, addresses)
    except MailerError as error:
        raise fail(error) from None
    for address, result in results.items():
        colour = "green" if result.ok else "red"
        console.print(f"[{colour}]{address}: {result.code} {result.text}[/{colour}]")
    if not all(result.ok for result in results.values()):
        raise typer.Exit(1)
