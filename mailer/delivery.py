"""The batch loop: claim → check → render once → send over kept-open connections → record.

`run_campaign(id)` is what the Celery task (or the in-process runner) calls. It works for at most
`MAILER_TASK_SECONDS`, then queues itself again, so no task outlives the broker's visibility
timeout. Running it twice, or on many machines at once, is safe: deliveries are claimed atomically.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mailer import campaigns, heartbeat, policy, queue, store, tokens
from mailer.compose import Reader, Variants
from mailer.config import Settings, get_settings
from mailer.db import session_scope
from mailer.models import Campaign, CampaignStatus, DeliveryState, Status, utcnow
from mailer.recorder import Outcome, Recorder
from mailer.sender import Envelope, Result, Transport, transport_for
from mailer.sender import Outcome as SmtpOutcome
from mailer.signing import sign
from mailer.store import Claim, ReaderRow
from mailer.throttle import Throttle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    claim: Claim
    reader: ReaderRow


class FailureWindow:
    """The share of failed mails over the last N; trips once enough mails were tried."""

    def __init__(self, *, size: int, threshold: float) -> None:
        self.results: deque[bool] = deque(maxlen=size)
        self.threshold = threshold
        self.last_failure = ""

    def add(self, result: Result) -> None:
        if result.outcome is SmtpOutcome.skipped:
            return
        self.results.append(not result.ok)
        if not result.ok:
            self.last_failure = f"{result.code} {result.text}".strip()

    @property
    def rate(self) -> float:
        return sum(self.results) / len(self.results) if self.results else 0.0

    @property
    def tripped(self) -> bool:
        enough = self.results.maxlen is not None and len(self.results) >= max(10, self.results.maxlen // 4)
        return enough and self.rate > self.threshold

    def reason(self) -> str:
        return (f"Paused automatically: {self.rate:.0%} of the last {len(self.results)} mails failed "
                f"(the limit is {self.threshold:.0%}). Last reply: {self.last_failure}")


def message_id(campaign_id: int, delivery_id: int, domain: str) -> str:
    # The same delivery keeps its Message-ID on every attempt, so a receiver can drop a repeat.
    return f"<c{campaign_id}.d{delivery_id}@{domain}>"


class Batch:
    """Sends one batch of jobs over the lanes (one SMTP connection each), recording every answer."""

    def __init__(self, *, campaign_id: int, template: Variants, recorder: Recorder, throttle: Throttle,
                 window: FailureWindow, settings: Settings) -> None:
        self.campaign_id = campaign_id
        self.template = template
        self.recorder = recorder
        self.throttle = throttle
        self.window = window
        self.settings = settings
        # Parsed once: MAILER_FROM's address is the envelope sender of every mail.
        self.sender = settings.from_address

    def build(self, job: Job, *, eight_bit: bool) -> tuple[bytes, str]:
        links = tokens.urls(job.reader.id)
        mid = message_id(self.campaign_id, job.claim.delivery_id, self.settings.list_domain)
        reader = Reader(email=job.reader.email, name=job.reader.name, **links)
        data = self.template.for_reader(reader).personalise(reader, message_id=mid, eight_bit=eight_bit)
        return sign(data, self.settings), mid

    async def lane(self, transport: Transport, jobs: Iterator[Job]) -> None:
        # The lanes share one iterator, so a slow connection takes fewer jobs.
        for job in jobs:
            await self.throttle.take(job.reader.email)
            data, mid = self.build(job, eight_bit=await transport.eight_bit())
            envelope = Envelope(self.sender, job.reader.email, data)
            handover = functools.partial(self.recorder.handover, job.claim.delivery_id)
            result = await transport.send(envelope, before_data=handover)
            self.window.add(result)
            decision = policy.decide(result, attempts=job.claim.attempts, first_failed_at=job.claim.first_failed_at,
                                     now=utcnow(), settings=self.settings)
            self.recorder.record(Outcome(
                delivery_id=job.claim.delivery_id,
                state=decision.state,
                code=result.code or None,
                text=result.text if not result.ok else None,
                message_id=mid if result.outcome is not SmtpOutcome.skipped else None,
                next_attempt_at=decision.next_attempt_at,
                failed=decision.state is DeliveryState.deferred,
                suppress_subscriber=job.reader.id if decision.suppress else None,
            ))

    async def send(self, jobs: list[Job], lanes: list[Transport]) -> None:
        shared = iter(jobs)
        await asyncio.gather(*(self.lane(transport, shared) for transport in lanes[: max(1, len(jobs))]))
        await self.recorder.flush()


@dataclass
class Claimed:
    jobs: list[Job]
    skipped: list[tuple[int, str]]
    template: Variants | None
    go_on: bool


def _claim(campaign_id: int, worker: str, settings: Settings,
           prepare: Callable[[Campaign], Variants] | None) -> Claimed:
    """Claim a batch and load its readers; readers who left or were suppressed meanwhile are skipped."""
    with session_scope() as session:
        campaign = session.get(Campaign, campaign_id)
        if campaign is None or campaign.status is not CampaignStatus.sending:
            return Claimed([], [], None, False)
        claims = store.claim_deliveries(session, campaign_id, worker, settings.batch_size)
        if not claims:
            return Claimed([], [], None, False)
        template = prepare(campaign) if prepare else None
        readers = store.readers(session, [claim.subscriber_id for claim in claims])
        suppressed = store.is_suppressed(session, [r.email_hash for r in readers.values() if r.email_hash])
    jobs, skipped = [], []
    for claim in claims:
        reader = readers.get(claim.subscriber_id)
        if reader is None or reader.status is not Status.confirmed:
            skipped.append((claim.delivery_id, f"reader is {reader.status.value if reader else 'gone'}"))
        elif reader.email_hash in suppressed:
            skipped.append((claim.delivery_id, "address is on the suppression list"))
        else:
            jobs.append(Job(claim, reader))
    return Claimed(jobs, skipped, template, True)


async def _run(campaign_id: int) -> bool:
    """Send until the campaign is done, paused, or this run's time is up; True when work remains."""
    settings = get_settings()
    worker = heartbeat.worker_id()
    with session_scope() as session:
        store.sweep_stale_claims(session, worker_timeout=settings.worker_timeout,
                                 resend_unknown=settings.resend_unknown)
    recorder = Recorder(worker, domain=settings.list_domain)
    lanes = [transport_for(settings) for _ in range(settings.smtp_connections)]
    throttle = Throttle(rate=settings.smtp_rate, domain_rate=settings.domain_rate)
    window = FailureWindow(size=settings.pause_failure_window, threshold=settings.pause_failure_rate)
    template: Variants | None = None
    deadline = time.monotonic() + settings.task_seconds
    more = False
    try:
        while True:
            if time.monotonic() > deadline:
                more = True
                break
            claimed = await asyncio.to_thread(
                _claim, campaign_id, worker, settings, None if template else campaigns.message_templates)
            template = template or claimed.template
            if not claimed.go_on:
                break
            assert template is not None
            for delivery_id, why in claimed.skipped:
                recorder.record(Outcome(delivery_id, DeliveryState.skipped, text=why))
            batch = Batch(campaign_id=campaign_id, template=template, recorder=recorder, throttle=throttle,
                          window=window, settings=settings)
            await batch.send(claimed.jobs, lanes)
            if window.tripped:
                log.warning("campaign %s: %s", campaign_id, window.reason())
                with session_scope() as session:
                    campaigns.pause(session, campaign_id, reason=window.reason())
                break
    finally:
        for transport in lanes:
            await transport.close()
        await asyncio.to_thread(recorder.close)
    with session_scope() as session:
        campaigns.finish_if_done(session, campaign_id)
    return more


def run_campaign(campaign_id: int) -> str:
    """Run the batch loop for a while; queue another run when work remains. Safe to run twice."""
    more = asyncio.run(_run(campaign_id))
    if more:
        queue.dispatch("run_campaign", campaign_id)
        return "continues"
    return "stopped"
