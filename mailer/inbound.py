"""What comes back: mailto unsubscribes, bounces and complaints, from every inbound path.

    SMTP listener (inbound_smtp.py) ─┐
    IMAP mailbox (imap.py)          ─┼─▶ receive(): an `inbound_messages` row, raw bytes kept
    provider webhooks (webhooks.py) ─┘       ─▶ task process_inbound(id)
    process(id): claim the row ─▶ read it (reports.py, or the provider's event) ─▶ find whose it is
                 ─▶ the policy (bounces.py)

A message is acted on only when it names one of our readers through something we signed (a return
path, a mailto or an unsubscribe link) or through both our signed Message-ID and the reader's address,
or when an authenticated provider names the address. Anything else, a report about someone else's mail
included, is `unclassified`: kept, listed for an admin, and never deleted from a mailbox.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import addresses, bounces, queue, reports, subscriptions, tokens
from mailer.addresses import Tagged
from mailer.bounces import Severity
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidEmail, TokenError
from mailer.models import Delivery, InboundKind, InboundMessage, Notice, Subscriber, utcnow
from mailer.subscriptions import Origin

log = logging.getLogger(__name__)

RECIPIENT_HEADERS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "X-Original-Recipient",
                     "To", "Cc")
UNSUBSCRIBE_LINK = re.compile(r"/unsubscribe/(\d{1,18}\.[A-Za-z0-9_-]{22})")


def _subject(raw: bytes) -> str:
    from email.header import decode_header, make_header
    from email.parser import BytesHeaderParser
    from email.policy import compat32

    # The headers are enough: the body may be large, and nothing in it is the subject.
    header = BytesHeaderParser(policy=compat32).parsebytes(raw).get("Subject") or ""
    try:
        return str(make_header(decode_header(str(header))))[:500]
    except (ValueError, LookupError):
        return str(header)[:500]


def receive(*, channel: str, raw: bytes, mail_from: str = "", rcpt_to: list[str] | None = None,
            source_ref: str | None = None, subject: str | None = None, dispatch: bool = True) -> int | None:
    """Keep what arrived and queue its processing. Returns the row's id, or None when `source_ref` was
    seen before (a webhook retried, a mailbox polled twice): nothing is added or done twice."""
    row = InboundMessage(channel=channel, raw=raw, mail_from=mail_from[:500], rcpt_to=", ".join(rcpt_to or []),
                         source_ref=source_ref, subject=subject if subject is not None else _subject(raw),
                         kind=InboundKind.pending)
    inbound_id = _store(row)
    if inbound_id is not None and dispatch:
        queue.dispatch("process_inbound", inbound_id)
    return inbound_id


def keep_too_large(*, channel: str, raw: bytes, source_ref: str) -> int | None:
    """A mail over MAILER_INBOUND_MAX_BYTES that stays where it is (a mailbox): listed for an admin as
    `unclassified`, without its body, and never processed. None when `source_ref` was listed before."""
    detail = (f"Too large: {len(raw)} bytes (MAILER_INBOUND_MAX_BYTES is {get_settings().inbound_max_bytes}). "
              "Not read, and left in the mailbox for a person.")
    return _store(InboundMessage(channel=channel, raw=b"", source_ref=source_ref, subject=_subject(raw),
                                 kind=InboundKind.unclassified, detail=detail, processed_at=utcnow()))


def _store(row: InboundMessage) -> int | None:
    """Add the row; None when a row from the same source exists, so nothing is added or done twice."""
    try:
        with session_scope() as session:
            if row.source_ref is not None and session.scalar(
                    select(InboundMessage.id).where(InboundMessage.source_ref == row.source_ref)) is not None:
                return None
            session.add(row)
            session.flush()
            return row.id
    except IntegrityError:
        return None  # Another process stored the same source at the same moment.


@dataclass
class Verdict:
    """What one inbound message was, and whom it concerns."""

    kind: InboundKind
    detail: str
    subscriber_id: int | None = None
    delivery_id: int | None = None
    campaign_id: int | None = None
    severity: Severity | None = None
    status: str = ""


# --- Finding whose it is ---------------------------------------------------------------------------


def _message_id_delivery(session: Session, message_id: str) -> Delivery | None:
    # Only a Message-ID whose signature verifies: the ids in it are sequential, so anyone can guess them.
    ours = addresses.read_message_id(message_id)
    if ours is None:
        return None
    delivery = session.get(Delivery, ours[1])
    if delivery is None or delivery.campaign_id != ours[0]:
        return None
    return delivery


def _tagged_owner(session: Session, tagged: Tagged) -> tuple[Subscriber | None, Delivery | None]:
    if tagged.kind == "delivery":
        delivery = session.get(Delivery, tagged.id)
        return (session.get(Subscriber, delivery.subscriber_id) if delivery else None), delivery
    if tagged.kind == "notice":
        notice = session.get(Notice, tagged.id)
        return (session.get(Subscriber, notice.subscriber_id) if notice else None), None
    return session.get(Subscriber, tagged.id), None


def _from_original(session: Session, original: Message | None, named: set[str]
                   ) -> tuple[Subscriber | None, Delivery | None, str]:
    """Whose mail the quoted original was: by a token we signed, or by our signed Message-ID plus the reader's
    address."""
    if original is None:
        return None, None, ""
    delivery = _message_id_delivery(session, str(original.get("Message-ID") or ""))
    values = [str(v) for h in ("Return-Path", "List-Unsubscribe") for v in original.get_all(h) or []]
    for value in values:
        for part in re.findall(r"[\w.+=-]+@[\w.-]+", value):
            ours = addresses.read(part)
            if ours is not None and ours[1] is not None:
                subscriber, tagged_delivery = _tagged_owner(session, ours[1])
                if subscriber is not None:
                    return subscriber, tagged_delivery or _same_reader(delivery, subscriber), "a signed address"
        for token in UNSUBSCRIBE_LINK.findall(value):
            try:
                subscriber_id = int(tokens.read(tokens.Purpose.unsubscribe, token)[0])
            except TokenError:
                continue
            subscriber = session.get(Subscriber, subscriber_id)
            if subscriber is not None:
                return subscriber, _same_reader(delivery, subscriber), "a signed unsubscribe link"
    if delivery is not None:
        subscriber = session.get(Subscriber, delivery.subscriber_id)
        quoted = {a.lower() for _n, a in getaddresses([str(v) for v in original.get_all("To") or []])}
        if subscriber is not None and subscriber.email_key in (named | quoted):
            return subscriber, delivery, "our signed Message-ID and the reader's address"
    return None, None, ""


def _same_reader(delivery: Delivery | None, subscriber: Subscriber) -> Delivery | None:
    return delivery if delivery is not None and delivery.subscriber_id == subscriber.id else None


# --- Mail ------------------------------------------------------------------------------------------


def _recipients(row: InboundMessage, message: Message) -> list[str]:
    values = [value for value in row.rcpt_to.split(",") if value.strip()]
    for header in RECIPIENT_HEADERS:
        values.extend(str(v) for v in message.get_all(header) or [])
    return values


MAIL_SYSTEM_SENDERS = ("mailer-daemon", "postmaster", "mail-daemon", "mailerdaemon", "double-bounce", "mdaemon")


def _from_mail_system(row: InboundMessage, message: Message) -> bool:
    """Whether a mail comes from a mail system, as bounces do: a null sender, or a mailer-daemon's From."""
    if row.channel == "smtp" and row.mail_from.strip("<> ") == "":
        return True
    if str(message.get("Return-Path") or "").strip() == "<>":
        return True
    sender = getaddresses([str(message.get("From") or "")])
    local = sender[0][1].partition("@")[0].lower() if sender else ""
    return local in MAIL_SYSTEM_SENDERS


