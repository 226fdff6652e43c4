"""`mailer articles import`, `mailer digest run` and `mailer preview`."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn

from mailer import articles, digests, queue
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidEmail
from mailer.models import Frequency

articles_app = typer.Typer(no_args_is_help=True, help="Articles.")
digest_app = typer.Typer(no_args_is_help=True, help="Category digests.")
console = Console()


def _fetch(location: str) -> bytes:
    if articles.is_url(location):
        request = urllib.request.Request(location, headers={"User-Agent": "mailer/0.1 (+feed import)"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http(s) checked above.
            return bytes(response.read(articles.MAX_FEED_BYTES + 1))
    # No more than the limit is read, so a huge file is reported, not loaded into memory.
    with Path(location).open("rb") as file:
        return file.read(articles.MAX_FEED_BYTES + 1)


@articles_app.command("import")
def import_articles(
    location: Annotated[str, typer.Argument(help="A file or http(s) URL: RSS 2.0, Atom, JSON Feed or a JSON list.")],
    create_categories: Annotated[bool | None, typer.Option(
        help="Create categories the site does not have yet (default: MAILER_CREATE_CATEGORIES).")] = None,
) -> None:
    """Import articles; shows progress and ends with what was new, updated and skipped."""
    try:
        content = _fetch(location)
    except Exception as error:  # Whatever the network or the file system says, the user gets one line.
        typer.secho(f"Error: cannot read {location}: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    report = articles.Report()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("importing…")
        with session_scope() as session:
            base = location if articles.is_url(location) else None
            articles.ingest(session, articles.read_source(content, report, base=base),
                            create_categories=get_settings().create_categories if create_categories is None
                            else create_categories, report=report,
                            progress=lambda n: bar.update(task, description=f"importing… {n} items"))
    for problem in report.problems:
        console.print(f"[yellow]warning:[/yellow] {problem}")
    for what, why in report.skipped[:20]:
        console.print(f"  skipped {what}: {why}")
    if len(report.skipped) > 20:
        console.print(f"  … and {len(report.skipped) - 20} more skipped")
    console.print(report.summary().capitalize() + ".")


@digest_app.command("run")
def run(
    frequency: Annotated[Frequency, typer.Option(help="Which readers: daily or weekly.")],
    wait: Annotated[bool, typer.Option("--wait", help="Send from here and show progress.")] = False,
) -> None:
    """Build this period's digests now and start sending them (running it again does nothing twice)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=console, transient=True) as bar:
        task = bar.add_task("finding readers with something new…")
        results = digests.run_all(frequency, progress=lambda n: bar.update(
            task, description=f"finding readers with something new… {n:,} so far"))
    if not results:
        console.print("Nothing to do.")
        return
    for result in results:
        console.print(f"Digest run {result.campaign_id}: {result.readers:,} readers have something new"
                      + ("." if result.started else " (this period's run already existed)."))
    if wait:
        from mailer.cli_campaigns import _wait

        for result in results:
            assert result.campaign_id is not None
            _wait(result.campaign_id)
    elif not get_settings().broker_url:
        queue.drain(timeout=0)
        console.print("No MAILER_BROKER_URL: a running `mailer serve` sends it, or add --wait.")


def preview(
    email: Annotated[str, typer.Option(help="The reader whose next digest to show.")],
    out: Annotated[Path | None, typer.Option(help="Write the HTML here instead of printing the text.")] = None,
) -> None:
    """Render a reader's next digest without sending or recording it."""
    try:
        rendered = digests.preview(email)
    except InvalidEmail as error:
        typer.secho(f"Error: email: {error.message}", fg="red", err=True)
        raise typer.Exit(1) from None
    if rendered is None:
        console.print(f"{email} has nothing new: no digest would be sent.")
        return
    if out:
        out.write_text(rendered.html, encoding="utf-8")
        console.print(f"Subject: {rendered.subject}\nWrote the HTML to {out}.")
        return
    console.print(f"Subject: {rendered.subject}\n")
    console.print(rendered.text, markup=False, highlight=False)
