"""The SMTP listener (`mailer inbound serve`), driven by a real SMTP client, end to end with real campaigns."""

from __future__ import annotations

import re
import smtplib
import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailer import queue
from mailer.db import session_scope
from mailer.inbound_smtp import controller
from mailer.models import InboundKind, InboundMessage, Status
from tests.campaign_helpers import create, deliveries, wait_until
from tests.conftest import SmtpSink, free_port, make_readers, subscriber_row
from tests.inbound_helpers import sample


@pytest.fixture
def listener(env: Callable[..., None]) -> Iterator[int]:
    server = controller("127.0.0.1", free_port())
    server.start()
    yield server.port
    server.stop()


def send_to_listener(port: int, raw: bytes, *, rcpt: str, mail_from: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail(mail_from, [rcpt], raw)


def rows(kind: InboundKind | None = None) -> list[InboundMessage]:
    with session_scope() as session:
        query = select(InboundMessage).order_by(InboundMessage.id)
        found = list(session.scalars(query if kind is None else query.where(InboundMessage.kind == kind)))
        session.expunge_all()
    return found


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_the_listener_takes_mail_only_for_our_addresses(listener: int) -> None:
    """RCPT to an address that is not ours is refused with 550; the bounce address is taken and stored."""
    with smtplib.SMTP("127.0.0.1", listener, timeout=10) as client:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail("", ["editor@news.example.org"], sample("human_reply"))
        assert refused.value.recipients["editor@news.example.org"][0] == 550
        client.sendmail("", ["bounces@news.example.org"], sample("human_reply"))
    queue.drain()
    [row] = rows()
    assert (row.channel, row.rcpt_to, row.kind) == ("smtp", "bounces@news.example.org", InboundKind.unclassified)
    assert b"Could you send me the full text" in row.raw


def test_the_listener_refuses_mail_over_the_size_limit(env: Callable[..., None]) -> None:
    """A message over MAILER_INBOUND_MAX_BYTES gets 552 and is not stored."""
    env(inbound_max_bytes="10000")
    server = controller("127.0.0.1", free_port())
    server.start()
    try:
        big = sample("human_reply") + b"x" * 20_000 + b"\r\n"
        # The client announces the size (SIZE extension), so the refusal comes at MAIL FROM.
        with pytest.raises(smtplib.SMTPSenderRefused) as error:
            send_to_listener(server.port, big, rcpt="bounces@news.example.org")
        assert error.value.smtp_code == 552
    finally:
        server.stop()
    assert rows() == []


def test_each_delivery_has_its_own_return_path_and_its_bounce_names_it(admin: TestClient, smtp: SmtpSink,
                                                                        listener: int) -> None:
    """Campaign mails go out with VERP return paths; a Postfix DSN to one of them bounces exactly that reader."""
    make_readers(3)
    campaign_id = create(admin)
    admin.post(f"/api/campaigns/{campaign_id}/send")
    wait_until(admin, campaign_id)
    sent = {m.recipients[0]: m for m in smtp.wait_for(3)}
    senders = {m.sender for m in sent.values()}
    assert len(senders) == 3
    assert all(re.fullmatch(r"bounces\+d\d+-[a-z2-7]{16}@news\.example\.org", s) for s in senders), senders
    # The From header is the list's, whatever the envelope says; each reader's bytes are their own.
    mail = sent["reader1@example.org"]
    assert mail.message["From"] == "Truth and Resistance <newsletter@news.example.org>"
    assert mail.message["To"] == "Reader 1 <reader1@example.org>"
    dsn = sample("postfix_user_unknown", return_path=mail.sender, rcpt="reader1@example.org",
                 message_id=str(mail.message["Message-ID"]), list_unsubscribe=str(mail.message["List-Unsubscribe"]))
    send_to_listener(listener, dsn, rcpt=mail.sender)
    queue.drain()
    [row] = rows()
    assert (row.kind, row.severity, row.campaign_id) == (InboundKind.bounce, "hard", campaign_id)
    assert row.delivery_id == deliveries(campaign_id)["reader1@example.org"].id
    assert subscriber_row("reader1@example.org").status is Status.bounced
    assert subscriber_row("reader0@example.org").status is Status.confirmed
    assert subscriber_row("reader2@example.org").status is Status.confirmed


def test_a_reader_who_unsubscribes_by_mail_mid_campaign_gets_nothing_after(admin: TestClient, smtp: SmtpSink,
                                                                           listener: int,
                                                                           env: Callable[..., None]) -> None:
    """While a campaign is sending, a mail to a reader's List-Unsubscribe mailto is processed, and the
    campaign skips that reader from then on; a later campaign does not include them either."""
    make_readers(40)
    first = create(admin, subject="First")
    admin.post(f"/api/campaigns/{first}/send")
    wait_until(admin, first)
    target = "reader39@example.org"
    [earlier] = smtp.to(target)
    mailto = re.search(r"<mailto:([^?>]+)\?subject=unsubscribe>", str(earlier.message["List-Unsubscribe"]))
    assert mailto is not None
    smtp.clear()

    env(smtp_rate="10")
    second = create(admin, subject="Second")
    admin.post(f"/api/campaigns/{second}/send")
    smtp.wait_for(3)
    request = sample("unsubscribe_request", to=mailto.group(1), rcpt=target)
    send_to_listener(listener, request, rcpt=mailto.group(1), mail_from=target)
    wait_for(lambda: subscriber_row(target).status is Status.unsubscribed)  # type: ignore[union-attr]
    assert admin.get(f"/api/campaigns/{second}").json()["status"] == "sending"
    done = wait_until(admin, second, timeout=60)
    assert smtp.to(target) == []
    assert deliveries(second)[target].state.value == "skipped"
    assert (done["counts"]["sent"], done["counts"]["skipped"]) == (39, 1)
    [row] = rows(InboundKind.unsubscribe)
    assert row.rcpt_to == mailto.group(1)

    env(smtp_rate="0")
    smtp.clear()
    third = create(admin, subject="Third")
    admin.post(f"/api/campaigns/{third}/send")
    wait_until(admin, third)
    assert len(smtp.wait_for(39)) == 39
    assert smtp.to(target) == []


def test_a_bounced_confirmation_mail_stops_mail_to_that_address(client: TestClient, smtp: SmtpSink,
                                                                 listener: int) -> None:
    """A confirmation mail has its own return path too: its hard bounce marks the sign-up bounced and
    suppresses the address, so no further confirmation mail is tried."""
    from tests.conftest import sign_up

    sign_up(client, "typo@example.org")
    [confirmation] = smtp.wait_for(1)
    assert re.fullmatch(r"bounces\+n\d+-[a-z2-7]{16}@news\.example\.org", confirmation.sender)
    dsn = sample("gmail_user_unknown", return_path=confirmation.sender, rcpt="typo@example.org",
                 message_id=str(confirmation.message["Message-ID"]))
    send_to_listener(listener, dsn, rcpt=confirmation.sender)
    queue.drain()
    assert subscriber_row("typo@example.org").status is Status.bounced
    [row] = rows()
    assert (row.kind, row.severity, row.delivery_id) == (InboundKind.bounce, "hard", None)
