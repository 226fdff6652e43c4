"""Named queries. Walk large tables by key (`id > :last`), never by OFFSET."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from mailer.models import Category, Notice, NoticeKind, NoticeState, Status, Subscriber, utcnow


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
    session: Session, *, email: str | None = None, status: Status | None = None, after_id: int = 0, limit: int = 100
) -> Sequence[Subscriber]:
    query = select(Subscriber).where(Subscriber.id > after_id).order_by(Subscriber.id).limit(limit)
    if email:
        query = query.where(Subscriber.email_key.contains(email.lower(), autoescape=True))
    if status:
        query = query.where(Subscriber.status == status)
    return session.scalars(query).all()


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
        .values(state=NoticeState.sending)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def finish_notice(
    session: Session, notice_id: int, state: NoticeState, *, message_id: str | None = None, error: str | None = None
) -> None:
    session.execute(
        update(Notice)
        .where(Notice.id == notice_id)
        .values(state=state, message_id=message_id, error=error,
                sent_at=utcnow() if state == NoticeState.sent else None)
    )
