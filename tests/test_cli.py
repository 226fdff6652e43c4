"""The command line: settings checked at start, `db upgrade`, and `serve` on a fresh SQLite file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

MAILER = [sys.executable, "-m", "mailer.cli"]


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return subprocess.run([*MAILER, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("MAILER_BASE_URL", "news.example.org", "MAILER_BASE_URL must be an absolute http(s) URL"),
        ("MAILER_DATABASE_URL", "mysql://x/y", "MAILER_DATABASE_URL must be a sqlite:// or postgresql"),
        ("MAILER_DATABASE_URL", "::nonsense", "MAILER_DATABASE_URL is not a database URL"),
        ("MAILER_SMTP_URL", "http://mail", "MAILER_SMTP_URL must be empty or smtp://"),
        ("MAILER_SMTP_URL", "smtp://mail:port", "MAILER_SMTP_URL has a port that is not a number"),
        ("MAILER_SECRET_KEY", "changeme", "MAILER_SECRET_KEY is a placeholder"),
        ("MAILER_FROM", "nobody", "MAILER_FROM must be an address"),
        ("MAILER_CONFIRM_TTL_HOURS", "soon", "MAILER_CONFIRM_TTL_HOURS"),
        ("MAILER_TRUSTED_PROXIES", "10.0.0.0/8,proxy", "MAILER_TRUSTED_PROXIES has 'proxy'"),
        ("MAILER_BROKER_URL", "localhost:6379", "MAILER_BROKER_URL must be empty or a redis://"),
        ("MAILER_INBOUND_URL", "pop3://u:p@mail/INBOX", "MAILER_INBOUND_URL must be empty or imaps://"),
        ("MAILER_BOUNCE_ADDRESS", "bounces", "MAILER_BOUNCE_ADDRESS must be a plain address"),
        ("MAILER_ADDRESS_DELIMITER", "#", "MAILER_ADDRESS_DELIMITER must be one of + - = _"),
        ("MAILER_SENDGRID_PUBLIC_KEY", "not-a-key", "MAILER_SENDGRID_PUBLIC_KEY is not an ECDSA public key"),
        ("MAILER_SNS_CERT_URL_PREFIXES", "ftp://certs", "MAILER_SNS_CERT_URL_PREFIXES has 'ftp://certs'"),
        ("MAILER_TASK_SECONDS", "1201", "MAILER_TASK_SECONDS must be at most 1200 (a third of the broker's"),
    ],
)
def test_bad_setting_stops_with_one_sentence_naming_it(tmp_path: Path, variable: str, value: str, says: str) -> None:
    """A bad value exits with code 2 and a sentence that names the variable, with no traceback."""
    result = run(["db", "upgrade"], tmp_path, **{variable: value})
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    """`mailer db upgrade` migrates an empty SQLite file and seeds the starter categories."""
    result = run(["db", "upgrade"], tmp_path, MAILER_DATABASE_URL=f"sqlite:///{tmp_path}/m.db")
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("select count(*) from categories").fetchone()[0] >= 5


@pytest.mark.slow
def test_serve_migrates_sqlite_and_answers(tmp_path: Path) -> None:
    """`mailer serve` on a fresh directory brings its SQLite database up and serves the form."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    process = subprocess.Popen([*MAILER, "serve", "--port", str(port)], cwd=tmp_path, env=clean,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        form = httpx.get(f"http://127.0.0.1:{port}/subscribe")
        assert "U.S.–Russia Relations" in form.text
        signup = httpx.post(f"http://127.0.0.1:{port}/subscribe", data={"email": "first@example.org"})
        assert signup.status_code == 200
        deadline = time.monotonic() + 10
        while not list((tmp_path / "outbox" / "new").glob("*")):
            assert time.monotonic() < deadline, "no mail in the outbox"
            time.sleep(0.1)
        assert (tmp_path / ".mailer-secret").exists()
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert "MAILER_SECRET_KEY is not set" in output
    assert "Traceback" not in output


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_campaign_commands(tmp_path: Path, env, backend: str, smtp) -> None:  # type: ignore[no-untyped-def]
    """create → send --wait shows progress and ends finished; bad input and wrong moves name the problem."""
    from tests.conftest import base_env, make_readers

    make_readers(25)
    (tmp_path / "body.html").write_text("<p>Dear {{ name }}, sign the petition.</p>")
    settings = base_env(backend, smtp.port, tmp_path / "outbox")
    bad = run(["campaign", "create", "--subject", "Hi", "--html", "body.html", "--category", "nope"], tmp_path,
              **settings)
    assert (bad.returncode, bad.stderr.strip()) == (1, "Error: --category: Unknown category: nope.")
    missing = run(["campaign", "create", "--subject", "Hi", "--html", "missing.html"], tmp_path, **settings)
    assert missing.returncode == 1
    assert "--html: cannot read missing.html" in missing.stderr
    created = run(["campaign", "create", "--subject", "Hi {{ name }}", "--html", "body.html"], tmp_path, **settings)
    assert created.returncode == 0, created.stderr
    campaign_id = created.stdout.split()[2]
    sent = run(["campaign", "send", campaign_id, "--wait"], tmp_path, **settings)
    assert sent.returncode == 0, sent.stderr
    assert "25/25" in sent.stdout
    assert f"Campaign {campaign_id} finished" in sent.stdout
    assert len(smtp.wait_for(25)) == 25
    again = run(["campaign", "pause", campaign_id], tmp_path, **settings)
    assert (again.returncode, again.stderr.strip()) == (1, f"Error: Campaign {campaign_id} is finished; it cannot "
                                                            "become paused.")
    assert "Traceback" not in again.stderr + sent.stderr + bad.stderr


