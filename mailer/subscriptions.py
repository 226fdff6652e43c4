"""Every subscription state change, each recorded as a consent event.

    (new) ──subscribe──▶ pending ──confirm──▶ confirmed ──unsubscribe──▶ unsubscribed
                                                 │                         │
                                                 ├──bounce──▶ bounced      └─subscribe+confirm─▶ confirmed
                                                 └──complaint──▶ complained

A sign-up answers the same whatever the address's state, so callers must not tell the person
what happened; the functions here return what was done for the caller's own bookkeeping only.
"""

from __future__ import annotations

import hashlib
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import timedelta

from email_validator import EmailNotValidError, validate_email
from sqlalchemy.orm import Session

from mailer import store, tokens
from mailer.config import get_settings
from mailer.errors import InvalidEmail, InvalidInput, NotFound, UsedToken
from mailer.models import Category, ConsentEvent, Frequency, Notice, NoticeKind, Status, Subscriber, utcnow

NAME_MAX = 200


@dataclass(frozen=True)
class Origin:
    """Where a change came from: the channel (form, api, one-click, email…), and the client."""

    channel: str
    ip: str | None = None
    user_agent: str | None = None


@dataclass(frozen=True)
class Choices:
    """What a reader picks on a form; an empty category list means every category."""

    name: str = ""
    categories: tuple[str, ...] = ()
    frequency: Frequency = Frequency.daily


def normalize_email(raw: str) -> tuple[str, str]:
    """Return (normalised address, unique key), or raise InvalidEmail with a sentence for a person."""
    raw = (raw or "").strip()
    if not raw:
        raise InvalidEmail("Please enter your email address.")
    if len(raw) > 320 or any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise InvalidEmail("That email address is not valid.")
    try:
        # Internationalised local parts need SMTPUTF8 end to end, which many servers lack: refuse them
        # clearly rather than accept an address we cannot mail. Unicode domains are kept as IDNA (ASCII).
        result = validate_email(raw, check_deliverability=get_settings().check_deliverability,
                                allow_smtputf8=False)
    except EmailNotValidError as error:
        raise InvalidEmail(f"That email address is not valid: {error}") from None
    address = result.ascii_email or result.normalized
    return address, address.lower()


def hash_email(email_key: str) -> str:
    """The suppression list's key for an address (see models.Suppression)."""
    return hashlib.sha256(email_key.encode()).hexdigest()


def clean_name(raw: str | None) -> str:
    """A display name with control characters (CR, LF, NUL…) turned into spaces, so no header can be injected."""
    text = "".join(" " if unicodedata.category(ch) in {"Cc", "Cf", "Zl", "Zp"} else ch for ch in raw or "")
    text = " ".join(text.split())
    if len(text) > NAME_MAX:
        raise InvalidInput("name", f"Please keep your name under {NAME_MAX} characters.")
    return text


def _record(session: Session, subscriber: Subscriber | None, action: str, origin: Origin, **details: object) -> None:
    session.add(
        ConsentEvent(
            subscriber_id=subscriber.id if subscriber else None,
            action=action,
            ip=origin.ip,
            user_agent=(origin.user_agent or "")[:400] or None,
            channel=origin.channel,
            details=details,
        )
    )


def _categories(session: Session, choices: Choices) -> list[Category]:
    found = store.categories_by_slug(session, choices.categories)
    unknown = sorted(set(choices.categories) - {c.slug for c in found})
    if unknown:
        raise InvalidInput("categories", f"Unknown category: {', '.join(unknown)}.")
    return found


def _apply_choices(session: Session, subscriber: Subscriber, choices: Choices) -> None:
    subscriber.name = clean_name(choices.name)
    subscriber.frequency = Frequency(choices.frequency)
    subscriber.categories = _categories(session, choices)


def _queue_confirmation(session: Session, subscriber: Subscriber) -> Notice | None:
    """Queue a confirmation mail unless the address had one within the last minutes or hit its daily cap."""
    settings = get_settings()
    now = utcnow()
    recent = store.notices_since(
        session, subscriber.id, NoticeKind.confirm, now - timedelta(minutes=settings.confirm_resend_minutes)
    )
    today = store.notices_since(session, subscriber.id, NoticeKind.confirm, now - timedelta(days=1))
    if recent or today >= settings.confirm_daily_cap:
        return None
    if subscriber.confirm_nonce is None:
        subscriber.confirm_nonce = secrets.token_urlsafe(12)
    notice = Notice(subscriber_id=subscriber.id, kind=NoticeKind.confirm)
    session.add(notice)
    session.flush()
    return notice


