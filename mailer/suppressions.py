"""The suppression list as admins see it: addresses that get no mail, each with a reason.

Entries are keyed by the hash of the address (see models.Suppression); an erased person's entry has
no address at all, and still stops an import or a sign-up from mailing them again.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session

from mailer import admins, store
from mailer.errors import InvalidInput, NotFound
from mailer.models import Suppression
from mailer.subscriptions import hash_email, normalize_email


@dataclass(frozen=True)
class Entry:
    id: int
    email: str | None
    reason: str
    detail: str
    created_at: datetime


def _reason(text: str) -> str:
    reason = " ".join((text or "").split())
    if not reason:
        raise InvalidInput("reason", "Say why, in a few words; the reason is kept with the entry.")
    if len(reason) > 500:
        raise InvalidInput("reason", "Keep the reason under 500 characters.")
    return reason


def entries(session: Session, *, query: str = "", before_id: int | None = None, limit: int = 100) -> list[Entry]:
    """Newest first, walked by id. A query matches part of the address, the reason, or the exact address."""
    statement = select(Suppression).order_by(Suppression.id.desc()).limit(limit)
    if before_id:
        statement = statement.where(Suppression.id < before_id)
    query = query.strip()
    if query:
        # Searched as typed: % and _ are letters here, not wildcards.
        clauses = [func.lower(Suppression.email).contains(query.lower(), autoescape=True),
                   func.lower(Suppression.detail).contains(query.lower(), autoescape=True),
                   Suppression.reason == query.lower()]
        with contextlib.suppress(InvalidInput):
            clauses.append(Suppression.email_hash == hash_email(normalize_email(query)[1]))
        statement = statement.where(or_(*clauses))
    return [Entry(id=s.id, email=s.email, reason=s.reason, detail=s.detail, created_at=s.created_at)
            for s in session.scalars(statement)]


def add(session: Session, *, email: str, reason: str, actor: str) -> None:
    address, key = normalize_email(email)
    why = _reason(reason)
    store.add_suppression(session, email_hash=hash_email(key), email=address, reason=store.ADMIN_BLOCK, detail=why)
    admins.record(session, actor=actor, action="suppress", target=address, reason=why)


def remove(session: Session, *, entry_id: int, reason: str, actor: str) -> Suppression:
    why = _reason(reason)
    entry = session.get(Suppression, entry_id)
    if entry is None:
        raise NotFound(f"There is no suppression entry {entry_id}.")
    session.execute(delete(Suppression).where(Suppression.id == entry_id))
    admins.record(session, actor=actor, action="unsuppress", target=entry.email or f"hash {entry.email_hash[:12]}…",
                  reason=f"{why} (was: {entry.reason}{': ' + entry.detail if entry.detail else ''})")
    return entry