def test_admin_and_subscriber_commands(tmp_path: Path) -> None:
    """`admin create`, then `subscribers import` (with a bad row), `export` and `erase`, with readable output."""
    db = {"MAILER_DATABASE_URL": f"sqlite:///{tmp_path}/m.db", "MAILER_SECRET_KEY": "cli-test-secret-0123456789abcd"}
    assert run(["db", "upgrade"], tmp_path, **db).returncode == 0
    short = run(["admin", "create", "Editor@News.example.org", "--password", "short"], tmp_path, **db)
    assert (short.returncode, short.stderr.strip()) == (1, "Error: password: A password needs at least 10 characters.")
    made = run(["admin", "create", "Editor@News.example.org", "--password", "long enough pass"], tmp_path, **db)
    assert made.returncode == 0, made.stderr
    assert "Admin created: editor@news.example.org" in made.stdout
    again = run(["admin", "create", "editor@news.example.org", "--password", "long enough pass"], tmp_path, **db)
    assert again.returncode == 1
    assert "already exists" in again.stderr
    people = tmp_path / "people.csv"
    people.write_text("email,name,frequency\nann@example.org,Ann,weekly\nnot-an-address,Bad,daily\n", encoding="utf-8")
    imported = run(["subscribers", "import", str(people)], tmp_path, **db)
    assert imported.returncode == 0, imported.stderr
    assert "2 rows: added 1, updated 0, unchanged 0, skipped 0, errors 1." in imported.stdout
    assert "line 3: not-an-address: email:" in imported.stdout
    missing = run(["subscribers", "import", str(tmp_path / "nope.csv")], tmp_path, **db)
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: path: Cannot read")
    exported = run(["subscribers", "export"], tmp_path, **db)
    assert exported.stdout.splitlines()[1].startswith("ann@example.org,Ann,,weekly,confirmed,")
    no_reason = run(["subscribers", "erase", "ann@example.org", "--reason", " "], tmp_path, **db)
    assert no_reason.returncode == 1
    erased = run(["subscribers", "erase", "ANN@example.org", "--reason", "asked by mail"], tmp_path, **db)
    assert erased.returncode == 0, erased.stderr
    assert "ann@" not in run(["subscribers", "export"], tmp_path, **db).stdout
    listed = run(["admin", "list"], tmp_path, **db)
    assert listed.stdout.startswith("editor@news.example.org\tlast sign-in never")
    assert run(["admin", "remove", "editor@news.example.org"], tmp_path, **db).returncode == 0
    assert run(["admin", "list"], tmp_path, **db).stdout == ""
    gone = run(["admin", "remove", "editor@news.example.org"], tmp_path, **db)
    assert (gone.returncode, gone.stderr.strip()) == (1, "Error: email: There is no admin editor@news.example.org.")
    added = run(["suppressions", "add", "trap@example.org", "--reason", "spam trap"], tmp_path, **db)
    assert added.stdout.strip() == "trap@example.org is suppressed."
    entries = run(["suppressions", "list"], tmp_path, **db).stdout.splitlines()
    assert [line.split("\t")[1:] for line in entries] == [
        ["trap@example.org", "admin", "spam trap"], ["(erased)", "erased", "asked by mail"]]
    assert run(["suppressions", "remove", entries[0].split("\t")[0], "--reason", "typo"], tmp_path,
               **db).returncode == 0
    people.write_text("email\nbo@example.org\n", encoding="utf-8")
    run(["subscribers", "import", str(people)], tmp_path, **db)
    left = run(["subscribers", "unsubscribe", "bo@example.org", "--reason", "asked by phone"], tmp_path, **db)
    assert left.stdout.strip() == "Unsubscribed bo@example.org."
    assert ",unsubscribed," in run(["subscribers", "export", "--status", "unsubscribed"], tmp_path, **db).stdout


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_inbound_serve_takes_an_unsubscribe_mail(tmp_path: Path, env, backend: str, smtp) -> None:  # type: ignore[no-untyped-def]
    """`mailer inbound serve` listens on its port, and a mail to a reader's mailto unsubscribes them."""
    import signal
    import smtplib

    from mailer import addresses
    from tests.conftest import base_env, make_readers, subscriber_row
    from tests.inbound_helpers import sample

    [reader_id] = make_readers(1)
    mailto = addresses.unsubscribe_mailto(reader_id)
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    process = subprocess.Popen([*MAILER, "inbound", "serve", "--port", str(port)], cwd=tmp_path,
                               env={**clean, **base_env(backend, smtp.port, tmp_path / "outbox")},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=10)
                break
            except OSError:
                assert time.monotonic() < deadline, "the listener did not start"
                time.sleep(0.2)
        with client:
            client.sendmail("reader0@example.org", [mailto],
                            sample("unsubscribe_request", to=mailto, rcpt="reader0@example.org"))
        deadline = time.monotonic() + 20
        while subscriber_row("reader0@example.org").status.value != "unsubscribed":
            assert time.monotonic() < deadline, "the mail was not processed"
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert f"on 127.0.0.1:{port}" in output
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_campaign_markdown_schedule_preview_and_delivery_log(tmp_path: Path, env, backend: str, smtp  # type: ignore[no-untyped-def]
                                                             ) -> None:
    """`campaign create --markdown`, `schedule --at`, `preview` and `deliveries` do what the console does,
    and a bad --at, --email or --state gets a sentence naming that option."""
    from sqlalchemy import update

    from mailer import campaigns
    from mailer.db import session_scope
    from mailer.models import Delivery
    from tests.conftest import base_env, make_readers

    ids = make_readers(3)
    settings = base_env(backend, smtp.port, tmp_path / "outbox")
    (tmp_path / "body.md").write_text("# Talks, not tanks\n\nDear {{ name }}, *sign* the petition.\n")
    neither = run(["campaign", "create", "--subject", "Hi"], tmp_path, **settings)
    assert (neither.returncode, neither.stderr.strip()) == (
        1, "Error: --html: Give the body as --html FILE or as --markdown FILE (one of them).")
    created = run(["campaign", "create", "--subject", "Petition, {{ name }}", "--markdown", "body.md"], tmp_path,
                  **settings)
    assert created.returncode == 0, created.stderr
    campaign_id = created.stdout.split()[2]

    shown = run(["campaign", "preview", campaign_id, "--email", "Reader1@example.org", "--out", "mail.html"],
                tmp_path, **settings)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("To: reader1@example.org\nSubject: Petition, Reader 1\n")
    assert "Dear Reader 1, sign the petition." in shown.stdout
    assert "Talks, not tanks</h1>" in (tmp_path / "mail.html").read_text(encoding="utf-8")
    stranger = run(["campaign", "preview", campaign_id, "--email", "zed@example.org"], tmp_path, **settings)
    assert (stranger.returncode, stranger.stderr.strip()) == (
        1, "Error: --email: No subscriber has the address zed@example.org.")

    bad = run(["campaign", "schedule", campaign_id, "--at", "next tuesday"], tmp_path, **settings)
    assert (bad.returncode, bad.stderr.strip()) == (
        1, "Error: --at: 'next tuesday' is not a time such as 2026-12-01T08:00:00+00:00.")
    naive = run(["campaign", "schedule", campaign_id, "--at", "2030-01-01T08:00"], tmp_path, **settings)
    assert naive.returncode == 1
    assert naive.stderr.startswith("Error: --at: Give the time with a time zone")
    scheduled = run(["campaign", "schedule", campaign_id, "--at", "2030-01-01T09:00:00+01:00"], tmp_path,
                    **settings)
    assert scheduled.returncode == 0, scheduled.stderr
    assert f"Campaign {campaign_id} scheduled" in scheduled.stdout
    assert "sends at 2030-01-01T08:00:00+00:00" in scheduled.stdout

    # The log's rows are set here rather than sent, so each state and reply is known.
    with session_scope() as session:
        campaigns.start(session, int(campaign_id))
        session.execute(update(Delivery).where(Delivery.subscriber_id == ids[0])
                        .values(state="sent", smtp_code=250, smtp_text="2.0.0 Ok: queued"))
        session.execute(update(Delivery).where(Delivery.subscriber_id == ids[1])
                        .values(state="failed", smtp_code=550, smtp_text="5.1.1 Recipient address rejected"))
    failed = run(["campaign", "deliveries", campaign_id, "--state", "failed"], tmp_path, **settings)
    assert failed.returncode == 0, failed.stderr
    heading, row = failed.stdout.splitlines()
    assert heading.split() == ["id", "address", "state", "tries", "sent", "(UTC)", "code", "reply"]
    assert row.split()[1:] == ["reader1@example.org", "failed", "0", "550", "5.1.1", "Recipient", "address",
                               "rejected"]
    found = run(["campaign", "deliveries", campaign_id, "--query", "queued"], tmp_path, **settings)
    assert "reader0@example.org" in found.stdout
    assert "reader1@example.org" not in found.stdout
    wrong = run(["campaign", "deliveries", campaign_id, "--state", "lost"], tmp_path, **settings)
    assert wrong.returncode == 1
    assert wrong.stderr.startswith("Error: --state: Use one of pending, sending, sent")
    assert "Traceback" not in bad.stderr + wrong.stderr + stranger.stderr + neither.stderr


