"""The batch loop: claim → check → render once → send over kept-open connections → record.

`run_campaign(id)` is what the Celery task (or the in-process runner) calls. It works for at most
`MAILER_TASK_SECONDS`, then queues itself again, so no task outlives the broker's visibility
timeout. Running it twice, or on many machines at once, is safe: deliveries are claimed atomically.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy.orm import Session

from mailer import addresses, campaigns, compose, digests, heartbeat, policy, queue, store, tokens
from mailer.compose import Reader, Variants
from mailer.config import Settings, get_settings
from mailer.db import session_scope
from mailer.digests import Content
from mailer.models import Campaign, CampaignKind, CampaignStatus, DeliveryState, Status, utcnow
from mailer.recorder import Outcome, Recorder
from mailer.sender import BeforeData, Envelope, Result, Transport, transport_for
from mailer.sender import Outcome as SmtpOutcome
from mailer.signing import sign
from mailer.store import Claim, ReaderRow
from mailer.throttle import Leases, Throttle, connections, shared_throttle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    claim: Claim
    reader: ReaderRow
    # A digest job holds its own renders, so evicting them from the cache never pulls them from under it.
    variants: Variants | None = None


class Templates:
    """The loop's renders: one set for a broadcast; one per distinct content for a digest, the most
    recent few hundred kept, so memory does not grow with the number of readers."""

    KEEP = 256

    def __init__(self) -> None:
        self.broadcast: Variants | None = None
        self.digests: OrderedDict[Content, Variants] = OrderedDict()
        # A loop serves one campaign: its contents are usually a few dozen, read from the ledger once each.
        self.known: dict[int, Content] = {}

    def load(self, session: Session, campaign: Campaign, jobs: list[Job]) -> list[Job]:
        """Attach each job's content (digests) and render what is new; jobs without content are dropped."""
        if campaign.kind is not CampaignKind.digest:
            if self.broadcast is None:
                self.broadcast = campaigns.message_templates(campaign)
            return jobs
        wanted = {job.claim.content_id for job in jobs if job.claim.content_id is not None}
        if len(self.known) > self.KEEP * 16:
            # A run where nearly every reader's digest differs: forget, and read again what is needed.
            self.known.clear()
        self.known.update(digests.contents(session, wanted - self.known.keys()))
        ready = []
        for job in jobs:
            content = self.known.get(job.claim.content_id) if job.claim.content_id is not None else None
            if content is None:
                continue
            variants = self.digests.get(content)
            if variants is not None:
                self.digests.move_to_end(content)
            else:
                variants = self.digests[content] = digests.render_content(
                    session, content, zone=digests.zone_of(campaign.run_key), day=campaign.created_at)
                if len(self.digests) > self.KEEP:
                    self.digests.popitem(last=False)
            ready.append(Job(job.claim, job.reader, variants))
        return ready

    def for_job(self, job: Job) -> Variants:
        if job.variants is None:
            assert self.broadcast is not None
            return self.broadcast
        return job.variants


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


