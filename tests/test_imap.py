"""Polling the bounce mailbox over IMAP, against a real dovecot on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mailer import campaigns, imap, queue
from mailer.db import session_scope
from mailer.errors import MailboxError
from mailer.models import InboundKind, InboundMessage, Status
from tests import imapserver
from tests.conftest import subscriber_row
from tests.imapserver import Dovecot
from tests.inbound_helpers import sample, sent_campaign


@pytest.fixture(scope="session")
def dovecot_server() -> Iterator[Dovecot]:
    # Not under pytest's tmp_path: that is private to this user, and dovecot's own users must read the files.
    root = Path(tempfile.mkdtemp(prefix="mailer-dovecot-"))
    root.chmod(0o755)
    server = imapserver.start(root)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def mailbox(dovecot_server: Dovecot, env: Callable[..., None]) -> Dovecot:
    dovecot_server.clear()
    env(inbound_url=dovecot_server.url)
    return dovecot_server


def inbound_rows() -> list[InboundMessage]:
    with session_scope() as session:
        found = list(session.scalars(select(InboundMessage).order_by(InboundMessage.id)))
        session.expunge_all()
    return found


def test_a_message_leaves_the_mailbox_only_once_it_is_understood(mailbox: Dovecot) -> None:
    """A poll stores every new message; the next one deletes the bounce and the delay warning it understood,
    and leaves the reply, the auto-reply and the token-less unsubscribe request for a person."""
    bounced, delayed = sent_campaign(2)
    mailbox.append(sample("postfix_user_unknown", **bounced.values()))
    mailbox.append(sample("postfix_delayed", **delayed.values()))
    mailbox.append(sample("human_reply", **delayed.values()))
    mailbox.append(sample("vacation_reply", **delayed.values()))
    mailbox.append(sample("unsubscribe_request", to="unsubscribe@news.example.org", rcpt=delayed.email))

    assert imap.poll() == {"deleted": 0, "stored": 5}
    queue.drain()
    assert len(mailbox.subjects()) == 5  # Nothing is deleted before it was processed.
    assert subscriber_row(bounced.email).status is Status.bounced
    assert subscriber_row(delayed.email).status is Status.confirmed

    assert imap.poll() == {"deleted": 2, "stored": 0}
    assert mailbox.subjects() == ["Out of office: Petition: talks, not tanks", "Re: Petition: talks, not tanks",
                                  "unsubscribe"]
    kinds = sorted(row.kind.value for row in inbound_rows())
    assert kinds == ["bounce", "delay", "unclassified", "unclassified", "unclassified"]
    assert all(row.channel == "imap" for row in inbound_rows())
    assert sum(row.removed_at is not None for row in inbound_rows()) == 2

    # Polling again finds nothing new and deletes nothing more: what a person must read stays.
    assert imap.poll() == {"deleted": 0, "stored": 0}
    assert len(mailbox.subjects()) == 3
    assert len(inbound_rows()) == 5


def test_a_success_report_about_someone_elses_mail_stays_in_the_mailbox(mailbox: Dovecot) -> None:
    """A "relayed" DSN for one of our deliveries is understood and deleted; the same kind of report about a mail
    we did not send (a colleague's, with the plain bounce address as sender) stays, listed as unclassified."""
    [sent] = sent_campaign(1)
    mailbox.append(sample("postfix_delivered", **sent.values()))
    mailbox.append(sample("postfix_delivered", rcpt="editor@example.net").replace(
        b"Subject: Successful Mail Delivery Report", b"Subject: Successful Mail Delivery Report (colleague)", 1))
    assert imap.poll() == {"deleted": 0, "stored": 2}
    queue.drain()
    assert imap.poll() == {"deleted": 1, "stored": 0}
    assert mailbox.subjects() == ["Successful Mail Delivery Report (colleague)"]
    ours, unrelated = inbound_rows()
    assert (ours.kind, ours.delivery_id, ours.removed_at is not None) == (InboundKind.ignored, sent.delivery_id, True)
    assert (unrelated.kind, unrelated.subscriber_id, unrelated.removed_at) == (InboundKind.unclassified, None, None)
    assert imap.poll() == {"deleted": 0, "stored": 0}
    assert mailbox.subjects() == ["Successful Mail Delivery Report (colleague)"]


def test_a_message_over_the_size_limit_is_listed_once_and_never_deleted(mailbox: Dovecot, env: Callable[..., None],
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A message over MAILER_INBOUND_MAX_BYTES is not read: one unclassified row says its size (without the body),
    one warning is logged, and further polls neither list it again nor delete it."""
    env(inbound_max_bytes="10000")
    [sent] = sent_campaign(1)
    big = sample("human_reply", **sent.values()) + b"> quoted petition text, line after line\r\n" * 400
    mailbox.append(big)
    mailbox.append(sample("postfix_user_unknown", **sent.values()))
    assert imap.poll() == {"deleted": 0, "stored": 2}
    queue.drain()
    too_large = next(row for row in inbound_rows() if row.kind is not InboundKind.bounce)
    assert too_large.kind is InboundKind.unclassified
    assert too_large.detail.startswith(f"Too large: {len(big)} bytes (MAILER_INBOUND_MAX_BYTES is 10000)")
    assert (too_large.raw, too_large.subject) == (b"", "Re: Petition: talks, not tanks")
    assert imap.poll() == {"deleted": 1, "stored": 0}  # The bounce goes; the big message stays.
    assert imap.poll() == {"deleted": 0, "stored": 0}
    assert mailbox.subjects() == ["Re: Petition: talks, not tanks"]
    assert len(inbound_rows()) == 2
    assert caplog.text.count("is too large") == 1


def test_the_tick_polls_the_mailbox_and_its_task_processes_what_came(mailbox: Dovecot,
                                                                     env: Callable[..., None]) -> None:
    """With MAILER_INBOUND_URL set, the periodic tick queues a poll; the complaint it finds is processed."""
    env(inbound_poll_seconds="0.01")
    imap._last_poll = None
    sent = sent_campaign(3)
    mailbox.append(sample("yahoo_arf", **sent[1].values()))
    campaigns.tick()
    queue.drain()
    queue.drain()
    assert subscriber_row(sent[1].email).status is Status.complained
    [row] = inbound_rows()
    assert (row.channel, row.kind, row.campaign_id) == ("imap", InboundKind.complaint, sent[1].campaign_id)


def test_a_wrong_password_is_one_clear_sentence(dovecot_server: Dovecot, tmp_path: Path) -> None:
    """`mailer inbound poll` with a bad password says what failed and exits 1, without a traceback."""
    # One attempt only: dovecot makes each further failed login from the same address wait longer.
    bad = dovecot_server.url.replace(imapserver.PASSWORD, "wrong")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    result = subprocess.run([sys.executable, "-m", "mailer.cli", "inbound", "poll"], cwd=tmp_path,
                            env={**clean, "MAILER_INBOUND_URL": bad}, capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 1
    assert "Could not poll the mailbox: 127.0.0.1" in result.stderr
    assert "AUTHENTICATIONFAILED" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_mailbox_is_logged_and_the_tick_carries_on(env: Callable[..., None],
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The poll task turns a mailbox that does not answer into one warning; the next tick tries again."""
    from tests.conftest import free_port

    env(inbound_url=f"imap://bounces:x@127.0.0.1:{free_port()}/INBOX")
    with pytest.raises(MailboxError, match=r"127\.0\.0\.1"):
        imap.poll()
    assert imap.poll_task() == {"deleted": 0, "stored": 0}
    assert "could not poll the mailbox" in caplog.text