def _unsubscribe(session: Session, tagged: Tagged | None, row: InboundMessage) -> Verdict:
    if tagged is None:
        return Verdict(InboundKind.unclassified,
                       "A mail to the unsubscribe address without a valid token: whose it is cannot be told "
                       "safely (a From address can be forged). Unsubscribe the sender by hand if it is genuine.")
    subscriber = session.get(Subscriber, tagged.id)
    if subscriber is None:
        return Verdict(InboundKind.ignored, f"An unsubscribe mail for subscriber {tagged.id}, who no longer exists.")
    before = subscriber.status
    subscriptions.unsubscribe(session, subscriber_id=subscriber.id,
                              origin=Origin(channel="email", user_agent=f"mailto from {row.mail_from}"[:400]))
    done = "unsubscribed" if before != subscriber.status else f"nothing to do: the reader was {before.value}"
    return Verdict(InboundKind.unsubscribe, f"Unsubscribe by mail: {done}.", subscriber.id)


def _apply_bounce(session: Session, verdict: Verdict, subscriber: Subscriber) -> None:
    assert verdict.severity is not None
    done = bounces.bounce(session, subscriber=subscriber, severity=verdict.severity, detail=verdict.detail,
                          origin=Origin(channel="bounce"))
    verdict.detail = f"{verdict.detail} → {done}"