class Batch:
    """Sends one batch of jobs over the lanes (one SMTP connection each), recording every answer."""

    def __init__(self, *, campaign_id: int, templates: Templates, recorder: Recorder, throttle: Throttle,
                 window: FailureWindow, settings: Settings) -> None:
        self.campaign_id = campaign_id
        self.templates = templates
        self.recorder = recorder
        self.throttle = throttle
        self.window = window
        self.settings = settings
        self.sender_refused: Result | None = None
        self.held = False

    def build(self, job: Job, mid: str, *, eight_bit: bool) -> bytes:
        links = tokens.urls(job.reader.id)
        reader = Reader(email=job.reader.email, name=job.reader.name, **links)
        data = self.templates.for_job(job).for_reader(reader).personalise(reader, message_id=mid,
                                                                           eight_bit=eight_bit)
        return sign(data, self.settings)

    def envelope(self, job: Job, data: bytes = b"") -> Envelope:
        """The job's envelope, its own MAIL FROM and RCPT TO: the announced next envelope and the one sent
        must be made here alike, or the transport voids what it wrote ahead."""
        # Each delivery's own return path (VERP), so a bounce names the delivery it is about.
        return Envelope(addresses.return_path(job.claim.delivery_id), job.reader.email, data)

    def _turn(self, job: Job) -> tuple[list[str], BeforeData, str]:
        """The job's hand-over check for the transport, the list its answer lands in, and its Message-ID."""
        verdict: list[str] = []
        # Signed (addresses.message_id): made once per delivery, for the mail, its hand-over and its record.
        mid = addresses.message_id(self.campaign_id, job.claim.delivery_id)

        async def handover() -> bool:
            verdict.append(await self.recorder.handover(job.claim.delivery_id, mid))
            return verdict[-1] == "go"

        return verdict, handover, mid

    async def _give_back(self, transport: Transport, job: Job, verdict: list[str]) -> None:
        """The lane stops before sending `job`, which may already be announced to the transport."""
        await transport.abandon()
        if verdict == ["go"]:
            # Its envelope went out behind the last message and the hand-over was made; no message followed.
            self.recorder.record(Outcome(job.claim.delivery_id, DeliveryState.pending,
                                         text="not sent: the sending loop stopped first"))
        elif verdict == ["skip"]:
            self.recorder.record(Outcome(job.claim.delivery_id, DeliveryState.skipped,
                                         text="not sent: no longer eligible"))

    async def lane(self, transport: Transport, jobs: Iterator[Job]) -> None:
        # The lanes share one iterator, so a slow connection takes fewer jobs. Without a rate limit each
        # lane takes its next job before sending the current one, so that job's envelope (and hand-over
        # check) can ride behind the current message on the same connection.
        chain = self.throttle.unlimited
        job = next(jobs, None)
        turn = self._turn(job) if job is not None else None
        while job is not None and turn is not None:
            verdict, handover, mid = turn
            if self.sender_refused is not None or self.held:
                # The other jobs stay claimed and untried; the loop hands them back.
                await self._give_back(transport, job, verdict)
                return
            upcoming = next(jobs, None) if chain else None
            upcoming_turn = self._turn(upcoming) if upcoming is not None else None
            sending = False
            try:
                await self.throttle.take(job.reader.email)
                data = self.build(job, mid, eight_bit=await transport.eight_bit())
                envelope = self.envelope(job, data)
                if upcoming is not None and upcoming_turn is not None:
                    transport.announce(self.envelope(upcoming), upcoming_turn[1])
                else:
                    transport.announce(None)
                sending = True
                result = await transport.send(envelope, before_data=handover)
            except Exception as error:
                # One bad message (or a database hiccup at hand-over) must not stop the batch. Once the
                # transport had the message and its hand-over said "go", the mail may have gone: that is
                # `unknown` (and MAILER_RESEND_UNKNOWN decides), never a plain retry that could double it.
                log.exception("delivery %s failed before an SMTP answer", job.claim.delivery_id)
                outcome = SmtpOutcome.unknown if sending and verdict == ["go"] else SmtpOutcome.temporary
                result = Result(outcome, 0, f"{type(error).__name__}: {error}")
            if verdict == ["hold"]:
                # Paused or cancelled: this claim goes back untried, and the lane stops.
                self.held = True
            elif result.sender_refused:
                # Not this reader's failure: the claim goes back untried and the campaign pauses.
                self.sender_refused = result
                if verdict == ["go"]:
                    # The hand-over ran beside a pipelined MAIL FROM, but no message followed: pending again.
                    self.recorder.record(Outcome(job.claim.delivery_id, DeliveryState.pending, code=result.code,
                                                 text=result.text))
            else:
                self._record(job, result, mid)
            if chain:
                job, turn = upcoming, upcoming_turn
            else:
                job = next(jobs, None)
                turn = self._turn(job) if job is not None else None
        await transport.abandon()

    def _record(self, job: Job, result: Result, mid: str) -> None:
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
            bounce_subscriber=job.reader.id if decision.bounce else None,
        ))

    async def send(self, jobs: list[Job], lanes: list[Transport]) -> None:
        shared = iter(jobs)
        await asyncio.gather(*(self.lane(transport, shared) for transport in lanes[: max(1, len(jobs))]))
        await self.recorder.flush()


@dataclass
class Claimed:
    jobs: list[Job]
    skipped: list[tuple[int, str]]
    go_on: bool


def _claim(campaign_id: int, worker: str, settings: Settings, templates: Templates) -> Claimed:
    """Claim a batch and load its readers; readers who left or were suppressed meanwhile are skipped."""
    with session_scope() as session:
        campaign = session.get(Campaign, campaign_id)
        if campaign is None or campaign.status is not CampaignStatus.sending:
            return Claimed([], [], False)
        claims = store.claim_deliveries(session, campaign_id, worker, settings.batch_size)
        if not claims:
            return Claimed([], [], False)
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
        ready = templates.load(session, campaign, jobs)
        if len(ready) < len(jobs):
            kept = {job.claim.delivery_id for job in ready}
            skipped.extend((job.claim.delivery_id, "the digest has no articles") for job in jobs
                           if job.claim.delivery_id not in kept)
    return Claimed(ready, skipped, True)


