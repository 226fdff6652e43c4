"""The tables. Every subscription state change lives in `subscriptions.py`; queries live in `store.py`."""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores naive UTC and hands back aware UTC, so SQLite and PostgreSQL behave the same."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware one")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        parsed: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
        return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Status(enum.StrEnum):
    pending = "pending"
    confirmed = "confirmed"
    unsubscribed = "unsubscribed"
    bounced = "bounced"
    complained = "complained"


class Frequency(enum.StrEnum):
    daily = "daily"
    weekly = "weekly"


class NoticeKind(enum.StrEnum):
    confirm = "confirm"
    welcome = "welcome"


class NoticeState(enum.StrEnum):
    pending = "pending"
    sending = "sending"
    sent = "sent"
    skipped = "skipped"
    failed = "failed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable, and readable in SQL.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=20,
                values_callable=lambda members: [m.value for m in members])


subscriber_categories = Table(
    "subscriber_categories",
    Base.metadata,
    Column("subscriber_id", ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True),
    Column("category_id", ForeignKey("categories.id", ondelete="CASCADE"), primary_key=True),
)


class Category(Base):
    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(primary_key=True)
    slug: Mapped[str] = mapped_column(String(120), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    position: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Subscriber(Base):
    __tablename__ = "subscribers"

    id: Mapped[int] = mapped_column(primary_key=True)
    # The address as normalised by email-validator, and its lower-cased form, unique.
    email: Mapped[str] = mapped_column(String(320))
    email_key: Mapped[str] = mapped_column(String(320), unique=True)
    # sha256 of email_key: joins with the suppression list, which may hold only the hash.
    email_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    frequency: Mapped[Frequency] = mapped_column(_enum(Frequency, "frequency"), default=Frequency.daily)
    status: Mapped[Status] = mapped_column(_enum(Status, "subscriber_status"), default=Status.pending)
    # A confirmation link carries this nonce; confirming clears it, so every link works once.
    confirm_nonce: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    unsubscribed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The reader's time zone for the digest hour; None means the site's (MAILER_TIMEZONE).
    timezone: Mapped[str | None] = mapped_column(String(64), default=None)
    # Set when the person's data was erased (GDPR art. 17); only a hashed suppression entry remains.
    erased_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Soft bounces (bounces.py): a score that counts at most one bounce a day and starts again after a quiet spell.
    bounce_score: Mapped[float] = mapped_column(Float, default=0.0)
    last_bounce_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    categories: Mapped[list[Category]] = relationship(
        secondary=subscriber_categories, order_by=Category.position, lazy="selectin"
    )

    # Never reuse a deleted subscriber's id on SQLite: links in old mails carry it.
    __table_args__ = (Index("ix_subscribers_status", "status", "id"), {"sqlite_autoincrement": True})


class ConsentEvent(Base):
    """Who agreed to what, when, from where and through which channel (GDPR art. 7)."""

    __tablename__ = "consent_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscribers.id", ondelete="SET NULL"), index=True
    )
    action: Mapped[str] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(400))
    channel: Mapped[str] = mapped_column(String(40))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Notice(Base):
    """One transactional mail (confirmation, welcome) to one subscriber, with an explicit state.

    The row is written in the same transaction as the change that causes it; the task that sends it
    claims it from `pending` first, so running the task twice sends one mail.
    """

    __tablename__ = "notices"

    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    kind: Mapped[NoticeKind] = mapped_column(_enum(NoticeKind, "notice_kind"))
    state: Mapped[NoticeState] = mapped_column(_enum(NoticeState, "notice_state"), default=NoticeState.pending)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    message_id: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_notices_subscriber_kind", "subscriber_id", "kind", "created_at"),)


class CampaignKind(enum.StrEnum):
    broadcast = "broadcast"
    digest = "digest"


class CampaignStatus(enum.StrEnum):
    draft = "draft"
    scheduled = "scheduled"
    sending = "sending"
    paused = "paused"
    cancelled = "cancelled"
    finished = "finished"


class DeliveryState(enum.StrEnum):
    """pending → sending → sent; or deferred (retry at a time), failed (for good), skipped, unknown."""

    pending = "pending"
    sending = "sending"
    sent = "sent"
    deferred = "deferred"
    failed = "failed"
    skipped = "skipped"
    unknown = "unknown"