def _read_mail(session: Session, row: InboundMessage) -> Verdict:
    message = reports.parse_message(row.raw)
    ours = addresses.find_tagged(_recipients(row, message))
    unsubscribes = [tag for role, tag in ours if role == "unsubscribe"]
    tagged = next((tag for role, tag in ours if role == "bounces" and tag is not None), None)
    report = reports.parse(message)
    if report.kind == "bounce" and not _from_mail_system(row, message):
        # flufl.bounce's heuristics read text; a person's reply that happens to match them is not a bounce.
        report = reports.Report("other", [], report.original, auto_submitted=report.auto_submitted)
    if report.kind == "other" and unsubscribes:
        return _unsubscribe(session, next((t for t in unsubscribes if t is not None), None), row)
    if report.kind == "other":
        why = "an automatic reply" if report.auto_submitted not in {"", "no"} else "neither a bounce nor a complaint"
        return Verdict(InboundKind.unclassified, f"Not understood: {why}. Kept for a person to read.")

    named = {r.address.lower() for r in report.recipients}
    subscriber: Subscriber | None = None
    delivery: Delivery | None = None
    how = ""
    if tagged is not None:
        subscriber, delivery = _tagged_owner(session, tagged)
        how = f"the return path of {tagged.kind} {tagged.id}"
    if subscriber is None:
        subscriber, delivery, how = _from_original(session, report.original, named)
    if delivery is None and subscriber is not None and report.original is not None:
        delivery = _same_reader(_message_id_delivery(session, str(report.original.get("Message-ID") or "")),
                                subscriber)
    verdict = Verdict(InboundKind.unclassified, "", subscriber.id if subscriber else None,
                      delivery.id if delivery else None, delivery.campaign_id if delivery else None)

    if report.kind == "complaint":
        where = ", ".join(sorted(named)) or "an unnamed recipient"
        if subscriber is None:
            verdict.detail = (f"A complaint ({report.feedback_type}) about {where} that names none of our readers "
                              "by anything we signed. Kept for a person to read.")
            return verdict
        verdict.kind = InboundKind.complaint
        verdict.detail = f"Complaint ({report.feedback_type}) by {subscriber.email}, found by {how}"
        verdict.detail += " → " + bounces.complaint(session, subscriber=subscriber, detail=verdict.detail,
                                                    origin=Origin(channel="complaint"))
        return verdict

    failed, delayed = report.failed(), report.delayed()
    if subscriber is None:
        # Before anything else: a report about someone else's mail, even a harmless one, is never ours to
        # dismiss (an ignored mailbox message is deleted).
        where = ", ".join(sorted(named)) or "no address"
        what = "A bounce" if failed or delayed else "A delivery report with no failure"
        verdict.detail = (f"{what} for {where} that names none of our deliveries by anything we signed. "
                          "Kept for a person to read.")
        return verdict
    if not failed and not delayed:
        verdict.kind = InboundKind.ignored
        verdict.detail = "A delivery report with no failure (delivered, relayed or expanded): nothing to do."
        return verdict
    if not failed:
        first = delayed[0]
        verdict.kind, verdict.status = InboundKind.delay, first.status
        verdict.detail = (f"Delivery to {first.address} is delayed ({first.status or 'no status'}); "
                          "the server keeps trying, so nothing is counted.")
        return verdict
    # The recipient the report is about: the one matching the reader, else the first one.
    first = next((r for r in failed if r.address.lower() == subscriber.email_key), failed[0])
    verdict.kind, verdict.status = InboundKind.bounce, first.status
    verdict.severity = bounces.classify(first.status)
    verdict.detail = (f"Bounce for {subscriber.email} ({first.status or 'no enhanced status code'}"
                      f"{': ' + first.diagnostic[:300] if first.diagnostic else ''}), found by {how}")
    _apply_bounce(session, verdict, subscriber)
    return verdict


# --- Provider events -------------------------------------------------------------------------------


