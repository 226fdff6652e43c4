"""Campaign lifecycle. Every status change is one conditional UPDATE, so doing it twice does it once.

    draft ──schedule──▶ scheduled ──(time comes)──▶ sending ──(no work left)──▶ finished
      └──────────────────send──────────────────────▶   │ ▲
                                                pause  │ │ resume
                                                       ▼ │
                                                      paused
    any of draft, scheduled, sending, paused ──cancel──▶ cancelled

Starting materialises one delivery per reader in the audience, in the same transaction as the
status change; the batch loop (`delivery.py`) does the sending.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from mailer import compose, markup, queue, render, store, tokens
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import Conflict, InvalidInput, NotFound
from mailer.models import Campaign, CampaignKind, CampaignStatus, utcnow
from mailer.sender import Envelope, Result, transport_for
from mailer.signing import sign

log = logging.getLogger(__name__)

MAX_SUBJECT = 300
MAX_RENDERED = 5_000_000
MAX_ID = 2**31 - 1  # campaigns.id is a 32-bit integer on PostgreSQL
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,119}")

SAMPLE_READER = compose.Reader(email="reader@example.org", name="Sample Reader",
                               unsubscribe_url="https://example.org/unsubscribe/sample",
                               preferences_url="https://example.org/preferences/sample")


def _get(session: Session, campaign_id: int) -> Campaign:
    if not 0 < campaign_id <= MAX_ID:
        raise NotFound(f"There is no campaign {campaign_id}.")
    campaign = session.get(Campaign, campaign_id)
    if campaign is None:
        raise NotFound(f"There is no campaign {campaign_id}.")
    return campaign


def get(session: Session, campaign_id: int) -> Campaign:
    """The campaign, or NotFound with a sentence."""
    return _get(session, campaign_id)


def _rendered(campaign: Campaign, context: dict[str, Any]) -> render.Rendered:
    return render.render_campaign(subject=campaign.subject, html=campaign.html, text=campaign.text, context=context)


def message_templates(campaign: Campaign) -> compose.Variants:
    """The campaign rendered once per variant, with markers where each reader's fields go."""
    subject, html, text = campaign.subject, campaign.html, campaign.text

    def rendered(context: dict[str, Any]) -> render.Rendered:
        return render.render_campaign(subject=subject, html=html, text=text, context=context)

    return compose.Variants(rendered)


def create(session: Session, *, subject: str, html: str = "", text: str = "", categories: list[str] | None = None,
           kind: CampaignKind = CampaignKind.broadcast, markdown: str | None = None) -> Campaign:
    """A draft. The body is HTML, or Markdown (`markdown`) made into HTML; both are Jinja templates."""
    campaign = _checked(session, subject=subject, html=html, text=text, categories=categories, kind=kind,
                        markdown=markdown)
    session.add(campaign)
    session.flush()
    return campaign


def edit(session: Session, campaign_id: int, *, subject: str, html: str = "", text: str = "",
         categories: list[str] | None = None, markdown: str | None = None) -> Campaign:
    """Change a draft or a scheduled campaign. Once sending has begun it cannot change: readers would
    get two different versions of one campaign."""
    campaign = _get(session, campaign_id)
    new = _checked(session, subject=subject, html=html, text=text, categories=categories, kind=campaign.kind,
                   markdown=markdown)
    changed = session.execute(
        update(Campaign).where(Campaign.id == campaign_id,
                               Campaign.status.in_([CampaignStatus.draft, CampaignStatus.scheduled]))
        .values(subject=new.subject, html=new.html, text=new.text, categories=new.categories,
                markdown=new.markdown)
    ).rowcount  # type: ignore[attr-defined]
    if not changed:
        raise Conflict(f"Campaign {campaign_id} is {campaign.status.value}; only a draft or a scheduled "
                       "campaign can be edited.")
    session.refresh(campaign)
    return campaign