class Campaign(Base):
    __tablename__ = "campaigns"
    __table_args__ = (UniqueConstraint("run_key", name="uq_campaigns_run_key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[CampaignKind] = mapped_column(_enum(CampaignKind, "campaign_kind"), default=CampaignKind.broadcast)
    subject: Mapped[str] = mapped_column(Text)
    html: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text, default="")
    # Category slugs of the audience; empty means everyone confirmed.
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[CampaignStatus] = mapped_column(
        _enum(CampaignStatus, "campaign_status"), default=CampaignStatus.draft
    )
    # Why the campaign is in its status, when a person should know (e.g. why it paused itself).
    status_reason: Mapped[str] = mapped_column(Text, default="")
    scheduled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    total: Mapped[int] = mapped_column(Integer, default=0)
    # A digest run is one campaign per frequency and period ("daily:2026-11-25"): running it again finds it.
    run_key: Mapped[str | None] = mapped_column(String(60), default=None)
    # True while a digest run is still adding readers: sending has begun, but the campaign cannot finish.
    building: Mapped[bool] = mapped_column(default=False)
    # When a digest run's builder last committed a batch: one not heard from for a while has died, and
    # the run is offered again (digests.due).
    built_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # The Markdown an admin wrote, when they wrote Markdown; `html` is made from it.
    markdown: Mapped[str | None] = mapped_column(Text, default=None)


class Delivery(Base):
    """One (campaign, subscriber) pair, unique, with an explicit state."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    state: Mapped[DeliveryState] = mapped_column(_enum(DeliveryState, "delivery_state"), default=DeliveryState.pending)
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    claimed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Set in its own commit just before DATA: after a crash, a claim without it was never tried.
    handed_over_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    first_failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    message_id: Mapped[str | None] = mapped_column(String(255))
    smtp_code: Mapped[int | None] = mapped_column(SmallInteger)
    smtp_text: Mapped[str | None] = mapped_column(Text)
    # A digest delivery's entry in the ledger: what it carries (digests.py). None for other campaigns.
    content_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("digest_contents.id", ondelete="CASCADE"),
        default=None)

    __table_args__ = (
        UniqueConstraint("campaign_id", "subscriber_id", name="uq_deliveries_campaign_subscriber"),
        Index("ix_deliveries_claim", "campaign_id", "state", "id"),
        # A reader's deliveries, and among them their digests from a given content on (the ledger's reads).
        Index("ix_deliveries_subscriber_content", "subscriber_id", "content_id"),
    )


class Suppression(Base):
    """An address that must never get mail again. Keyed by a hash so erasure can drop the address itself."""

    __tablename__ = "suppressions"

    id: Mapped[int] = mapped_column(primary_key=True)
    email_hash: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(320))
    reason: Mapped[str] = mapped_column(String(40))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerBeat(Base):
    """A sending process's heartbeat; claims held by a process that stopped beating go back to the queue."""

    __tablename__ = "worker_beats"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


article_categories = Table(
    "article_categories",
    Base.metadata,
    Column("article_id", ForeignKey("articles.id", ondelete="CASCADE"), primary_key=True),
    Column("category_id", ForeignKey("categories.id", ondelete="CASCADE"), primary_key=True),
)


class Article(Base):
    __tablename__ = "articles"

    id: Mapped[int] = mapped_column(primary_key=True)
    url: Mapped[str] = mapped_column(String(2000), unique=True)
    title: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(200), default="")
    author: Mapped[str] = mapped_column(String(200), default="")
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Sanitised HTML (nh3 allow-list): safe to put into a mail as it is.
    summary: Mapped[str] = mapped_column(Text, default="")
    image_url: Mapped[str | None] = mapped_column(String(2000), default=None)
    ingested_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    categories: Mapped[list[Category]] = relationship(
        secondary=article_categories, order_by=Category.position, lazy="selectin"
    )


class DigestContent(Base):
    """The ledger: what a digest shows, once per distinct content in a run. A digest delivery points at
    its content (`Delivery.content_id`), so the ledger costs a reader no row of its own, and a run of a
    hundred thousand readers holds a few dozen of these.

    `sections` is [[category id or null, [listed article ids], [article ids counted in "and K more"]], …];
    `key` is the SHA-256 of its JSON text, unique within the run. `created_at` is the run's cutoff: a
    reader's received articles are the ids in the contents of their digests since the oldest article
    still eligible.
    """

    __tablename__ = "digest_contents"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(64))
    sections: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    __table_args__ = (UniqueConstraint("campaign_id", "key", name="uq_digest_contents_campaign_key"),)


class DigestCursor(Base):
    """Where a reader's digests stand: articles ingested up to `at` have been considered for them. No row
    means the reader's first digest is still to come.

    A run moves every due reader's cursor. In this narrow table, with room left on each PostgreSQL page,
    that is a heap-only update of a small row; on `subscribers` it rewrote the whole row and all four of
    its indexes, every day, for every reader.
    """

    __tablename__ = "digest_cursors"

    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"), primary_key=True,
                                               autoincrement=False)
    at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = ({"postgresql_with": {"fillfactor": 50}},)


