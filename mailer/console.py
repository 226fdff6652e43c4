"""What the admin console and the admin API show: statistics, one subscriber's story, a campaign's
delivery log, and a campaign as one reader would get it. Read-only; every change goes through
`subscriptions`, `suppressions`, `campaigns` or `imports`.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from mailer import campaigns, compose, digests, store, tokens
from mailer.errors import InvalidInput, NotFound
from mailer.models import (
    Campaign,
    CampaignKind,
    Category,
    ConsentEvent,
    Delivery,
    DeliveryState,
    InboundKind,
    InboundMessage,
    Status,
    Subscriber,
    Suppression,
    subscriber_categories,
    utcnow,
)


@dataclass(frozen=True)
class CampaignLine:
    id: int
    kind: str
    subject: str
    status: str
    status_reason: str
    total: int
    counts: dict[str, int]
    # Recipients who unsubscribed after this campaign reached them, and readers whose bounce or
    # complaint about this campaign came back later (send-time refusals are in counts["failed"]).
    unsubscribed: int
    bounced: int
    complained: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Stats:
    by_status: dict[str, int]
    by_category: list[tuple[str, str, int]]
    growth: list[tuple[date, int]]
    suppressed: int
    campaigns: list[CampaignLine]


def campaign_line(session: Session, campaign: Campaign) -> CampaignLine:
    counts = store.delivery_counts(session, campaign.id)
    unsubscribed = session.scalar(
        select(func.count()).select_from(Delivery).join(Subscriber, Subscriber.id == Delivery.subscriber_id)
        .where(Delivery.campaign_id == campaign.id, Delivery.state == DeliveryState.sent,
               Subscriber.status == Status.unsubscribed, Subscriber.unsubscribed_at >= Delivery.sent_at)) or 0
    # Bounces that came back later (DSNs, provider events) name their campaign through the return path.
    came_back: dict[InboundKind, int] = {InboundKind(kind): int(n) for kind, n in session.execute(
        select(InboundMessage.kind, func.count(func.distinct(InboundMessage.subscriber_id)))
        .where(InboundMessage.campaign_id == campaign.id,
               InboundMessage.kind.in_([InboundKind.bounce, InboundKind.complaint]))
        .group_by(InboundMessage.kind))}
    return CampaignLine(
        id=campaign.id, kind=campaign.kind.value, subject=campaign.subject, status=campaign.status.value,
        status_reason=campaign.status_reason, total=campaign.total, counts=counts,
        unsubscribed=int(unsubscribed), bounced=int(came_back.get(InboundKind.bounce, 0)),
        complained=int(came_back.get(InboundKind.complaint, 0)),
        created_at=campaign.created_at, started_at=campaign.started_at, finished_at=campaign.finished_at,
    )


def recent_campaigns(session: Session, *, limit: int = 20, before_id: int | None = None,
                     kind: CampaignKind | None = None) -> list[CampaignLine]:
    statement = select(Campaign).order_by(Campaign.id.desc()).limit(limit)
    if before_id:
        statement = statement.where(Campaign.id < before_id)
    if kind is not None:
        statement = statement.where(Campaign.kind == kind)
    return [campaign_line(session, c) for c in session.scalars(statement)]


def stats(session: Session, *, days: int = 30) -> Stats:
    by_status = {s.value: 0 for s in Status}
    for status, count in session.execute(
            select(Subscriber.status, func.count()).where(Subscriber.erased_at.is_(None))
            .group_by(Subscriber.status)):
        by_status[Status(status).value] = int(count)
    by_category = [
        (slug, name, int(count)) for slug, name, count in session.execute(
            select(Category.slug, Category.name, func.count(Subscriber.id))
            .select_from(Category)
            .outerjoin(subscriber_categories, subscriber_categories.c.category_id == Category.id)
            .outerjoin(Subscriber, and_(Subscriber.id == subscriber_categories.c.subscriber_id,
                                        Subscriber.status == Status.confirmed))
            .group_by(Category.id, Category.slug, Category.name, Category.position)
            .order_by(Category.position, Category.id))
    ]
    since = (utcnow() - timedelta(days=days - 1)).date()
    confirmed_days: dict[date, int] = {}
    # Counted in Python by day: portable across SQLite and PostgreSQL, and a month of sign-ups is small.
    for (confirmed_at,) in session.execute(
            select(Subscriber.confirmed_at).where(Subscriber.confirmed_at >= datetime.combine(
                since, datetime.min.time(), tzinfo=utcnow().tzinfo))).yield_per(5000):
        if confirmed_at is None:
            continue
        day = confirmed_at.date()
        confirmed_days[day] = confirmed_days.get(day, 0) + 1
    growth = [(since + timedelta(days=i), confirmed_days.get(since + timedelta(days=i), 0)) for i in range(days)]
    suppressed = session.scalar(select(func.count()).select_from(Suppression)) or 0
    return Stats(by_status=by_status, by_category=by_category, growth=growth, suppressed=int(suppressed),
                 campaigns=recent_campaigns(session, limit=8))


@dataclass(frozen=True)
class DeliveryLine:
    id: int
    campaign_id: int
    subscriber_id: int
    email: str
    subject: str
    state: str
    attempts: int
    sent_at: datetime | None
    next_attempt_at: datetime | None
    smtp_code: int | None
    smtp_text: str | None
    message_id: str | None


def _delivery_lines(session: Session, statement: Any) -> list[DeliveryLine]:
    return [DeliveryLine(id=d.id, campaign_id=d.campaign_id, subscriber_id=d.subscriber_id, email=email_,
                         subject=subject, state=d.state.value, attempts=d.attempts, sent_at=d.sent_at,
                         next_attempt_at=d.next_attempt_at, smtp_code=d.smtp_code, smtp_text=d.smtp_text,
                         message_id=d.message_id)
            for d, email_, subject in session.execute(statement)]


def delivery_log(session: Session, campaign_id: int, *, query: str = "", state: DeliveryState | None = None,
                 after_id: int = 0, limit: int = 100) -> list[DeliveryLine]:
    """A campaign's deliveries, searchable by address or SMTP reply, with the reply of each failure."""
    campaigns.progress(session, campaign_id)  # NotFound for a campaign that does not exist.
    statement = (select(Delivery, Subscriber.email, Campaign.subject)
                 .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
                 .join(Campaign, Campaign.id == Delivery.campaign_id)
                 .where(Delivery.campaign_id == campaign_id, Delivery.id > after_id)
                 .order_by(Delivery.id).limit(limit))
    if state is not None:
        statement = statement.where(Delivery.state == state)
    query = query.strip().lower()
    if query:
        statement = statement.where(or_(Subscriber.email_key.contains(query, autoescape=True),
                                        func.lower(Delivery.smtp_text).contains(query, autoescape=True)))
    return _delivery_lines(session, statement)


