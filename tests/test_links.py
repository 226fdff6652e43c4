"""Links in mails: GET and HEAD change nothing; bad, foreign and expired tokens get clear pages."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from mailer import queue, tokens
from mailer.db import session_scope
from mailer.models import ConsentEvent, Notice, Status
from tests.conftest import SmtpSink, sign_up, subscriber_row
from tests.mails import body_link, confirm_link, header_unsubscribe_link


def snapshot() -> tuple[int, int, list[tuple[object, ...]]]:
    """Everything a link could change: consent events, queued mails, and every subscriber field."""
    from mailer.models import Subscriber

    with session_scope() as session:
        events = session.scalar(select(func.count()).select_from(ConsentEvent)) or 0
        notices = session.scalar(select(func.count()).select_from(Notice)) or 0
        rows = [(s.id, s.status.value, s.name, s.frequency.value, s.confirm_nonce, s.updated_at,
                 tuple(c.slug for c in s.categories))
                for s in session.scalars(select(Subscriber).order_by(Subscriber.id))]
    return events, notices, rows


def test_get_and_head_of_every_link_change_nothing(client: TestClient, smtp: SmtpSink) -> None:
    """Mail scanners open links with GET and HEAD; none of that may confirm, unsubscribe or save."""
    sign_up(client, "scan@example.org")
    confirm = confirm_link(smtp.wait_for(1)[0])
    before = snapshot()
    for _ in range(2):
        assert client.get(confirm).status_code == 200
        assert client.head(confirm).status_code == 200
    assert snapshot() == before
    assert subscriber_row("scan@example.org").status is Status.pending

    client.post(confirm)
    queue.drain()
    welcome = smtp.wait_for(2)[1]
    links = [header_unsubscribe_link(welcome), body_link(welcome, "unsubscribe"), body_link(welcome, "preferences"),
             confirm]
    before = snapshot()
    for link in links:
        for method in ("GET", "HEAD"):
            assert client.request(method, link).status_code < 500, (method, link)
    assert snapshot() == before
    assert subscriber_row("scan@example.org").status is Status.confirmed
    assert len(smtp.messages) == 2


@pytest.mark.parametrize("path", ["confirm", "unsubscribe", "preferences"])
def test_tampered_garbage_and_foreign_tokens_get_400_never_500(client: TestClient, smtp: SmtpSink, path: str) -> None:
    """A token altered by one character, a token for another purpose, and garbage all get a 400 page."""
    sign_up(client, "tamper@example.org")
    subscriber_id = subscriber_row("tamper@example.org").id
    good = {"confirm": confirm_link(smtp.wait_for(1)[0]).rsplit("/", 1)[1],
            "unsubscribe": tokens.unsubscribe_token(subscriber_id),
            "preferences": tokens.preferences_token(subscriber_id)}[path]
    flipped = good[:-3] + ("A" if good[-3] != "A" else "B") + good[-2:]
    foreign = tokens.make(tokens.Purpose.csrf, subscriber_id)
    before = snapshot()
    for token in (flipped, foreign, "garbage", "x" * 2000, "%00", "WzFd.awbikQ.q_tXAgw1jAvZwGHqNENi8mP_3fE"):
        for method in ("GET", "POST"):
            response = client.request(method, f"/{path}/{token}")
            assert response.status_code in {400, 404}, (method, token, response.status_code)
            assert "not valid" in response.text or "not found" in response.text.lower()
    assert snapshot() == before


def test_real_tokens_of_another_purpose_get_400_and_change_nothing(client: TestClient, smtp: SmtpSink) -> None:
    """A well-formed, correctly signed token made for one page is refused on every other page, by GET, HEAD
    and POST, with a 400 or 404 page and no change: the signing key is bound to the purpose."""
    sign_up(client, "pending@example.org")
    pending = subscriber_row("pending@example.org").id
    pending_confirm = confirm_link(smtp.wait_for(1)[0]).rsplit("/", 1)[1]
    sign_up(client, "reader@example.org")
    client.post(confirm_link(smtp.wait_for(2)[1]))
    queue.drain()
    reader = subscriber_row("reader@example.org").id
    # Each case would change something if the purpose were not checked: unsubscribe a reader, confirm the
    # pending one, or save a reader's preferences (the POST carries that reader's own CSRF token).
    cases = [
        ("unsubscribe", tokens.preferences_token(reader)),
        ("unsubscribe", tokens.preferences_token(pending)),
        ("unsubscribe", pending_confirm),
        ("confirm", tokens.preferences_token(pending)),
        ("confirm", tokens.unsubscribe_token(pending)),
        ("preferences", tokens.unsubscribe_token(reader)),
        ("preferences", pending_confirm),
    ]
    before = snapshot()
    for path, token in cases:
        subscriber_id = pending if token == pending_confirm else int(token.split(".")[0])
        form = {"csrf_token": tokens.csrf_token(subscriber_id), "name": "Mallory", "frequency": "weekly"}
        for method in ("GET", "HEAD", "POST"):
            response = client.request(method, f"/{path}/{token}", data=form if method == "POST" else None)
            assert response.status_code in {400, 404}, (method, path, token, response.status_code)
            if method != "HEAD":
                assert "not valid" in response.text, (method, path, token)
    assert snapshot() == before
    assert subscriber_row("reader@example.org").status is Status.confirmed
    assert subscriber_row("pending@example.org").status is Status.pending
    assert len(smtp.messages) == 3


def test_resend_with_a_bad_token_gets_a_400_page(client: TestClient, smtp: SmtpSink) -> None:
    """`POST /confirm/{token}/resend` with garbage or a token of another purpose answers a 400 page and
    sends nothing."""
    sign_up(client, "resend@example.org")
    subscriber_id = subscriber_row("resend@example.org").id
    before = snapshot()
    for token in ("garbage", tokens.preferences_token(subscriber_id), tokens.csrf_token(subscriber_id)):
        response = client.post(f"/confirm/{token}/resend")
        assert response.status_code == 400, (token, response.status_code)
        assert "not valid" in response.text
    queue.drain()
    assert snapshot() == before
    assert len(smtp.messages) == 1


def test_expired_confirm_link_offers_a_fresh_mail(client: TestClient, smtp: SmtpSink,
                                                  env: Callable[..., None]) -> None:
    """After its lifetime a confirm link confirms nothing and offers a new mail, which works."""
    env(confirm_ttl_hours=str(1 / 3600), confirm_resend_minutes="0")
    sign_up(client, "late@example.org")
    link = confirm_link(smtp.wait_for(1)[0])
    time.sleep(2.1)
    page = client.get(link)
    assert page.status_code == 410
    assert "Send me a new link" in page.text
    assert client.post(link).status_code == 410
    assert subscriber_row("late@example.org").status is Status.pending

    env(confirm_ttl_hours="48")
    assert client.post(f"{link}/resend").status_code == 200
    queue.drain()
    fresh = smtp.wait_for(2)[1]
    assert client.post(confirm_link(fresh)).status_code == 200
    assert subscriber_row("late@example.org").status is Status.confirmed


def test_old_confirm_link_of_a_confirmed_reader_says_already_subscribed(
        client: TestClient, smtp: SmtpSink, env: Callable[..., None]) -> None:
    """An expired confirm link of a reader who has since confirmed shows "already subscribed" (GET, HEAD,
    POST and resend alike), offers no fresh mail and changes nothing."""
    sign_up(client, "early@example.org")
    link = confirm_link(smtp.wait_for(1)[0])
    assert client.post(link).status_code == 200
    queue.drain()
    env(confirm_ttl_hours=str(1 / 3600), confirm_resend_minutes="0")
    time.sleep(2.1)
    before = snapshot()
    for method, path in (("GET", link), ("HEAD", link), ("POST", link), ("POST", f"{link}/resend")):
        response = client.request(method, path)
        assert response.status_code == 200, (method, path, response.status_code)
        if method != "HEAD":
            assert "already subscribed" in response.text, (method, path)
            assert "expired" not in response.text
            assert "new link" not in response.text
    queue.drain()
    assert snapshot() == before
    assert subscriber_row("early@example.org").status is Status.confirmed
    assert len(smtp.messages) == 2


def test_confirm_link_works_once(client: TestClient, smtp: SmtpSink) -> None:
    """A second POST of a used link confirms nothing new and sends no second welcome."""
    sign_up(client, "once@example.org")
    link = confirm_link(smtp.wait_for(1)[0])
    assert client.post(link).status_code == 200
    queue.drain()
    second = client.post(link)
    assert second.status_code == 200
    assert "already subscribed" in second.text
    queue.drain()
    assert len(smtp.messages) == 2


def test_unsubscribe_token_never_expires_and_gone_subscriber_is_fine(client: TestClient, smtp: SmtpSink) -> None:
    """Unsubscribe links carry no time (so nothing can expire them) and stay the same; a POST for a deleted
    subscriber still answers 200."""
    sign_up(client, "gone@example.org")
    row = subscriber_row("gone@example.org")
    token = tokens.unsubscribe_token(row.id)
    number, signature = token.split(".")
    assert (int(number), len(signature)) == (row.id, 22)
    time.sleep(1.1)
    assert tokens.unsubscribe_token(row.id) == token
    assert tokens.read(tokens.Purpose.unsubscribe, token)[0] == row.id
    with session_scope() as session:
        from mailer.models import Subscriber

        session.delete(session.get(Subscriber, row.id))
    assert client.post(f"/unsubscribe/{token}").status_code == 200
    assert client.get(f"/unsubscribe/{token}").status_code == 200