def _checked(session: Session, *, subject: str, html: str, text: str, categories: list[str] | None,
             kind: CampaignKind, markdown: str | None) -> Campaign:
    """A new, unsaved campaign from an admin's input, every field checked and the templates tried."""
    if markdown is not None and markdown.strip():
        if html.strip():
            raise InvalidInput("html", "Give the body as HTML or as Markdown, not both.")
        html = markup.to_html(markdown)
    if not subject.strip():
        raise InvalidInput("subject", "The subject is empty.")
    if any(ch in subject for ch in "\r\n"):
        raise InvalidInput("subject", "The subject must be one line.")
    if len(subject) > MAX_SUBJECT:
        raise InvalidInput("subject", f"Please keep the subject under {MAX_SUBJECT} characters.")
    if not html.strip():
        raise InvalidInput("html", "The HTML body is empty.")
    for field, value in (("subject", subject), ("html", html), ("text", text)):
        if any(ord(ch) < 32 and ch not in "\t\r\n" for ch in value):
            raise InvalidInput(field, f"The {field} holds control characters (such as NUL); remove them.")
    wanted = list(dict.fromkeys(categories or []))
    if not all(SLUG.fullmatch(slug) for slug in wanted):
        raise InvalidInput("categories", "Categories must be category slugs, such as us-russia-relations.")
    known = {c.slug for c in store.categories_by_slug(session, wanted)}
    unknown = [slug for slug in wanted if slug not in known]
    if unknown:
        raise InvalidInput("categories", f"Unknown category: {', '.join(unknown)}.")
    campaign = Campaign(kind=kind, subject=subject.strip(), html=html, text=text or "", categories=wanted,
                        status=CampaignStatus.draft, status_reason="", total=0,
                        markdown=markdown if markdown and markdown.strip() else None)
    # Render with sample values and with markers: template errors show up now, not halfway through a send.
    sample = _rendered(campaign, SAMPLE_READER.fields())
    if len(sample.html) + len(sample.text) > MAX_RENDERED:
        raise InvalidInput("html", f"The rendered mail is larger than {MAX_RENDERED // 1_000_000} MB.")
    compose.check_fields_untouched(lambda context: _rendered(campaign, context))
    variants = message_templates(campaign)
    for name in ("x", ""):
        variants.for_reader(compose.Reader(email="x@example.org", name=name, unsubscribe_url="u",
                                           preferences_url="p"))
    return campaign


def _transition(session: Session, campaign_id: int, to: CampaignStatus, *, allowed: set[CampaignStatus],
                reason: str = "", **values: Any) -> bool:
    """Move a campaign if it is in an allowed status; False when it already is where it should go."""
    changed = session.execute(
        update(Campaign)
        .where(Campaign.id == campaign_id, Campaign.status.in_(allowed))
        .values(status=to, status_reason=reason, **values)
    ).rowcount  # type: ignore[attr-defined]
    if changed:
        return True
    campaign = _get(session, campaign_id)
    if campaign.status is to:
        return False
    raise Conflict(f"Campaign {campaign_id} is {campaign.status.value}; it cannot become {to.value}.")


def start(session: Session, campaign_id: int) -> bool:
    """Start sending. Returns True if this call started it; starting it again changes nothing."""
    started = _transition(session, campaign_id, CampaignStatus.sending,
                          allowed={CampaignStatus.draft, CampaignStatus.scheduled}, started_at=utcnow())
    if started:
        campaign = _get(session, campaign_id)
        campaign.total = store.materialise_deliveries(session, campaign_id, campaign.categories)
        if campaign.total == 0:
            campaign.status, campaign.finished_at = CampaignStatus.finished, utcnow()
            campaign.status_reason = "Nobody is in this campaign's audience."
    return started


def start_building(session: Session, campaign_id: int) -> bool:
    """Start sending a digest run while its readers are still being added; True if this call started it.
    A run already sending, paused or cancelled meanwhile keeps its status: the readers are still added."""
    changed = session.execute(
        update(Campaign).where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.draft)
        .values(status=CampaignStatus.sending, started_at=utcnow(), building=True)
    ).rowcount  # type: ignore[attr-defined]
    return bool(changed)


def finish_building(session: Session, campaign_id: int) -> None:
    """All readers are in: the campaign knows its total and may finish once they are sent."""
    campaign = _get(session, campaign_id)
    campaign.building = False
    campaign.total = sum(store.delivery_counts(session, campaign_id).values())
    if campaign.status is CampaignStatus.draft:
        campaign.status, campaign.finished_at = CampaignStatus.finished, utcnow()
        campaign.status_reason = "Nobody had anything new."
    session.flush()
    finish_if_done(session, campaign_id)


def schedule(session: Session, campaign_id: int, at: datetime) -> None:
    if at.tzinfo is None:
        raise InvalidInput("at", "Give the time with a time zone, e.g. 2026-12-01T08:00:00+00:00.")
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        raise InvalidInput("at", "That time is out of range.") from None
    if at.year > utcnow().year + 10:
        raise InvalidInput("at", "That time is more than ten years away.")
    _transition(session, campaign_id, CampaignStatus.scheduled,
                allowed={CampaignStatus.draft, CampaignStatus.scheduled}, scheduled_at=at)
    # Re-scheduling an already scheduled campaign moves its time.
    _get(session, campaign_id).scheduled_at = at


def pause(session: Session, campaign_id: int, *, reason: str = "Paused by an admin.") -> bool:
    return _transition(session, campaign_id, CampaignStatus.paused, allowed={CampaignStatus.sending}, reason=reason)


def resume(session: Session, campaign_id: int) -> bool:
    return _transition(session, campaign_id, CampaignStatus.sending, allowed={CampaignStatus.paused})


def cancel(session: Session, campaign_id: int) -> bool:
    cancelled = _transition(
        session, campaign_id, CampaignStatus.cancelled,
        allowed={CampaignStatus.draft, CampaignStatus.scheduled, CampaignStatus.sending, CampaignStatus.paused},
        reason="Cancelled by an admin.", finished_at=utcnow(),
    )
    if cancelled:
        # Mail being handed over right now finishes; nothing else goes out.
        skip_unsent(session, campaign_id)
    return cancelled