async def _run(campaign_id: int) -> bool:
    """Send until the campaign is done, paused, or this run's time is up; True when work remains."""
    settings = get_settings()
    with session_scope() as session:
        store.sweep_stale_claims(session, worker_timeout=settings.worker_timeout,
                                 resend_unknown=settings.resend_unknown)
    # Connections are shared by every loop of this process: the limit is per process, not per loop.
    permits = connections.take(settings.smtp_connections)
    if permits == 0:
        return False  # Other loops in this process use every connection; they carry on with the work.
    worker: str | None = None
    leases = Leases(settings)
    granted = 0
    # Whatever fails from here (Redis, the database), the process's connections, the deployment's leases
    # and the claim token are given back: a leak would stop this process sending until it restarts.
    try:
        worker = heartbeat.register()
        # With MAILER_SMTP_MAX_CONNECTIONS, the deployment's cap may leave this loop fewer connections.
        granted = await asyncio.to_thread(leases.take, permits, worker)
        if granted == 0:
            return False  # Other loops of the deployment use every connection; they carry on with the work.
        return await _send(campaign_id, settings, worker, granted, leases)
    finally:
        connections.give_back(permits)
        if worker is not None:
            if granted:
                try:
                    await asyncio.to_thread(leases.give_back, worker, granted)
                except Exception:
                    log.exception("campaign %s: giving back connection leases failed; they run out by themselves",
                                  campaign_id)
            heartbeat.unregister(worker)


async def _send(campaign_id: int, settings: Settings, worker: str, permits: int, leases: Leases) -> bool:
    """The batch loop proper, on `permits` connections under the claim token `worker`."""
    recorder = Recorder(worker)
    lanes = [transport_for(settings) for _ in range(permits)]
    throttle = shared_throttle(settings)
    window = FailureWindow(size=settings.pause_failure_window, threshold=settings.pause_failure_rate)
    templates = Templates()
    deadline = time.monotonic() + settings.task_seconds
    more = False

    def claim_next() -> asyncio.Future[Claimed]:
        return asyncio.ensure_future(asyncio.to_thread(_claim, campaign_id, worker, settings, templates))

    # The next batch is claimed while this one is sent, so the connections never wait for a claim.
    # Whatever is claimed and not tried when the loop stops goes back to pending (release_claims).
    upcoming: asyncio.Future[Claimed] | None = claim_next()
    try:
        while True:
            assert upcoming is not None
            claimed = await upcoming
            upcoming = None
            if not claimed.go_on:
                break
            if time.monotonic() > deadline:
                more = True
                break
            upcoming = claim_next()
            for delivery_id, why in claimed.skipped:
                recorder.record(Outcome(delivery_id, DeliveryState.skipped, text=why))
            batch = Batch(campaign_id=campaign_id, templates=templates, recorder=recorder, throttle=throttle,
                          window=window, settings=settings)
            await batch.send(claimed.jobs, lanes)
            # A batch can outlast the leases' time (a slow rate limit): they are renewed after each one.
            await asyncio.to_thread(leases.renew, worker, permits)
            if batch.held:
                break  # Paused or cancelled: the hand-over said so.
            if batch.sender_refused is not None:
                refused = batch.sender_refused
                reason = (f"Paused automatically: the SMTP server refused the sender {settings.return_path_base} "
                          f"({refused.code} {refused.text}). Check MAILER_BOUNCE_ADDRESS (or MAILER_FROM) and the "
                          "server, then resume.")
                log.warning("campaign %s: %s", campaign_id, reason)
                with session_scope() as session:
                    campaigns.pause(session, campaign_id, reason=reason)
                break
            if window.tripped:
                log.warning("campaign %s: %s", campaign_id, window.reason())
                with session_scope() as session:
                    campaigns.pause(session, campaign_id, reason=window.reason())
                break
    finally:
        if upcoming is not None:
            try:
                await upcoming  # Its claims must exist before release_claims hands them back.
            except Exception:
                log.exception("campaign %s: claiming the next batch failed", campaign_id)
        for transport in lanes:
            await transport.close()
        await asyncio.to_thread(recorder.close)
        with session_scope() as session:
            store.release_claims(session, worker, resend_unknown=settings.resend_unknown)
            campaigns.skip_unsent(session, campaign_id)
    with session_scope() as session:
        campaigns.finish_if_done(session, campaign_id)
    log.info("campaign %s: send loop stopped; this process has rendered %d templates in all",
             campaign_id, compose.renders_made)
    return more


def run_campaign(campaign_id: int) -> str:
    """Run the batch loop for a while; queue another run when work remains. Safe to run twice."""
    more = asyncio.run(_run(campaign_id))
    if more:
        queue.dispatch("run_campaign", campaign_id)
        return "continues"
    return "stopped"