class Feed(Base):
    """A polled feed and what its server said last time, for conditional GET."""

    __tablename__ = "feeds"

    url: Mapped[str] = mapped_column(String(2000), primary_key=True)
    etag: Mapped[str | None] = mapped_column(String(500), default=None)
    last_modified: Mapped[str | None] = mapped_column(String(100), default=None)
    polled_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    status: Mapped[str] = mapped_column(Text, default="")
    # Added through the admin API (feeds from MAILER_FEEDS are polled whatever this says).
    added: Mapped[bool] = mapped_column(default=False)


class Admin(Base):
    """A person who runs the console. The password is an argon2 hash; repeated failures lock the account."""

    __tablename__ = "admins"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)


class AdminSession(Base):
    """A signed-in browser. The cookie holds a random token; only its sha256 is stored here."""

    __tablename__ = "admin_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_id: Mapped[int] = mapped_column(ForeignKey("admins.id", ondelete="CASCADE"), index=True)
    # Every form of this session carries this value; a forged cross-site POST cannot know it.
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class AdminAction(Base):
    """What an admin did to subscribers and the suppression list, and why: the console's audit trail."""

    __tablename__ = "admin_actions"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(400), default="")
    reason: Mapped[str] = mapped_column(Text, default="")


class ImportState(enum.StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


class ImportJob(Base):
    """One CSV import of subscribers: the file waits here, so the task that runs it carries only the id."""

    __tablename__ = "import_jobs"

    id: Mapped[int] = mapped_column(primary_key=True)
    filename: Mapped[str] = mapped_column(String(300), default="")
    actor: Mapped[str] = mapped_column(String(320), default="")
    dry_run: Mapped[bool] = mapped_column(default=False)
    # Options chosen at upload: e.g. {"confirm_pending": true}.
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[ImportState] = mapped_column(_enum(ImportState, "import_state"), default=ImportState.queued)
    # The uploaded file, dropped once the import is done: it holds personal data.
    content: Mapped[str | None] = mapped_column(Text, default=None)
    total: Mapped[int] = mapped_column(Integer, default=0)
    processed: Mapped[int] = mapped_column(Integer, default=0)
    counts: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    # [{"row": 7, "email": "…", "error": "…"}, …], at most a few thousand.
    errors: Mapped[list[Any]] = mapped_column(JSON, default=list)
    message: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Moves with every committed chunk: a job that stopped moving lost its worker and is queued again.
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
class InboundKind(enum.StrEnum):
    """What an inbound message turned out to be. Only `unclassified` is left for a person to read."""

    pending = "pending"
    unsubscribe = "unsubscribe"
    bounce = "bounce"
    delay = "delay"
    complaint = "complaint"
    ignored = "ignored"
    unclassified = "unclassified"


# Kinds that were understood: an IMAP message of one of these kinds may be deleted from the mailbox.
UNDERSTOOD = frozenset({InboundKind.unsubscribe, InboundKind.bounce, InboundKind.delay, InboundKind.complaint,
                        InboundKind.ignored})


class InboundMessage(Base):
    """One thing that came back: a mail (SMTP listener, IMAP mailbox) or one event of a provider's webhook.

    The raw bytes are kept as received, so an admin can read exactly what arrived."""

    __tablename__ = "inbound_messages"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    # smtp, imap, ses, postmark, sendgrid.
    channel: Mapped[str] = mapped_column(String(20))
    # Unique per source: "imap:<uidvalidity>:<uid>", an SNS MessageId, a SendGrid event id… so a retry adds nothing.
    source_ref: Mapped[str | None] = mapped_column(String(300), unique=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    mail_from: Mapped[str] = mapped_column(String(500), default="")
    rcpt_to: Mapped[str] = mapped_column(Text, default="")
    subject: Mapped[str] = mapped_column(Text, default="")
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    kind: Mapped[InboundKind] = mapped_column(_enum(InboundKind, "inbound_kind"), default=InboundKind.pending)
    # hard or soft, for bounces.
    severity: Mapped[str] = mapped_column(String(10), default="")
    status_code: Mapped[str] = mapped_column(String(20), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
    subscriber_id: Mapped[int | None] = mapped_column(ForeignKey("subscribers.id", ondelete="SET NULL"))
    delivery_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), ForeignKey("deliveries.id", ondelete="SET NULL"))
    campaign_id: Mapped[int | None] = mapped_column(ForeignKey("campaigns.id", ondelete="SET NULL"))
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    # Set when the message was deleted from the IMAP mailbox it came from.
    removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (
        Index("ix_inbound_kind", "kind", "id"),
        Index("ix_inbound_campaign_kind", "campaign_id", "kind"),
        {"sqlite_autoincrement": True},
    )
