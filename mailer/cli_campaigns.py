"""`mailer campaign …`: create, send (with a live progress bar), status, pause, resume, cancel, test."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mailer import campaigns, queue
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import MailerError

app = typer.Typer(no_args_is_help=True, help="Broadcast campaigns.")
console = Console()


def fail(error: MailerError) -> typer.Exit:
    """Print a deliberate error as one line naming the field, and return the exit to raise."""
    field = getattr(error, "field", None)
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
    console.print(f"  audience {progress.total}; {counts or 'no deliveries yet'}")
    if progress.status_reason:
        console.print(f"  {progress.status_reason}")


@app.command()
def create(
    subject: Annotated[str, typer.Option(help="Subject (a Jinja template).")],
    html: Annotated[str, typer.Option(help="File with the HTML body, or - for standard input.")],
    text: Annotated[str | None, typer.Option(help="File with the text part; made from the HTML if absent.")] = None,
    category: Annotated[list[str] | None,
                        typer.Option(help="Category slug; repeat for several. None: everyone.")] = None,
) -> None:
    """Create a draft broadcast and print its id."""
    try:
        with session_scope() as session:
            campaign = campaigns.create(session, subject=subject, html=_read(html, "html"),
                                        text=_read(text, "text") if text else "", categories=category or [])
            campaign_id = campaign.id
    except MailerError as error:
        raise fail(error) from None
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