def subscribe(session: Session, *, email: str, choices: Choices, origin: Origin) -> Notice | None:
    """Sign an address up for double opt-in; returns the confirmation notice to send, if any."""
    address, key = normalize_email(email)
    # Every input is checked before the address is looked up: an error must never depend on who is subscribed.
    _categories(session, choices)
    subscriber = store.subscriber_by_email(session, key, for_update=True)
    if subscriber is None:
        subscriber = Subscriber(email=address, email_key=key, email_hash=hash_email(key), status=Status.pending)
        _apply_choices(session, subscriber, choices)
        session.add(subscriber)
        session.flush()
        _record(session, subscriber, "subscribe", origin, categories=list(choices.categories),
                frequency=str(choices.frequency))
        return _queue_confirmation(session, subscriber)
    if subscriber.status == Status.confirmed:
        # Already confirmed: nothing to do, and nothing may change on an unauthenticated request.
        return None
    if subscriber.status == Status.complained:
        # Someone who marked our mail as spam is never mailed again, not even to confirm.
        return None
    _apply_choices(session, subscriber, choices)
    _record(session, subscriber, "subscribe", origin, categories=list(choices.categories),
            frequency=str(choices.frequency), previous_status=str(subscriber.status))
    return _queue_confirmation(session, subscriber)


def _confirmable(session: Session, subscriber_id: int, nonce: object) -> Subscriber:
    subscriber = store.subscriber(session, subscriber_id, for_update=True)
    if subscriber is None:
        raise NotFound("This subscription no longer exists.")
    if subscriber.confirm_nonce is None or not isinstance(nonce, str) \
            or not secrets.compare_digest(subscriber.confirm_nonce, nonce):
        raise UsedToken(subscriber.id)
    return subscriber


def check_confirm_token(session: Session, token: str) -> Subscriber:
    """The subscriber a confirm link is for, if the link is valid, unexpired and unused."""
    payload = tokens.read(tokens.Purpose.confirm, token, max_age=get_settings().confirm_ttl_hours * 3600)
    return _confirmable(session, payload[0], payload[1] if len(payload) > 1 else None)


def confirm(session: Session, *, token: str, origin: Origin) -> tuple[Subscriber, Notice | None]:
    """Confirm a subscription from its link; returns the welcome notice to send, if any."""
    subscriber = check_confirm_token(session, token)
    subscriber.status = Status.confirmed
    subscriber.confirmed_at = utcnow()
    subscriber.unsubscribed_at = None
    subscriber.confirm_nonce = None
    store.forget_digest_cursor(session, subscriber.id)
    lifted = store.lift_suppression(session, subscriber.email_hash)
    if lifted:
        _record(session, subscriber, "confirm", origin, lifted_suppression=lifted)
    else:
        _record(session, subscriber, "confirm", origin)
    welcome = None
    if get_settings().send_welcome:
        welcome = Notice(subscriber_id=subscriber.id, kind=NoticeKind.welcome)
        session.add(welcome)
        session.flush()
    return subscriber, welcome


def resend_confirmation(session: Session, *, subscriber_id: int, origin: Origin) -> Notice | None:
    """A fresh confirmation mail for someone whose link expired (rate limits apply)."""
    subscriber = store.subscriber(session, subscriber_id, for_update=True)
    if subscriber is None or subscriber.status in {Status.confirmed, Status.complained}:
        return None
    _record(session, subscriber, "resend-confirmation", origin)
    return _queue_confirmation(session, subscriber)


def check_timezone(value: str | None) -> str | None:
    """A time zone name such as Europe/London, or None for the site's."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    value = (value or "").strip()
    if not value:
        return None
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput("timezone", f"{value[:64]!r} is not a time zone; pick one such as Europe/London.") \
            from None
    return value


def update_preferences(session: Session, *, subscriber: Subscriber, choices: Choices, origin: Origin,
                       timezone: str | None = None) -> None:
    before = {
        "name": subscriber.name,
        "categories": [c.slug for c in subscriber.categories],
        "frequency": str(subscriber.frequency),
        "timezone": subscriber.timezone,
    }
    _apply_choices(session, subscriber, choices)
    subscriber.timezone = check_timezone(timezone)
    _record(session, subscriber, "preferences", origin, before=before,
            after={"name": subscriber.name, "categories": list(choices.categories),
                   "frequency": str(subscriber.frequency), "timezone": subscriber.timezone})


def unsubscribe(session: Session, *, subscriber_id: int, origin: Origin) -> Subscriber:
    """Unsubscribe at once; doing it again changes nothing and is not an error."""
    subscriber = store.subscriber(session, subscriber_id, for_update=True)
    if subscriber is None:
        raise NotFound("This subscription no longer exists.")
    if subscriber.status in {Status.pending, Status.confirmed}:
        subscriber.status = Status.unsubscribed
        subscriber.unsubscribed_at = utcnow()
        subscriber.confirm_nonce = None
        _record(session, subscriber, "unsubscribe", origin)
    return subscriber


def add_by_admin(
    session: Session, *, email: str, choices: Choices, confirmed: bool, source: str, welcome: bool, origin: Origin
) -> tuple[Subscriber, Notice | None, bool]:
    """Add someone on an admin's word. Returns (subscriber, notice to send, created)."""
    address, key = normalize_email(email)
    subscriber = store.subscriber_by_email(session, key, for_update=True)
    created = subscriber is None
    if subscriber is not None and subscriber.status in {Status.unsubscribed, Status.bounced, Status.complained}:
        # An admin cannot undo a reader's own decision to leave; the reader must sign up again.
        raise InvalidInput(
            "email", f"This address is {subscriber.status.value}; only its owner can subscribe it again."
        )
    if subscriber is None:
        subscriber = Subscriber(email=address, email_key=key, email_hash=hash_email(key), status=Status.pending)
        session.add(subscriber)
    _apply_choices(session, subscriber, choices)
    session.flush()
    notice: Notice | None = None
    if confirmed:
        if subscriber.status != Status.confirmed:
            subscriber.status = Status.confirmed
            subscriber.confirmed_at = utcnow()
            subscriber.confirm_nonce = None
            store.forget_digest_cursor(session, subscriber.id)
        _record(session, subscriber, "admin-add", origin, source=source, confirmed=True)
        if welcome:
            notice = Notice(subscriber_id=subscriber.id, kind=NoticeKind.welcome)
            session.add(notice)
            session.flush()
    else:
        _record(session, subscriber, "admin-add", origin, source=source, confirmed=False)
        if subscriber.status != Status.confirmed:
            notice = _queue_confirmation(session, subscriber)
    return subscriber, notice, created