def test_subscribers_search_and_show(tmp_path: Path, env, backend: str, smtp) -> None:  # type: ignore[no-untyped-def]
    """`subscribers search` finds by address or name and leaves erased readers out; `subscribers show`
    prints status, categories, frequency, consent history and deliveries."""
    from mailer import subscriptions
    from mailer.db import session_scope
    from mailer.models import Campaign, Delivery
    from mailer.subscriptions import Origin
    from tests.conftest import base_env

    settings = base_env(backend, smtp.port, tmp_path / "outbox")
    people = tmp_path / "people.csv"
    people.write_text("email,name,categories,frequency\nada@example.org,Ada Lovelace,us-russia-relations,weekly\n"
                      "grace@example.org,Grace Hopper,,daily\nerin@example.org,Erin Lovelace,,daily\n",
                      encoding="utf-8")
    assert run(["subscribers", "import", str(people)], tmp_path, **settings).returncode == 0
    with session_scope() as session:
        erin = subscriptions.store.subscriber_by_email(session, "erin@example.org")
        assert erin is not None
        subscriptions.erase(session, subscriber_id=erin.id, reason="asked", origin=Origin(channel="cli"))
        ada = subscriptions.store.subscriber_by_email(session, "ada@example.org")
        assert ada is not None
        campaign = Campaign(subject="Petition: talks, not tanks", html="h", categories=[], status="finished")
        session.add(campaign)
        session.flush()
        session.add(Delivery(campaign_id=campaign.id, subscriber_id=ada.id, state="failed", smtp_code=552,
                             smtp_text="5.2.2 Mailbox full"))
    found = run(["subscribers", "search", "LOVELACE"], tmp_path, **settings)
    assert found.returncode == 0, found.stderr
    heading, *rows = found.stdout.splitlines()
    assert heading.split() == ["id", "address", "name", "status", "frequency", "categories"]
    assert [row.split()[1:] for row in rows] == [
        ["ada@example.org", "Ada", "Lovelace", "confirmed", "weekly", "us-russia-relations"]]
    assert run(["subscribers", "search", "nobody-here"], tmp_path, **settings).stdout.strip() == "Nobody matches."
    bad = run(["subscribers", "search", "a", "--status", "asleep"], tmp_path, **settings)
    assert (bad.returncode, bad.stderr.strip()) == (
        1, "Error: --status: Use one of pending, confirmed, unsubscribed, bounced, complained.")

    shown = run(["subscribers", "show", "Ada@Example.org"], tmp_path, **settings)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("ada@example.org (subscriber ")
    assert "status confirmed; frequency weekly" in lines[1]
    assert lines[2].strip() == "categories: U.S.–Russia Relations"
    history = lines[lines.index("Consent history (newest first):") + 2]
    assert history.split()[2:4] == ["import", "import"]
    delivery = lines[lines.index("Recent deliveries (newest first):") + 2]
    assert "Petition: talks, not tanks" in delivery
    assert delivery.split()[-5:] == ["failed", "552", "5.2.2", "Mailbox", "full"]
    missing = run(["subscribers", "show", "erin@example.org"], tmp_path, **settings)
    assert (missing.returncode, missing.stderr.strip()) == (
        1, "Error: email: No subscriber has the address erin@example.org.")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_resume_without_a_broker_leaves_the_sending_to_serve(tmp_path: Path, env, backend: str, smtp) -> None:  # type: ignore[no-untyped-def]
    """Without a broker, `campaign resume` (like `send`) exits at once and sends nothing from its own
    process, naming who will; `resume --wait` sends from here and shows the campaign finished."""
    from mailer import campaigns
    from mailer.db import session_scope
    from tests.conftest import base_env, make_readers

    make_readers(5)
    with session_scope() as session:
        campaign_id = campaigns.create(session, subject="Hi", html="<p>Sign the petition.</p>").id
    with session_scope() as session:
        campaigns.start(session, campaign_id)
        campaigns.pause(session, campaign_id)
    settings = base_env(backend, smtp.port, tmp_path / "outbox")
    resumed = run(["campaign", "resume", str(campaign_id)], tmp_path, **settings)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Campaign {campaign_id} sending" in resumed.stdout
    assert "No MAILER_BROKER_URL: a running `mailer serve` sends it" in resumed.stdout
    assert smtp.messages == []
    with session_scope() as session:
        campaigns.pause(session, campaign_id)
    waited = run(["campaign", "resume", str(campaign_id), "--wait"], tmp_path, **settings)
    assert waited.returncode == 0, waited.stderr
    assert f"Campaign {campaign_id} finished" in waited.stdout
    assert len(smtp.wait_for(5)) == 5