def _read_event(session: Session, row: InboundMessage) -> Verdict:
    from mailer import webhooks

    event = webhooks.event_of(row.channel, json.loads(row.raw))
    if event.kind == "ignored":
        return Verdict(InboundKind.ignored, event.detail)
    subscriber: Subscriber | None = None
    delivery: Delivery | None = None
    ours = addresses.read(event.return_path) if event.return_path else None
    if ours is not None and ours[1] is not None:
        subscriber, delivery = _tagged_owner(session, ours[1])
        if subscriber is not None and subscriber.email_key != event.email.lower():
            subscriber, delivery = None, None
    if subscriber is None and event.email:
        # The provider authenticated itself and saw the failure: its word on the address is trusted.
        _address, key = _key(event.email)
        subscriber = session.scalars(select(Subscriber).where(Subscriber.email_key == key)).first()
    if subscriber is not None and delivery is None:
        delivery = _same_reader(_message_id_delivery(session, event.message_id), subscriber)
    if subscriber is not None and delivery is None and event.kind == "complaint":
        # Complaint rates are per campaign: without our Message-ID, the reader's latest mail is the likely one.
        delivery = session.scalars(select(Delivery).where(Delivery.subscriber_id == subscriber.id,
                                                          Delivery.sent_at.is_not(None))
                                   .order_by(Delivery.sent_at.desc()).limit(1)).first()
    verdict = Verdict(InboundKind.unclassified, "", subscriber.id if subscriber else None,
                      delivery.id if delivery else None, delivery.campaign_id if delivery else None,
                      status=event.status)
    if subscriber is None:
        verdict.detail = f"{event.detail} — {event.email or 'no address'} is none of our readers."
        return verdict
    origin = Origin(channel=row.channel)
    if event.kind == "unsubscribe":
        subscriptions.unsubscribe(session, subscriber_id=subscriber.id, origin=origin)
        verdict.kind, verdict.detail = InboundKind.unsubscribe, f"{event.detail} → unsubscribed"
    elif event.kind == "complaint":
        verdict.kind = InboundKind.complaint
        verdict.detail = f"{event.detail} → " + bounces.complaint(session, subscriber=subscriber,
                                                                  detail=event.detail, origin=origin)
    elif event.kind == "delay":
        verdict.kind, verdict.detail = InboundKind.delay, f"{event.detail}: nothing is counted."
    else:
        verdict.kind = InboundKind.bounce
        verdict.severity = event.severity or bounces.classify(event.status)
        verdict.detail = event.detail
        done = bounces.bounce(session, subscriber=subscriber, severity=verdict.severity, detail=event.detail,
                              origin=origin)
        verdict.detail = f"{event.detail} → {done}"
    return verdict


def _key(email: str) -> tuple[str, str]:
    try:
        return subscriptions.normalize_email(email)
    except InvalidEmail:
        return email, email.strip().lower()


# --- Processing ------------------------------------------------------------------------------------


def process(inbound_id: int) -> str:
    """Read one inbound message and apply the policy. Safe to run twice: only a pending row is processed,
    and the row's verdict is written in the same transaction as what it changes."""
    with session_scope() as session:
        row = session.scalars(select(InboundMessage).where(InboundMessage.id == inbound_id)
                              .with_for_update()).first()
        if row is None or row.kind is not InboundKind.pending:
            return "already-processed" if row is not None else "gone"
        try:
            with session.begin_nested():
                verdict = _read_event(session, row) if row.channel in WEBHOOK_CHANNELS else _read_mail(session, row)
        except Exception as error:
            # A bug or hostile input must not leave the row pending for ever: keep it for a person.
            log.exception("inbound message %s could not be processed", inbound_id)
            verdict = Verdict(InboundKind.unclassified, f"Processing failed ({type(error).__name__}: {error}). "
                                                        "Kept for a person to read.")
        session.execute(update(InboundMessage).where(InboundMessage.id == inbound_id).values(
            kind=verdict.kind, detail=verdict.detail[:4000], subscriber_id=verdict.subscriber_id,
            delivery_id=verdict.delivery_id, campaign_id=verdict.campaign_id,
            severity=verdict.severity.value if verdict.severity else "", status_code=verdict.status[:20],
            processed_at=utcnow()))
        if verdict.kind is InboundKind.complaint and verdict.campaign_id is not None:
            session.flush()
            bounces.check_complaint_rate(session, verdict.campaign_id)
    log.info("inbound %s: %s: %s", inbound_id, verdict.kind.value, verdict.detail)
    return verdict.kind.value


WEBHOOK_CHANNELS = frozenset({"ses", "postmark", "sendgrid"})


def requeue_pending() -> int:
    """Rows whose task was lost (broker down, worker killed) are queued again; processing is idempotent."""
    from datetime import timedelta

    with session_scope() as session:
        ids = list(session.scalars(select(InboundMessage.id).where(
            InboundMessage.kind == InboundKind.pending,
            InboundMessage.received_at < utcnow() - timedelta(minutes=2)).limit(500)))
    for inbound_id in ids:
        queue.dispatch("process_inbound", inbound_id)
    return len(ids)


def as_dict(row: InboundMessage, *, raw: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id, "channel": row.channel, "received_at": row.received_at, "mail_from": row.mail_from,
        "rcpt_to": row.rcpt_to, "subject": row.subject, "kind": row.kind.value, "severity": row.severity or None,
        "status_code": row.status_code or None, "detail": row.detail, "subscriber_id": row.subscriber_id,
        "delivery_id": row.delivery_id, "campaign_id": row.campaign_id, "processed_at": row.processed_at,
        "removed_from_mailbox_at": row.removed_at, "size": len(row.raw),
    }
    if raw:
        out["raw"] = row.raw.decode("utf-8", "replace")
    return out
