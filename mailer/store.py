"""Named queries. Walk large tables by key (`id > :last`), never by OFFSET."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    any_,
    bindparam,
    case,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY as postgresql_array
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from mailer.models import (
    AdminAction,
    Campaign,
    CampaignStatus,
    Category,
    ConsentEvent,
    Delivery,
    DeliveryState,
    DigestCursor,
    ImportJob,
    InboundMessage,
    Notice,
    NoticeKind,
    NoticeState,
    Status,
    Subscriber,
    Suppression,
    WorkerBeat,
    subscriber_categories,
    utcnow,
)


def one_of(column: Any, values: Sequence[Any] | BindParameter[Any], *, postgresql: bool) -> ColumnElement[bool]:
    """`column IN (values)` for the hot path. On PostgreSQL it is `column = ANY(:array)`: one statement
    text whatever the count, so SQLAlchemy caches it and psycopg prepares it, where an IN list is
    rendered anew for every call. `values` is a list, or a bindparam named for the statement."""
    condition: ColumnElement[bool]
    if postgresql:
        array = postgresql_array(column.type)
        if isinstance(values, BindParameter):
            condition = column == any_(bindparam(values.key, type_=array))
        else:
            condition = column == any_(bindparam(None, list(values), type_=array))
    elif isinstance(values, BindParameter):
        condition = column.in_(bindparam(values.key, expanding=True))
    else:
        condition = column.in_(list(values))
    return condition


def is_postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def subscriber(session: Session, subscriber_id: int, *, for_update: bool = False) -> Subscriber | None:
    query = select(Subscriber).where(Subscriber.id == subscriber_id)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).first()


def subscriber_by_email(session: Session, email_key: str, *, for_update: bool = False) -> Subscriber | None:
    query = select(Subscriber).where(Subscriber.email_key == email_key)
    if for_update:
        query = query.with_for_update()
    return session.scalars(query).first()


def find_subscribers(
    session: Session, *, query: str = "", email: str | None = None, status: Status | None = None,
    after_id: int = 0, limit: int = 100,
) -> Sequence[Subscriber]:
    """Subscribers whose address or name contains `query` (and whose address contains `email`), walked
    by id. Erased rows are left out: they hold no person any more, only a placeholder address."""
    statement = (select(Subscriber).where(Subscriber.id > after_id, Subscriber.erased_at.is_(None))
                 .order_by(Subscriber.id).limit(limit))
    # Searched as typed: % and _ are letters here, not wildcards.
    wanted = query.strip().lower()
    if wanted:
        statement = statement.where(or_(Subscriber.email_key.contains(wanted, autoescape=True),
                                        func.lower(Subscriber.name).contains(wanted, autoescape=True)))
    if email and email.strip():
        statement = statement.where(Subscriber.email_key.contains(email.strip().lower(), autoescape=True))
    if status is not None:
        statement = statement.where(Subscriber.status == status)
    return session.scalars(statement).all()


def categories(session: Session) -> Sequence[Category]:
    return session.scalars(select(Category).order_by(Category.position, Category.id)).all()


def category_by_slug(session: Session, slug: str) -> Category | None:
    return session.scalars(select(Category).where(Category.slug == slug)).first()


def categories_by_slug(session: Session, slugs: Iterable[str]) -> list[Category]:
    """The categories named; unknown slugs are an error the caller reports (see `web.forms`)."""
    wanted = list(dict.fromkeys(slugs))
    if not wanted:
        return []
    found = session.scalars(select(Category).where(Category.slug.in_(wanted))).all()
    return sorted(found, key=lambda c: (c.position, c.id))


def next_category_position(session: Session) -> int:
    return (session.scalar(select(func.max(Category.position))) or 0) + 1


def notices_since(session: Session, subscriber_id: int, kind: NoticeKind, since: datetime) -> int:
    """How many mails of a kind went (or are queued) to a subscriber since a time; feeds the rate limits."""
    return session.scalar(
        select(func.count()).select_from(Notice).where(
            Notice.subscriber_id == subscriber_id, Notice.kind == kind, Notice.created_at >= since
        )
    ) or 0


def claim_notice(session: Session, notice_id: int) -> bool:
    """Move a notice from pending to sending; only one caller ever wins, so a task run twice sends once."""
    result = session.execute(
        update(Notice)
        .where(Notice.id == notice_id, Notice.state == NoticeState.pending)
        .values(state=NoticeState.sending, claimed_at=utcnow())
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def stale_notices(session: Session, *, older_than: timedelta) -> list[int]:
    """Notices still pending long after they were made, or claimed by a sender that never finished.
    Claimed ones go back to pending first."""
    before = utcnow() - older_than
    session.execute(update(Notice).where(Notice.state == NoticeState.sending, Notice.claimed_at < before)
                    .values(state=NoticeState.pending))
    return list(session.scalars(select(Notice.id).where(Notice.state == NoticeState.pending,
                                                        Notice.created_at < before).order_by(Notice.id).limit(1000)))


def finish_notice(
    session: Session, notice_id: int, state: NoticeState, *, message_id: str | None = None, error: str | None = None
) -> None:
    session.execute(
        update(Notice)
        .where(Notice.id == notice_id)
        .values(state=state, message_id=message_id, error=error,
                sent_at=utcnow() if state == NoticeState.sent else None)
    )


def digest_cursor(session: Session, subscriber_id: int) -> datetime | None:
    """Up to when articles have been considered for this reader's digests; None before their first."""
    return session.scalar(select(DigestCursor.at).where(DigestCursor.subscriber_id == subscriber_id))


