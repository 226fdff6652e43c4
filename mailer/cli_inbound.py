"""`mailer inbound …`: the SMTP listener for bounces and unsubscribe mails, and a mailbox poll on demand."""

from __future__ import annotations

import signal
import threading
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="What comes back: bounces, complaints, unsubscribe mails.")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 2525,
) -> None:
    """Take bounces and unsubscribe mails over SMTP from the site's MTA."""
    from mailer import queue
    from mailer.cli import settings
    from mailer.inbound_smtp import controller
    from mailer.logs import configure

    current = settings()
    configure()
    listener = controller(host, port)
    try:
        listener.start()
    except (OSError, RuntimeError) as error:
        typer.secho(f"Cannot listen on {host}:{port}: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"Taking mail for {current.return_path_base} and {current.unsubscribe_address} "
               f"(with their +tags) on {host}:{port}. Ctrl-C stops.")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        listener.stop()
        # Without a broker, stored messages are processed in this process: let that finish.
        queue.drain(timeout=30)
    typer.echo("Stopped.")


@app.command("poll")
def poll() -> None:
    """Poll MAILER_INBOUND_URL once now (the periodic tick does it every MAILER_INBOUND_POLL_SECONDS)."""
    from mailer import imap, queue
    from mailer.cli import settings
    from mailer.errors import MailboxError
    from mailer.logs import configure

    current = settings()
    configure()
    if not current.inbound_url:
        typer.secho("MAILER_INBOUND_URL is not set: there is no mailbox to poll.", fg="red", err=True)
        raise typer.Exit(2)
    try:
        result = imap.poll()
    except MailboxError as error:
        typer.secho(f"Could not poll the mailbox: {error}", fg="red", err=True)
        raise typer.Exit(1) from None
    queue.drain(timeout=120)
    typer.echo(f"{result['stored']} new message(s) stored; {result['deleted']} understood message(s) deleted.")
