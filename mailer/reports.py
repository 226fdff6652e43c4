"""What a returned mail says, read from its bytes: a delivery status notification, a complaint, or neither.

    RFC 3464 DSN (multipart/report; report-type=delivery-status)  ─▶ per recipient: action, status, diagnostic
    non-standard bounces (Exim's, Exchange's, qmail's…)          ─▶ flufl.bounce's detectors, plus any
                                                                    enhanced status code in the text
    RFC 5965 ARF (multipart/report; report-type=feedback-report)  ─▶ a complaint, with its feedback type
    anything else                                                ─▶ Report(kind="other")

Reports usually quote the original message or its headers; `original` keeps them, because its
Return-Path, List-Unsubscribe and Message-ID name our delivery and reader.
"""

from __future__ import annotations

import email
import logging
from dataclasses import dataclass, field
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32
from typing import Any

import flufl.bounce

from mailer.bounces import enhanced_code

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipient:
    """One recipient named by a report."""

    address: str
    action: str = "failed"
    status: str = ""
    diagnostic: str = ""


@dataclass
class Report:
    # "dsn", "bounce" (non-standard), "complaint" (ARF) or "other".
    kind: str
    recipients: list[Recipient] = field(default_factory=list)
    original: Message | None = None
    feedback_type: str = ""
    auto_submitted: str = ""

    def failed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.action.startswith(("fail", "error"))]

    def delayed(self) -> list[Recipient]:
        return [r for r in self.recipients if r.action.startswith("delay")]


def parse_message(raw: bytes) -> Message:
    # compat32 never raises on malformed headers: a bounce from a broken MTA is still read.
    return email.message_from_bytes(raw, policy=compat32)


def _text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    return str(part.get_payload()) if not part.is_multipart() else ""


def _headers_from_text(text: str) -> Message:
    return HeaderParser(policy=compat32).parsestr(text.lstrip("\r\n"), headersonly=True)


def _original(message: Message) -> Message | None:
    """The quoted original (message/rfc822) or its headers (text/rfc822-headers), if the report has them."""
    for part in message.walk():
        content_type = part.get_content_type()
        if content_type == "message/rfc822":
            payload: Any = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if content_type == "text/rfc822-headers":
            return _headers_from_text(_text(part))
    return None


def _address(value: str) -> str:
    """'rfc822; user@example.org' → 'user@example.org'."""
    _, _, address = value.partition(";") if ";" in value else ("", "", value)
    return address.strip().strip("<>").strip()


def _dsn_recipients(message: Message) -> list[Recipient]:
    recipients = []
    for part in message.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        blocks: Any = part.get_payload()
        if not isinstance(blocks, list):
            blocks = [_headers_from_text(block) for block in str(blocks).split("\n\n")]
        for block in blocks:
            if not isinstance(block, Message):
                continue
            final = block.get("Final-Recipient") or block.get("Original-Recipient")
            action = (block.get("Action") or "").strip().lower()
            if not final or not action:
                continue  # The per-message block, not a recipient.
            diagnostic = " ".join(str(block.get("Diagnostic-Code") or "").split())
            status = (block.get("Status") or "").strip()
            status = enhanced_code(status) or enhanced_code(diagnostic)
            recipients.append(Recipient(_address(str(final)), action, status, diagnostic[:1000]))
    return recipients


def _feedback(message: Message) -> tuple[str, list[Recipient]] | None:
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            payload: Any = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                fields = payload[0]
            else:
                fields = _headers_from_text(_text(part))
            feedback_type = (fields.get("Feedback-Type") or "abuse").strip().lower()
            recipients = [Recipient(_address(str(value)), "complained")
                          for value in fields.get_all("Original-Rcpt-To") or []]
            return feedback_type, recipients
    return None


def _body_text(message: Message) -> str:
    texts = []
    for part in message.walk():
        if part.get_content_maintype() == "text" and part.get_content_type() != "text/rfc822-headers":
            texts.append(_text(part))
        if part.get_content_type() == "message/rfc822":
            break  # The quoted original says nothing about why it bounced.
    return "\n".join(texts)


def _heuristic(message: Message) -> list[Recipient]:
    """Non-standard bounces, through flufl.bounce's detectors; the status comes from the text, if it says one."""
    try:
        temporary, permanent = flufl.bounce.all_failures(message)
    except Exception:
        # A detector can trip on very broken mail; that mail is then simply not understood.
        log.exception("flufl.bounce could not read a message")
        return []
    text = _body_text(message)
    status = enhanced_code(text)
    recipients = []
    for address in sorted(permanent):
        recipients.append(Recipient(address.decode("ascii", "replace"), "failed", status,
                                    _diagnostic_near(text, address.decode("ascii", "replace"))))
    for address in sorted(temporary - permanent):
        recipients.append(Recipient(address.decode("ascii", "replace"), "delayed", status, ""))
    return recipients


def _diagnostic_near(text: str, address: str) -> str:
    """The line of the bounce text that mentions the address and a reply code, if there is one."""
    lines = [" ".join(line.split()) for line in text.splitlines()]
    for index, line in enumerate(lines):
        if address.lower() in line.lower():
            window = " ".join(lines[index:index + 3])
            if enhanced_code(window) or any(code in window for code in ("550", "551", "552", "553", "554")):
                return window[:500]
    return ""


def parse(raw: bytes | Message) -> Report:
    message = raw if isinstance(raw, Message) else parse_message(raw)
    auto = str(message.get("Auto-Submitted") or "").strip().lower()
    report_type = str(message.get_param("report-type", "", header="content-type") or "").lower() \
        if message.get_content_type() == "multipart/report" else ""
    feedback = _feedback(message) if report_type in {"feedback-report", ""} else None
    if feedback is not None:
        feedback_type, recipients = feedback
        return Report("complaint", recipients, _original(message), feedback_type, auto)
    recipients = _dsn_recipients(message)
    if recipients:
        return Report("dsn", recipients, _original(message), auto_submitted=auto)
    recipients = _heuristic(message)
    if recipients:
        return Report("bounce", recipients, _original(message), auto_submitted=auto)
    return Report("other", [], _original(message), auto_submitted=auto)