def forget_digest_cursor(session: Session, subscriber_id: int) -> None:
    """A reader who comes back after months starts afresh: their next digest covers the first window,
    not everything published since they left."""
    session.execute(delete(DigestCursor).where(DigestCursor.subscriber_id == subscriber_id))


# --- Campaigns and deliveries --------------------------------------------------------------------


def insert_for(session: Session) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING on both SQLite and PostgreSQL."""
    if session.get_bind().dialect.name == "postgresql":
        return pg_insert
    return sqlite_insert


def audience(categories: Sequence[str]) -> Any:
    """Confirmed, unsuppressed subscribers in any of the categories. A subscriber who chose no
    category wants them all, so they are in every category's audience."""
    query = select(Subscriber.id).where(
        Subscriber.status == Status.confirmed,
        ~exists().where(Suppression.email_hash == Subscriber.email_hash),
    )
    if categories:
        chose_none = ~exists().where(subscriber_categories.c.subscriber_id == Subscriber.id)
        chose_one = exists().where(
            subscriber_categories.c.subscriber_id == Subscriber.id,
            subscriber_categories.c.category_id == Category.id,
            Category.slug.in_(list(categories)),
        )
        query = query.where(or_(chose_none, chose_one))
    return query


def materialise_deliveries(session: Session, campaign_id: int, categories: Sequence[str]) -> int:
    """One pending delivery per reader in the audience; running it again adds none twice."""
    readers = audience(categories).add_columns(
        literal(campaign_id).label("campaign_id"),
        literal(DeliveryState.pending.value).label("state"),
        literal(0).label("attempts"),
    )
    insert = insert_for(session)(Delivery).from_select(
        ["subscriber_id", "campaign_id", "state", "attempts"], readers
    ).on_conflict_do_nothing()
    session.execute(insert)
    return session.scalar(select(func.count()).select_from(Delivery).where(Delivery.campaign_id == campaign_id)) or 0


@dataclass(frozen=True)
class Claim:
    delivery_id: int
    subscriber_id: int
    attempts: int
    first_failed_at: datetime | None
    # A digest delivery's content in the ledger (digests.contents); None for other campaigns.
    content_id: int | None = None