def mark_bounced(session: Session, *, subscriber: Subscriber, detail: str, origin: Origin) -> None:
    """A hard bounce: the address does not take mail. It gets none until its owner signs up again."""
    if subscriber.status in {Status.bounced, Status.complained}:
        return
    subscriber.status = Status.bounced
    subscriber.confirm_nonce = None
    _record(session, subscriber, "bounce", origin, detail=detail[:500])


def suppress(session: Session, *, subscriber: Subscriber, reason: str, origin: Origin) -> None:
    """Put the address on the suppression list: it gets no mail of any kind, whatever its status."""
    if subscriber.email_hash is None:
        return
    store.add_suppression(session, email_hash=subscriber.email_hash, email=subscriber.email,
                          reason=store.ADMIN_BLOCK, detail=reason)
    _record(session, subscriber, "suppress", origin, reason=reason[:500])


def erase(session: Session, *, subscriber_id: int, reason: str, origin: Origin) -> Subscriber:
    """Erase a person's data (GDPR art. 17) and keep only the hash of their address, suppressed.

    The row stays, emptied, so campaign statistics still add up; an import of the same address later
    meets the suppression entry and is skipped.
    """
    subscriber = store.subscriber(session, subscriber_id, for_update=True)
    if subscriber is None:
        raise NotFound(f"There is no subscriber {subscriber_id}.")
    if subscriber.erased_at is not None:
        return subscriber
    email_hash = subscriber.email_hash or hash_email(subscriber.email_key)
    store.add_suppression(session, email_hash=email_hash, email=None, reason="erased", detail=reason)
    # An earlier suppression entry may carry the address itself; erasure removes it there too.
    store.forget_suppressed_address(session, email_hash)
    store.forget_consent_details(session, subscriber.id)
    store.forget_inbound_mail(session, subscriber.id)
    store.forget_address_in_records(session, subscriber.id, {subscriber.email, subscriber.email_key})
    store.drop_unsent_notices(session, subscriber.id)
    placeholder = f"erased-{subscriber.id}@erased.invalid"
    subscriber.email = subscriber.email_key = placeholder
    subscriber.email_hash = None
    subscriber.name = ""
    subscriber.timezone = None
    subscriber.categories = []
    subscriber.confirm_nonce = None
    if subscriber.status in {Status.pending, Status.confirmed}:
        subscriber.status = Status.unsubscribed
        subscriber.unsubscribed_at = utcnow()
    subscriber.erased_at = utcnow()
    # The erasure itself is recorded without the address or the client: it proves the request was met.
    _record(session, subscriber, "erase", Origin(channel=origin.channel), reason=reason[:500])
    return subscriber


def update_by_admin(session: Session, *, subscriber: Subscriber, choices: Choices, timezone: str | None,
                    origin: Origin) -> None:
    """An admin's correction of name, categories, frequency or time zone; recorded like a reader's own."""
    if subscriber.erased_at is not None:
        raise InvalidInput("subscriber", "This subscriber's data was erased; there is nothing to edit.")
    update_preferences(session, subscriber=subscriber, choices=choices, origin=origin, timezone=timezone)


def mark_complained(session: Session, *, subscriber: Subscriber, detail: str, origin: Origin) -> None:
    """A spam complaint: this reader is never mailed again, not even to confirm a new sign-up."""
    if subscriber.status is Status.complained:
        return
    subscriber.status = Status.complained
    subscriber.confirm_nonce = None
    _record(session, subscriber, "complaint", origin, detail=detail[:500])