def skip_unsent(session: Session, campaign_id: int) -> None:
    """A cancelled campaign's untried deliveries (including claims its loops hand back) become skipped."""
    store.skip_cancelled(session, campaign_id)


def finish_if_done(session: Session, campaign_id: int) -> bool:
    if store.has_open_work(session, campaign_id):
        return False
    return bool(session.execute(
        update(Campaign).where(Campaign.id == campaign_id, Campaign.status == CampaignStatus.sending,
                               Campaign.building.is_(False))
        .values(status=CampaignStatus.finished, finished_at=utcnow())
    ).rowcount)  # type: ignore[attr-defined]


def _digests_due() -> None:
    from mailer import digests

    for frequency, zone in digests.due(utcnow()):
        digests.run(frequency, zone=zone)


def kick(campaign_id: int) -> None:
    """Queue the batch loops that send a campaign (several, so workers share it)."""
    for _ in range(get_settings().send_parallelism):
        queue.dispatch("run_campaign", campaign_id)


@dataclass(frozen=True)
class Progress:
    id: int
    kind: str
    subject: str
    status: str
    status_reason: str
    categories: list[str]
    total: int
    counts: dict[str, int]
    created_at: datetime
    scheduled_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def done(self) -> int:
        return sum(v for k, v in self.counts.items() if k not in {"pending", "sending", "deferred"})


def progress(session: Session, campaign_id: int) -> Progress:
    campaign = _get(session, campaign_id)
    return Progress(
        id=campaign.id, kind=campaign.kind.value, subject=campaign.subject, status=campaign.status.value,
        status_reason=campaign.status_reason, categories=list(campaign.categories), total=campaign.total,
        counts=store.delivery_counts(session, campaign_id), created_at=campaign.created_at,
        scheduled_at=campaign.scheduled_at, started_at=campaign.started_at, finished_at=campaign.finished_at,
    )


async def send_test(campaign_id: int, emails: list[str]) -> dict[str, Result]:
    """Send the campaign to test addresses, marked [Test], without touching deliveries."""
    settings = get_settings()
    with session_scope() as session:
        variants = message_templates(_get(session, campaign_id))
    transport = transport_for(settings)
    results: dict[str, Result] = {}
    try:
        for email in emails:
            reader = compose.Reader(email=email, name="", unsubscribe_url=f"{settings.base_url}/unsubscribe/test",
                                    preferences_url=f"{settings.base_url}/preferences/test")
            test_id = f"<test.{campaign_id}.{tokens.make_nonce()}@{settings.list_domain}>"
            data = variants.for_reader(reader).personalise(reader, message_id=test_id)
            data = data.replace(b"\r\nSubject: ", b"\r\nSubject: [Test] ", 1)
            # Bounces of test sends go to the bounce address, where an admin finds them among the unclassified.
            results[email] = await transport.send(Envelope(settings.return_path_base, email, sign(data, settings)))
    finally:
        await transport.close()
    return results


def send_test_sync(campaign_id: int, emails: list[str]) -> dict[str, Result]:
    return asyncio.run(send_test(campaign_id, emails))


def tick() -> dict[str, int]:
    """The periodic housekeeping (Celery beat, or a thread of `mailer serve`):
    hand back claims of dead workers, start scheduled campaigns that are due, restart loops for
    campaigns with due work and nobody sending, and mark finished what has no work left."""
    settings = get_settings()
    started: list[int] = []
    kicked: list[int] = []
    with session_scope() as session:
        swept = store.sweep_stale_claims(session, worker_timeout=settings.worker_timeout,
                                         resend_unknown=settings.resend_unknown)
        due = session.scalars(select(Campaign.id).where(Campaign.status == CampaignStatus.scheduled,
                                                        Campaign.scheduled_at <= utcnow())).all()
    for campaign_id in due:
        with session_scope() as session:
            if start(session, campaign_id):
                started.append(campaign_id)
    with session_scope() as session:
        sending = session.scalars(select(Campaign.id).where(Campaign.status == CampaignStatus.sending)).all()
        for campaign_id in sending:
            if campaign_id in started:
                continue
            if store.has_claimable(session, campaign_id) and not store.being_sent(
                    session, campaign_id, worker_timeout=settings.worker_timeout):
                kicked.append(campaign_id)
            else:
                finish_if_done(session, campaign_id)
    for campaign_id in started + kicked:
        kick(campaign_id)
    from mailer import feeds, imap, imports, inbound, notices

    # Each chore stands alone: one failing (a hostile feed, say) must not stop the others.
    for chore in (notices.requeue_stale, _digests_due, feeds.poll_due, imap.poll_due, inbound.requeue_pending,
                  imports.requeue_stale):
        try:
            chore()
        except Exception:
            log.exception("tick: %s failed", getattr(chore, "__name__", chore))
    if swept or started or kicked:
        log.info("tick: %d claims handed back, started %s, restarted %s", swept, started, kicked)
    return {"swept": swept, "started": len(started), "kicked": len(kicked)}