@dataclass(frozen=True)
class ConsentLine:
    at: datetime
    action: str
    channel: str
    ip: str | None
    user_agent: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class SubscriberView:
    subscriber: Subscriber
    suppressed: str | None
    consent: list[ConsentLine]
    deliveries: list[DeliveryLine]


def subscriber_view(session: Session, subscriber_id: int) -> SubscriberView:
    subscriber = store.subscriber(session, subscriber_id)
    if subscriber is None:
        raise NotFound(f"There is no subscriber {subscriber_id}.")
    suppressed = None
    if subscriber.email_hash:
        entry = session.scalar(select(Suppression).where(Suppression.email_hash == subscriber.email_hash))
        suppressed = f"{entry.reason}{': ' + entry.detail if entry.detail else ''}" if entry else None
    consent = [ConsentLine(at=e.at, action=e.action, channel=e.channel, ip=e.ip, user_agent=e.user_agent,
                           details=e.details or {})
               for e in session.scalars(select(ConsentEvent).where(ConsentEvent.subscriber_id == subscriber_id)
                                        .order_by(ConsentEvent.id.desc()).limit(200))]
    deliveries = _delivery_lines(session, select(Delivery, Subscriber.email, Campaign.subject)
                                 .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
                                 .join(Campaign, Campaign.id == Delivery.campaign_id)
                                 .where(Delivery.subscriber_id == subscriber_id)
                                 .order_by(Delivery.id.desc()).limit(100))
    return SubscriberView(subscriber=subscriber, suppressed=suppressed, consent=consent, deliveries=deliveries)


@dataclass(frozen=True)
class Preview:
    to: str
    subject: str
    html: str
    text: str


def preview(session: Session, campaign_id: int, *, subscriber_id: int | None = None,
            email_address: str | None = None) -> Preview:
    """The campaign exactly as this reader's mail would carry it (a sample reader without one)."""
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise NotFound(f"There is no campaign {campaign_id}.")
    reader = campaigns.SAMPLE_READER
    subscriber = None
    if subscriber_id is not None:
        subscriber = store.subscriber(session, subscriber_id)
    elif email_address:
        subscriber = session.scalar(select(Subscriber).where(Subscriber.email_key == email_address.strip().lower()))
        if subscriber is None:
            raise InvalidInput("email", f"No subscriber has the address {email_address.strip()[:320]}.")
    if subscriber_id is not None and subscriber is None:
        raise NotFound(f"There is no subscriber {subscriber_id}.")
    if campaign.kind is CampaignKind.digest:
        # A digest differs per reader: show the one this run holds for them (the run's first reader's
        # when none is chosen), exactly as the ledger says it was, or will be, sent.
        found = session.execute(
            select(Delivery.content_id, Delivery.subscriber_id).where(
                Delivery.campaign_id == campaign_id,
                *([Delivery.subscriber_id == subscriber.id] if subscriber is not None else []))
            .order_by(Delivery.id).limit(1)).first()
        if found is None:
            raise InvalidInput("email", "That reader has no digest in this run." if subscriber is not None
                               else "This run holds no digests yet.")
        subscriber = subscriber or store.subscriber(session, found[1])
        content = digests.contents(session, {found[0]}).get(found[0]) if found[0] is not None else None
        if subscriber is None or content is None:
            raise InvalidInput("email", "That reader's digest in this run is no longer available.")
        templates = digests.render_content(session, content, zone=digests.zone_of(campaign.run_key),
                                           day=campaign.created_at)
    else:
        templates = campaigns.message_templates(campaign)
    if subscriber is not None:
        reader = compose.Reader(email=subscriber.email, name=subscriber.name, **tokens.urls(subscriber.id))
    data = templates.for_reader(reader).personalise(reader, message_id=f"<preview.{campaign_id}@preview.invalid>")
    message = email.message_from_bytes(data, policy=email.policy.default)
    html_part = message.get_body(("html",))
    text_part = message.get_body(("plain",))
    return Preview(to=reader.email, subject=str(message["Subject"]),
                   html=html_part.get_content() if html_part else "",
                   text=text_part.get_content() if text_part else "")
