"""The whole journey of a reader, through the public pages, with mail over real SMTP."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from mailer.models import Status
from tests.conftest import SmtpSink, backdate_notices, consent_actions, sign_up, subscriber_row
from tests.mails import body_link, confirm_link, header_unsubscribe_link


def test_sign_up_confirm_welcome_and_one_click_unsubscribe(client: TestClient, smtp: SmtpSink) -> None:
    """A reader signs up, confirms from the mail, gets a welcome with list headers and leaves in one click."""
    response = sign_up(client, "Reader@Example.org", name="Ann Reader",
                       categories=["us-russia-relations", "us-nato-relations"], frequency="weekly")
    assert response.status_code == 200
    assert "Check your inbox" in response.text

    [confirmation] = smtp.wait_for(1)
    assert confirmation.recipients == ["Reader@example.org"]
    message = confirmation.message
    assert message["Subject"].startswith("Please confirm")
    # Whoever typed the name may be a stranger: it goes into neither the headers nor the body.
    assert message["To"] == "Reader@example.org"
    assert not [value for _, value in message.items() if "Ann" in str(value)]
    assert b"Ann Reader" not in confirmation.data
    assert "Ann Reader" not in confirmation.part("plain") + confirmation.part("html")
    for header in ("Message-ID", "Date", "From"):
        assert message[header]
    assert message.get_content_type() == "multipart/alternative"
    assert "Confirm my subscription" in confirmation.part("html")
    assert subscriber_row("reader@example.org").status is Status.pending

    link = confirm_link(confirmation)
    page = client.get(link)
    assert page.status_code == 200
    assert "<form method=\"post\"" in page.text
    assert subscriber_row("reader@example.org").status is Status.pending

    confirmed = client.post(link)
    assert confirmed.status_code == 200
    assert "You are subscribed" in confirmed.text
    row = subscriber_row("reader@example.org")
    assert row.status is Status.confirmed
    assert row.frequency.value == "weekly"
    assert [c.slug for c in row.categories] == ["us-russia-relations", "us-nato-relations"]

    from mailer import queue

    queue.drain()
    [_, welcome] = smtp.wait_for(2)
    assert welcome.message["Subject"].startswith("Welcome")
    assert welcome.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert welcome.message["List-Id"] == "Truth and Resistance <newsletter.news.example.org>"
    unsubscribe_header = str(welcome.message["List-Unsubscribe"])
    assert unsubscribe_header.startswith("<https://news.example.org/unsubscribe/")
    # The mailto is the reader's own: a mail to it unsubscribes this reader (tests/test_inbound_smtp.py).
    assert re.search(r"<mailto:unsubscribe\+u\d+-[a-z2-7]{16}@news\.example\.org\?subject=unsubscribe>",
                     unsubscribe_header), unsubscribe_header
    # The header is one line: a long URL folded into encoded words would break one-click unsubscribe.
    raw_header = next(line for line in welcome.data.split(b"\r\n") if line.startswith(b"List-Unsubscribe:"))
    assert b"=?" not in raw_header
    assert "U.S.–NATO Relations" in welcome.part("plain")
    assert body_link(welcome, "unsubscribe") == header_unsubscribe_link(welcome)
    assert body_link(welcome, "preferences", "html")

    # RFC 8058: a POST with this body, no cookie and no CSRF token, answered 200 without a redirect.
    one_click = client.post(header_unsubscribe_link(welcome), content=b"List-Unsubscribe=One-Click",
                            headers={"Content-Type": "application/x-www-form-urlencoded"},
                            follow_redirects=False)
    assert one_click.status_code == 200
    assert subscriber_row("reader@example.org").status is Status.unsubscribed
    again = client.post(header_unsubscribe_link(welcome), content=b"List-Unsubscribe=One-Click",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert again.status_code == 200
    assert consent_actions("reader@example.org") == ["subscribe", "confirm", "unsubscribe"]


def test_welcome_can_be_turned_off(client: TestClient, smtp: SmtpSink, env) -> None:  # type: ignore[no-untyped-def]
    """With MAILER_SEND_WELCOME=false, confirming sends no second mail."""
    env(send_welcome="false")
    sign_up(client, "quiet@example.org")
    [confirmation] = smtp.wait_for(1)
    assert client.post(confirm_link(confirmation)).status_code == 200
    from mailer import queue

    queue.drain()
    assert len(smtp.messages) == 1
    assert subscriber_row("quiet@example.org").status is Status.confirmed


def test_unsubscribed_reader_can_come_back_through_a_fresh_confirmation(client: TestClient, smtp: SmtpSink) -> None:
    """Someone who left can sign up again; they stay unsubscribed until they confirm the new mail."""
    sign_up(client, "back@example.org")
    client.post(confirm_link(smtp.wait_for(1)[0]))
    from mailer import queue

    queue.drain()
    welcome = smtp.wait_for(2)[1]
    client.post(header_unsubscribe_link(welcome))
    assert subscriber_row("back@example.org").status is Status.unsubscribed

    backdate_notices("back@example.org", minutes=11)
    sign_up(client, "back@example.org")
    fresh = smtp.wait_for(3)[2]
    assert fresh.message["Subject"].startswith("Please confirm")
    assert subscriber_row("back@example.org").status is Status.unsubscribed
    assert client.post(confirm_link(fresh)).status_code == 200
    assert subscriber_row("back@example.org").status is Status.confirmed


def test_preferences_change_with_csrf_token_only(client: TestClient, smtp: SmtpSink) -> None:
    """The preference form saves categories, frequency and name, and refuses a POST without its CSRF token."""
    sign_up(client, "prefs@example.org")
    client.post(confirm_link(smtp.wait_for(1)[0]))
    from mailer import queue

    queue.drain()
    welcome = smtp.wait_for(2)[1]
    link = body_link(welcome, "preferences")
    page = client.get(link)
    assert page.status_code == 200
    assert 'name="csrf_token"' in page.text
    assert "Unsubscribe from all mail" in page.text
    csrf = page.text.split('name="csrf_token" value="')[1].split('"')[0]

    forged = client.post(link, data={"name": "Mallory", "frequency": "weekly"})
    assert forged.status_code == 400
    assert subscriber_row("prefs@example.org").name == ""

    saved = client.post(link, data={"csrf_token": csrf, "name": "Pat", "frequency": "weekly",
                                    "categories": ["peace-and-diplomacy"]})
    assert saved.status_code == 200
    assert "Your preferences are saved" in saved.text
    row = subscriber_row("prefs@example.org")
    saved_choices = (row.name, row.frequency.value, [c.slug for c in row.categories])
    assert saved_choices == ("Pat", "weekly", ["peace-and-diplomacy"])

    zoned = client.post(link, data={"csrf_token": csrf, "name": "Pat", "frequency": "weekly",
                                    "categories": ["peace-and-diplomacy"], "timezone": "Europe/London"})
    assert zoned.status_code == 200
    assert subscriber_row("prefs@example.org").timezone == "Europe/London"
    assert 'value="Europe/London"' in client.get(link).text
    mars = client.post(link, data={"csrf_token": csrf, "frequency": "weekly", "timezone": "Mars/Base"})
    assert mars.status_code == 422
    assert "is not a time zone" in mars.text
    assert subscriber_row("prefs@example.org").timezone == "Europe/London"

    unknown = client.post(link, data={"csrf_token": csrf, "frequency": "weekly", "categories": ["nope"]})
    assert unknown.status_code == 422
    assert "Unknown category: nope" in unknown.text
    assert consent_actions("prefs@example.org")[-1] == "preferences"


def test_lost_confirmation_is_sent_by_the_tick(client: TestClient, smtp: SmtpSink, env) -> None:  # type: ignore[no-untyped-def]
    """With the broker down the sign-up still answers; the notice waits and the tick sends it later.
    A notice claimed by a sender that died is handed back and sent too."""
    from sqlalchemy import select, update

    from mailer import campaigns, queue
    from mailer.db import session_scope
    from mailer.models import Notice, NoticeState

    env(broker_url="redis://127.0.0.1:1/0")
    assert sign_up(client, "lost@example.org").status_code == 200
    assert smtp.messages == []
    env(broker_url="")
    backdate_notices("lost@example.org", minutes=6)
    campaigns.tick()
    queue.drain()
    assert len(smtp.wait_for(1)) == 1

    sign_up(client, "claimed@example.org")
    smtp.wait_for(2)
    backdate_notices("claimed@example.org", minutes=6)
    with session_scope() as session:
        notice_id = session.scalars(select(Notice.id).order_by(Notice.id.desc())).first()
        session.execute(update(Notice).where(Notice.id == notice_id)
                        .values(state=NoticeState.sending, claimed_at=Notice.created_at))
    campaigns.tick()
    queue.drain()
    assert len(smtp.to("claimed@example.org")) == 2