def claim_deliveries(session: Session, campaign_id: int, worker: str, limit: int) -> list[Claim]:
    """Atomically take up to `limit` pending (then due deferred) deliveries for this worker.

    PostgreSQL: FOR UPDATE SKIP LOCKED lets many workers claim side by side without waiting.
    SQLite: the transaction began with BEGIN IMMEDIATE, so claims are serialised by the file lock.
    Pending and due-deferred rows are claimed by separate queries, so each walks the index in order.
    """
    now = utcnow()
    claims: list[Claim] = []
    for condition in (
        Delivery.state == DeliveryState.pending,
        (Delivery.state == DeliveryState.deferred) & (Delivery.next_attempt_at <= now),
    ):
        wanted = limit - len(claims)
        if wanted <= 0:
            break
        ids = (
            select(Delivery.id)
            .where(Delivery.campaign_id == campaign_id, condition)
            .order_by(Delivery.id)
            .limit(wanted)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        rows = session.execute(
            update(Delivery)
            .where(Delivery.id.in_(ids))
            .values(state=DeliveryState.sending, claimed_by=worker, claimed_at=now, handed_over_at=None,
                    attempts=Delivery.attempts + 1)
            .returning(Delivery.id, Delivery.subscriber_id, Delivery.attempts, Delivery.first_failed_at,
                       Delivery.content_id)
            # No ORM objects of these rows are loaded: matching the returned rows against them is wasted time.
            .execution_options(synchronize_session=False)
        ).all()
        claims.extend(Claim(*row) for row in rows)
    claims.sort(key=lambda claim: claim.delivery_id)
    return claims


# The reason a cancelled campaign's untried deliveries carry.
CANCELLED = "campaign cancelled"


def _give_back(session: Session, claimed: ColumnElement[bool], *, resend_unknown: bool,
               why: str) -> tuple[int, int]:
    """Hand back the claims that `claimed` selects, for the sweeper and for a loop that stops alike.

    A claim never handed over was never tried: pending again. One handed over may have gone: `unknown`,
    or pending when MAILER_RESEND_UNKNOWN accepts the risk of a copy. Claims of a cancelled campaign are
    never pending again, or nothing would ever take them: untried ones are skipped, the others `unknown`.
    Returns how many were untried and how many handed over."""
    cancelled = exists().where(Campaign.id == Delivery.campaign_id, Campaign.status == CampaignStatus.cancelled)
    state_type = Delivery.state.type
    never_tried = session.execute(
        update(Delivery).where(claimed, Delivery.handed_over_at.is_(None))
        .values(state=case((cancelled, literal(DeliveryState.skipped, state_type)),
                           else_=literal(DeliveryState.pending, state_type)),
                smtp_text=case((cancelled, literal(CANCELLED)), else_=Delivery.smtp_text),
                claimed_by=None, attempts=Delivery.attempts - 1)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    resent = DeliveryState.pending if resend_unknown else DeliveryState.unknown
    handed_over = session.execute(
        update(Delivery).where(claimed, Delivery.handed_over_at.is_not(None))
        .values(state=case((cancelled, literal(DeliveryState.unknown, state_type)),
                           else_=literal(resent, state_type)),
                claimed_by=None, smtp_text=why)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return int(never_tried), int(handed_over)


def skip_cancelled(session: Session, campaign_id: int | None = None) -> int:
    """Untried deliveries (pending or deferred) of a cancelled campaign become skipped; without
    `campaign_id`, those of every cancelled campaign (the sweeper's pass, for loops that died after a
    cancel). The claim index (campaign_id, state, id) makes each campaign one short index probe."""
    cancelled = select(Campaign.id).where(Campaign.status == CampaignStatus.cancelled)
    if campaign_id is not None:
        cancelled = cancelled.where(Campaign.id == campaign_id)
    return int(session.execute(
        update(Delivery)
        .where(Delivery.campaign_id.in_(cancelled),
               Delivery.state.in_([DeliveryState.pending, DeliveryState.deferred]))
        .values(state=DeliveryState.skipped, smtp_text=CANCELLED, next_attempt_at=None)
        .execution_options(synchronize_session=False)
    ).rowcount)  # type: ignore[attr-defined]


def sweep_stale_claims(session: Session, *, worker_timeout: float, resend_unknown: bool) -> int:
    """Give back claims whose worker stopped beating (see `_give_back`), and skip what cancelled
    campaigns still hold untried. Returns how many claims were handed back."""
    dead_before = utcnow() - timedelta(seconds=worker_timeout)
    alive = select(WorkerBeat.id).where(WorkerBeat.seen_at >= dead_before)
    stale = (Delivery.state == DeliveryState.sending) & Delivery.claimed_by.not_in(alive) & (
        Delivery.claimed_at < dead_before)
    never_tried, handed_over = _give_back(
        session, stale, resend_unknown=resend_unknown,
        why="the worker stopped after handing the message over; the server may have it")
    skip_cancelled(session)
    session.execute(delete(WorkerBeat).where(WorkerBeat.seen_at < dead_before - timedelta(hours=1)))
    return never_tried + handed_over


def delivery_counts(session: Session, campaign_id: int) -> dict[str, int]:
    counts = {state.value: 0 for state in DeliveryState}
    rows = session.execute(
        select(Delivery.state, func.count()).where(Delivery.campaign_id == campaign_id).group_by(Delivery.state)
    ).all()
    for state, count in rows:
        counts[DeliveryState(state).value] = int(count)
    return counts


def has_claimable(session: Session, campaign_id: int) -> bool:
    due = or_(
        Delivery.state == DeliveryState.pending,
        (Delivery.state == DeliveryState.deferred) & (Delivery.next_attempt_at <= utcnow()),
    )
    return session.scalar(select(exists().where(Delivery.campaign_id == campaign_id, due))) or False


def has_open_work(session: Session, campaign_id: int) -> bool:
    """Anything not yet in a final state: pending, being sent, or waiting for a retry."""
    open_states = [DeliveryState.pending, DeliveryState.sending, DeliveryState.deferred]
    return session.scalar(
        select(exists().where(Delivery.campaign_id == campaign_id, Delivery.state.in_(open_states)))
    ) or False


def being_sent(session: Session, campaign_id: int, *, worker_timeout: float) -> bool:
    """Whether a live loop holds claims on this campaign right now."""
    alive = select(WorkerBeat.id).where(WorkerBeat.seen_at >= utcnow() - timedelta(seconds=worker_timeout))
    return session.scalar(select(exists().where(
        Delivery.campaign_id == campaign_id, Delivery.state == DeliveryState.sending, Delivery.claimed_by.in_(alive),
    ))) or False


def release_claims(session: Session, token: str, *, resend_unknown: bool) -> int:
    """A loop that stops hands back what it claimed and did not try; anything handed over but not
    recorded (an error between DATA and the record) may have gone (see `_give_back`)."""
    mine = (Delivery.state == DeliveryState.sending) & (Delivery.claimed_by == token)
    return _give_back(session, mine, resend_unknown=resend_unknown,
                      why="the sending loop stopped after handing the message over; the server may have it")[0]


@dataclass(frozen=True, slots=True)
class ReaderRow:
    """What the sending loop needs of a subscriber, without ORM objects on the hot path."""

    id: int
    email: str
    name: str
    status: Status
    email_hash: str | None


def readers(session: Session, subscriber_ids: Sequence[int]) -> dict[int, ReaderRow]:
    rows = session.execute(
        select(Subscriber.id, Subscriber.email, Subscriber.name, Subscriber.status, Subscriber.email_hash)
        .where(one_of(Subscriber.id, subscriber_ids, postgresql=is_postgresql(session)))
    )
    return {row[0]: ReaderRow(*row) for row in rows}


def is_suppressed(session: Session, email_hashes: Iterable[str]) -> set[str]:
    wanted = list(email_hashes)
    if not wanted:
        return set()
    return set(session.scalars(select(Suppression.email_hash).where(
        one_of(Suppression.email_hash, wanted, postgresql=is_postgresql(session)))))


def add_suppression(session: Session, *, email_hash: str, email: str | None, reason: str, detail: str) -> None:
    session.execute(
        insert_for(session)(Suppression)
        .values(email_hash=email_hash, email=email, reason=reason, detail=detail, created_at=utcnow())
        .on_conflict_do_nothing()
    )



def forget_suppressed_address(session: Session, email_hash: str) -> None:
    session.execute(update(Suppression).where(Suppression.email_hash == email_hash).values(email=None))


def forget_consent_details(session: Session, subscriber_id: int) -> None:
    """Erasure: the consent trail keeps what happened and when, but no address, client or free text."""
    session.execute(
        update(ConsentEvent).where(ConsentEvent.subscriber_id == subscriber_id)
        .values(ip=None, user_agent=None, details={})
    )


def forget_inbound_mail(session: Session, subscriber_id: int) -> None:
    """Erasure: bounces and replies that named the person keep their verdict but lose the mail itself."""
    session.execute(
        update(InboundMessage).where(InboundMessage.subscriber_id == subscriber_id)
        .values(raw=b"(erased)", mail_from="", rcpt_to="", subject="", detail="(erased)")
    )


def forget_address_in_records(session: Session, subscriber_id: int, addresses: set[str]) -> None:
    """Erasure: the address also goes from SMTP replies, notice errors, the admins' audit trail and the
    reports and files of CSV imports, wherever it was quoted."""
    erased = f"(erased subscriber {subscriber_id})"
    for address in addresses:
        for column, where in ((Delivery.smtp_text, Delivery.subscriber_id == subscriber_id),
                              (Notice.error, Notice.subscriber_id == subscriber_id)):
            session.execute(update(column.class_).where(where, column.is_not(None))
                            .values({column.key: func.replace(column, address, erased)}))
    keys = {address.lower() for address in addresses}
    session.execute(update(AdminAction).where(func.lower(AdminAction.target).in_(keys)).values(target=erased))
    for job_id, errors, content in session.execute(select(ImportJob.id, ImportJob.errors, ImportJob.content)):
        kept = [e for e in errors if str(e.get("email", "")).strip().lower() not in keys]
        # A waiting dry run's file names the person: it goes, and the admin uploads a fresh one.
        named = content is not None and any(key in content.lower() for key in keys)
        if len(kept) != len(errors) or named:
            session.execute(update(ImportJob).where(ImportJob.id == job_id).values(
                errors=kept, content=None if named else content))


def drop_unsent_notices(session: Session, subscriber_id: int) -> None:
    session.execute(
        update(Notice).where(Notice.subscriber_id == subscriber_id, Notice.state == NoticeState.pending)
        .values(state=NoticeState.skipped, error="The subscriber was erased.")
    )


# An admin's own block (a spam trap, a legal request) holds even against the person's fresh consent,
# and so does a spam complaint: such an address is never mailed again, not even a confirmation link.
ADMIN_BLOCK = "admin"
FOR_GOOD = (ADMIN_BLOCK, "complaint")


def blocked_for_good(session: Session, email_hash: str | None) -> bool:
    if email_hash is None:
        return False
    return session.scalar(select(Suppression.id).where(Suppression.email_hash == email_hash,
                                                       Suppression.reason.in_(FOR_GOOD))) is not None


def lift_suppression(session: Session, email_hash: str | None) -> list[str]:
    """The person confirmed a fresh sign-up through a mailed link: the address works and they want mail
    again, so an entry from a bounce or an earlier erasure goes. Returns the reasons lifted."""
    if email_hash is None:
        return []
    reasons = list(session.scalars(delete(Suppression).where(
        Suppression.email_hash == email_hash, Suppression.reason.not_in(FOR_GOOD)).returning(Suppression.reason)))
    return reasons
