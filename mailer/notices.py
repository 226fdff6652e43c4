"""Transactional mails to one subscriber: the confirmation and the welcome.

`send_notice` is what the Celery task and the in-process runner call. It claims the notice row
first, re-checks the subscriber at the moment of sending, and records the result, so running it
twice sends one mail.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from mailer import addresses, bounces, queue, render, store, tokens
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import MailerError
from mailer.models import Notice, NoticeKind, NoticeState, Status, Subscriber
from mailer.sender import Envelope, Outcome, transport_for
from mailer.subscriptions import Origin

log = logging.getLogger(__name__)


class TemporaryFailure(MailerError):
    """The mail could not go out now; the notice is pending again and the task should retry."""


def _context(subscriber: Subscriber, kind: NoticeKind) -> dict[str, Any]:
    settings = get_settings()
    context: dict[str, Any] = {
        "name": subscriber.name,
        "email": subscriber.email,
        "frequency": subscriber.frequency.value,
        "categories": [c.name for c in subscriber.categories],
        **tokens.urls(subscriber.id),
    }
    if kind is NoticeKind.confirm:
        # Whoever signed the address up typed the name: a stranger's words never go into this mail,
        # neither its body nor its To header (which takes the name from this context).
        context["name"] = ""
        assert subscriber.confirm_nonce is not None
        token = tokens.confirm_token(subscriber.id, subscriber.confirm_nonce)
        context["confirm_url"] = f"{settings.base_url}/confirm/{token}"
        context["ttl_hours"] = int(settings.confirm_ttl_hours)
        # A confirmation goes to someone who has not agreed yet: no preference links in it.
        del context["unsubscribe_url"], context["preferences_url"], context["unsubscribe_mailto"]
    return context


def _still_wanted(notice: Notice, subscriber: Subscriber | None) -> bool:
    if subscriber is None:
        return False
    if notice.kind is NoticeKind.confirm:
        return subscriber.status is not Status.confirmed and subscriber.confirm_nonce is not None
    return subscriber.status is Status.confirmed


def send_notice(notice_id: int) -> str:
    """Send one notice; returns its final state. Raises TemporaryFailure when it should be retried."""
    with session_scope() as session:
        if not store.claim_notice(session, notice_id):
            return "already-claimed"
    try:
        return _send_claimed(notice_id)
    except TemporaryFailure:
        raise
    except Exception as error:
        # A bug or bad data must not leave the notice claimed for ever: record it and move on.
        log.exception("notice %s failed", notice_id)
        with session_scope() as session:
            store.finish_notice(session, notice_id, NoticeState.failed, error=f"{type(error).__name__}: {error}")
        return NoticeState.failed.value


def requeue_stale(*, older_than: timedelta = timedelta(minutes=5)) -> int:
    """Notices whose task was lost (broker down, worker killed) are queued again; claims make it safe."""
    with session_scope() as session:
        ids = store.stale_notices(session, older_than=older_than)
    for notice_id in ids:
        try:
            queue.dispatch("send_notice", notice_id)
        except Exception:
            log.exception("could not queue notice %s", notice_id)
            break
    return len(ids)


def _send_claimed(notice_id: int) -> str:
    settings = get_settings()
    with session_scope() as session:
        notice = session.get(Notice, notice_id)
        assert notice is not None
        subscriber = store.subscriber(session, notice.subscriber_id)
        # An address an admin blocked, or whose owner complained, gets no mail at all, not even a link.
        blocked = subscriber is not None and store.blocked_for_good(session, subscriber.email_hash)
        if blocked or not _still_wanted(notice, subscriber):
            store.finish_notice(session, notice_id, NoticeState.skipped)
            return NoticeState.skipped.value
        assert subscriber is not None
        context = _context(subscriber, notice.kind)
        headers = {} if notice.kind is NoticeKind.confirm else render.list_headers(
            unsubscribe_url=context["unsubscribe_url"], mailto=context["unsubscribe_mailto"])
        message = render.build_message(
            render.render(notice.kind.value, context), to_email=subscriber.email, to_name=context["name"],
            headers=headers,
        )
        # Each notice has its own return path, so a bounce of it names the notice (and so its reader).
        envelope = Envelope(addresses.notice_return_path(notice_id), subscriber.email, render.to_bytes(message))
        message_id = str(message["Message-ID"])
        reader_id = subscriber.id

    async def deliver() -> Any:
        transport = transport_for(settings)
        try:
            return await transport.send(envelope)
        finally:
            await transport.close()

    result = asyncio.run(deliver())
    with session_scope() as session:
        if result.outcome is Outcome.sent:
            store.finish_notice(session, notice_id, NoticeState.sent, message_id=message_id)
            return NoticeState.sent.value
        if result.outcome is Outcome.permanent:
            store.finish_notice(session, notice_id, NoticeState.failed, error=f"{result.code} {result.text}")
            # A 5xx goes through the same bounce policy as a campaign mail's (bounces.py).
            reader = store.subscriber(session, reader_id, for_update=True)
            if reader is not None:
                severity = bounces.classify(bounces.enhanced_code(result.text))
                bounces.bounce(session, subscriber=reader, severity=severity, detail=f"{result.code} {result.text}",
                               origin=Origin(channel="smtp"))
            return NoticeState.failed.value
        # Temporary and unknown alike are tried again: a second confirmation mail harms nobody.
        store.finish_notice(session, notice_id, NoticeState.pending, error=f"{result.code} {result.text}")
    raise TemporaryFailure(f"notice {notice_id}: {result.code} {result.text}")
