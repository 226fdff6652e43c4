"""What an SMTP result means for a delivery: its next state, when to retry, whether to suppress.

Permanent and temporary failures are kept apart in types (after Mailman's outgoing runner):
a 5xx fails the delivery for good; a 4xx defers it with exponential backoff until a deadline.
A 5xx also counts against the reader as a bounce, through the same policy as bounces that come
back later (bounces.py: hard by enhanced status code, otherwise soft).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from mailer.config import Settings
from mailer.models import DeliveryState
from mailer.sender import Outcome, Result


@dataclass(frozen=True)
class Decision:
    state: DeliveryState
    next_attempt_at: datetime | None = None
    # A 5xx reply: the reader's bounce policy (bounces.bounce) decides whether it is hard or soft.
    bounce: bool = False


def decide(result: Result, *, attempts: int, first_failed_at: datetime | None, now: datetime,
           settings: Settings) -> Decision:
    if result.outcome is Outcome.sent:
        return Decision(DeliveryState.sent)
    if result.outcome is Outcome.skipped:
        return Decision(DeliveryState.skipped)
    if result.outcome is Outcome.unknown:
        if settings.resend_unknown:
            return Decision(DeliveryState.deferred, now + timedelta(seconds=settings.retry_base_seconds))
        return Decision(DeliveryState.unknown)
    if result.outcome is Outcome.permanent:
        return Decision(DeliveryState.failed, bounce=True)
    started = first_failed_at or now
    if now - started >= timedelta(hours=settings.retry_deadline_hours):
        return Decision(DeliveryState.failed)
    delay = settings.retry_base_seconds * 2 ** max(0, attempts - 1)
    retry_at = min(now + timedelta(seconds=delay), started + timedelta(hours=settings.retry_deadline_hours))
    return Decision(DeliveryState.deferred, retry_at)
