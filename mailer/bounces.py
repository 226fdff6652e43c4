"""The one policy for what comes back, whether a 5xx at send time or a bounce, complaint or unsubscribe later.

    hard bounce  (5.1.x the address does not exist, 5.2.1 the mailbox is disabled)
                 ──▶ subscriber `bounced`, address suppressed at once
    soft bounce  (other mailbox and routing trouble: 4.x.x given up, 5.2.2 mailbox full, 5.4.x, 5.5.x,
                 or a 5xx with no enhanced code)
                 ──▶ one point on the reader's score, at most one a day; the score starts again after
                     MAILER_SOFT_BOUNCE_DAYS without a bounce; at MAILER_SOFT_BOUNCE_THRESHOLD the reader is
                     `bounced` and suppressed (Mailman's defaults: 5 within 7 days)
    block        (x.3.x mail system, x.6.x content, x.7.x policy and security: spam filters, DMARC, a
                 blocklisted IP) ──▶ recorded, counts nothing against the reader
    complaint    ──▶ subscriber `complained`, address suppressed at once; the campaign pauses itself when
                     its complaints pass MAILER_PAUSE_COMPLAINT_RATE of its sent mails, once it has sent
                     MAILER_PAUSE_COMPLAINT_MIN_SENT

Blocks say something about the sender or the message, not the address: a mailer that counts them
against readers drops half its list the week a big provider distrusts its IP. A campaign that many
servers block pauses itself through the sending engine's failure rate instead.
"""

from __future__ import annotations

import enum
import logging
import re
from datetime import datetime, timedelta

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session

from mailer import campaigns, store, subscriptions
from mailer.config import get_settings
from mailer.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryState,
    InboundKind,
    InboundMessage,
    Status,
    Subscriber,
    utcnow,
)
from mailer.subscriptions import Origin

log = logging.getLogger(__name__)

ENHANCED = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
HARD_CLASSES = ("5.1.",)
HARD_CODES = {"5.2.1"}
# RFC 3463 subjects that are about the mail system, the content or policy, not the recipient's address.
BLOCK_SUBJECTS = {"3", "6", "7"}


class Severity(enum.StrEnum):
    hard = "hard"
    soft = "soft"
    block = "block"


def enhanced_code(text: str) -> str:
    """The first RFC 3463 enhanced status code in a reply or diagnostic ('5.1.1'), or ''."""
    found = ENHANCED.search(text or "")
    return ".".join(found.groups()) if found else ""


def classify(status: str) -> Severity:
    """Hard, soft or a block, by the enhanced status code (see the module docstring)."""
    if status.startswith(HARD_CLASSES) or status in HARD_CODES:
        return Severity.hard
    if status.count(".") == 2 and status.split(".")[1] in BLOCK_SUBJECTS:
        return Severity.block
    return Severity.soft


def _suppress(session: Session, subscriber: Subscriber, reason: str, detail: str) -> None:
    store.add_suppression(session, email_hash=subscriptions.hash_email(subscriber.email_key),
                          email=subscriber.email, reason=reason, detail=detail[:500])


def bounce(session: Session, *, subscriber: Subscriber, severity: Severity, detail: str, origin: Origin,
           now: datetime | None = None) -> str:
    """Apply one bounce to a reader; returns what was done, in a few words for the record."""
    settings = get_settings()
    now = now or utcnow()
    if subscriber.status in {Status.bounced, Status.complained}:
        return f"nothing: the reader is already {subscriber.status.value}"
    if severity is Severity.block:
        return "a block (policy, content or the mail system): not counted against the reader"
    if severity is Severity.hard:
        _suppress(session, subscriber, "hard-bounce", detail)
        subscriptions.mark_bounced(session, subscriber=subscriber, detail=detail, origin=origin)
        return "hard bounce: reader bounced and suppressed"
    last = subscriber.last_bounce_at
    if last is None or now - last > timedelta(days=settings.soft_bounce_days):
        subscriber.bounce_score = 1.0
    elif last.date() != now.date():
        subscriber.bounce_score = (subscriber.bounce_score or 0.0) + 1.0
    else:
        # Mailman counts one bounce a day: a burst of retries of one message is one bounce.
        return f"soft bounce: already counted today (score {subscriber.bounce_score:g})"
    subscriber.last_bounce_at = now
    if subscriber.bounce_score >= settings.soft_bounce_threshold:
        _suppress(session, subscriber, "soft-bounces", detail)
        subscriptions.mark_bounced(session, subscriber=subscriber, detail=f"soft bounces: {detail}", origin=origin)
        return f"soft bounce: score {subscriber.bounce_score:g} reached the threshold; reader bounced and suppressed"
    return f"soft bounce: score {subscriber.bounce_score:g} of {settings.soft_bounce_threshold:g}"


def complaint(session: Session, *, subscriber: Subscriber, detail: str, origin: Origin) -> str:
    """Someone marked our mail as spam: they never get mail from us again."""
    _suppress(session, subscriber, "complaint", detail)
    subscriptions.mark_complained(session, subscriber=subscriber, detail=detail, origin=origin)
    return "complaint: reader complained and suppressed"


def check_complaint_rate(session: Session, campaign_id: int) -> str | None:
    """Pause a sending campaign whose complaints passed the limit; returns the reason when it paused.
    Below MAILER_PAUSE_COMPLAINT_MIN_SENT sent mails there is no rate to judge yet: nothing pauses."""
    settings = get_settings()
    sent = session.scalar(select(func.count()).select_from(Delivery).where(
        Delivery.campaign_id == campaign_id, Delivery.state == DeliveryState.sent)) or 0
    if sent < settings.pause_complaint_min_sent:
        return None
    complaints = session.scalar(
        select(func.count(distinct(InboundMessage.subscriber_id)))
        .where(InboundMessage.campaign_id == campaign_id, InboundMessage.kind == InboundKind.complaint)
    ) or 0
    rate = complaints / sent
    if rate <= settings.pause_complaint_rate:
        return None
    status = session.scalar(select(Campaign.status).where(Campaign.id == campaign_id))
    if status is not CampaignStatus.sending:
        return None
    reason = (f"Paused automatically: {complaints} spam complaint{'s' if complaints != 1 else ''} for {sent} mails "
              f"sent ({rate:.2%}; the limit is {settings.pause_complaint_rate:.2%}). Check the content and the "
              f"audience before resuming.")
    if campaigns.pause(session, campaign_id, reason=reason):
        log.warning("campaign %s: %s", campaign_id, reason)
        return reason
    return None
