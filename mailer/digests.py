"""Digest runs: a campaign of kind `digest` per frequency, period and zone, one delivery per reader with
something new, and the ledger (`digest_entries`, one row per delivery) of the articles it carries.

Materialisation walks readers by id in batches and is safe to repeat: deliveries are unique per
(campaign, reader), a reader's ledger row and cursor move in the same commit as their delivery, and
the builder leaves out every article already in a reader's ledger. A run that failed halfway and is
run again keeps the cutoff it began with, so it neither repeats an article nor sends a reader two
digests nor skips what came in meanwhile. Readers with nothing new get no mail, and their cursor
moves on.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, Text, insert, or_, select, text, update
from sqlalchemy import cast as cast_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import campaigns, compose, render, store
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.digest import UNCATEGORISED, ArticleRef, Section, build
from mailer.models import (
    Article,
    Campaign,
    CampaignKind,
    CampaignStatus,
    Delivery,
    DeliveryState,
    DigestEntry,
    Frequency,
    Status,
    Subscriber,
    article_categories,
    subscriber_categories,
    utcnow,
)

log = logging.getLogger(__name__)

PERIOD = {Frequency.daily: timedelta(days=1), Frequency.weekly: timedelta(days=7)}
READER_BATCH = 1000
DELIVERIES = cast(Table, Delivery.__table__)
LEDGER = cast(Table, DigestEntry.__table__)
# Core, not the ORM: moving a cursor is not an edit of the subscriber, so updated_at stays as it is.
SUBSCRIBERS = cast(Table, Subscriber.__table__)
STALE_BUILD_MINUTES = 30


def local(now: datetime, zone: str | None = None) -> datetime:
    return now.astimezone(ZoneInfo(zone or get_settings().timezone))


def long_date(when: datetime, zone: str | None = None) -> str:
    return local(when, zone).strftime("%A, %B %-d, %Y")


def run_key(frequency: Frequency, now: datetime, zone: str | None = None) -> str:
    """The period a run covers, in its readers' time zone: one run per day, or per ISO week, per zone.
    Readers in the site's zone (zone None) have the plain key."""
    today = local(now, zone)
    suffix = f":{zone}" if zone else ""
    if frequency is Frequency.weekly:
        year, week, _ = today.isocalendar()
        return f"weekly:{year}-W{week:02d}{suffix}"
    return f"daily:{today.date().isoformat()}{suffix}"


def zones(session: Session) -> list[str | None]:
    """The site's zone (None) and every other zone a confirmed reader chose."""
    site = get_settings().timezone
    chosen = session.scalars(select(Subscriber.timezone).where(
        Subscriber.status == Status.confirmed, Subscriber.timezone.is_not(None),
        Subscriber.timezone != site).distinct())
    return [None, *sorted(z for z in chosen if z)]


def due(now: datetime) -> list[tuple[Frequency, str | None]]:
    """(frequency, zone) runs that should start now: at MAILER_DIGEST_HOUR in that zone (weekly ones on
    MAILER_DIGEST_WEEKDAY there), and not made yet."""
    settings = get_settings()
    if not settings.schedule_digests:
        return []
    with session_scope() as session:
        candidates = []
        for zone in zones(session):
            today = local(now, zone)
            if today.hour < settings.digest_hour:
                continue
            candidates.append((Frequency.daily, zone))
            if today.weekday() == settings.digest_weekday:
                candidates.append((Frequency.weekly, zone))
        keys = {run_key(f, now, z): (f, z) for f, z in candidates}
        # A run whose builder died (still draft or building long after it began) is offered again.
        stale = now - timedelta(minutes=STALE_BUILD_MINUTES)
        made = set(session.scalars(select(Campaign.run_key).where(
            Campaign.run_key.in_(list(keys)),
            ~((Campaign.status == CampaignStatus.draft) | Campaign.building) | (Campaign.created_at > stale))))
    return [run for key, run in keys.items() if key not in made]


@dataclass
class RunResult:
    campaign_id: int | None
    readers: int
    started: bool
    zone: str | None = None


def _articles_since(session: Session, since: datetime, until: datetime) -> list[ArticleRef]:
    rows = session.execute(
        select(Article.id, Article.published_at, Article.ingested_at)
        .where(Article.ingested_at > since, Article.ingested_at <= until)
    ).all()
    if not rows:
        return []
    links: dict[int, set[int]] = defaultdict(set)
    for article_id, category_id in session.execute(
        select(article_categories.c.article_id, article_categories.c.category_id)
        .where(article_categories.c.article_id.in_([r[0] for r in rows]))
    ):
        links[article_id].add(category_id)
    return [ArticleRef(r[0], r[1] or r[2], frozenset(links.get(r[0], ())), r[2]) for r in rows]


def plan(session: Session, reader: Subscriber, *, now: datetime, frequency: Frequency | None = None,
         received: set[int] | None = None) -> tuple[list[Section], dict[int, datetime]]:
    """One reader's next digest, without recording anything (used by preview)."""
    since = reader.digest_cursor or now - first_window(frequency or reader.frequency)
    articles = _articles_since(session, since, now)
    if received is None:
        received = _received(session, [reader.id], articles)[reader.id]
    order = [c.id for c in store.categories(session)]
    chosen = [c.id for c in reader.categories]
    sections = build(chosen=chosen, category_order=order, articles=articles, received=received,
                     per_category=get_settings().digest_per_category)
    return sections, {a.id: a.when for a in articles}


def _received(session: Session, reader_ids: list[int], articles: list[ArticleRef]) -> dict[int, set[int]]:
    """The articles each reader already got, among the candidates. An article can only be in digests made
    after it was ingested, so only those entries are read."""
    received: dict[int, set[int]] = defaultdict(set)
    if not articles:
        return received
    oldest = min(a.ingested or a.when for a in articles)
    postgresql = session.get_bind().dialect.name == "postgresql"
    for subscriber_id, sections in session.execute(
        select(DigestEntry.subscriber_id, DigestEntry.sections)
        .where(store.one_of(DigestEntry.subscriber_id, reader_ids, postgresql=postgresql),
               DigestEntry.created_at >= oldest)
    ):
        for _category, listed, more in sections:
            received[subscriber_id].update(listed)
            received[subscriber_id].update(more)
    return received


def first_window(frequency: Frequency) -> timedelta:
    """How far back a reader's first digest reaches: MAILER_FIRST_DIGEST_HOURS, or one period."""
    hours = get_settings().first_digest_hours
    return timedelta(hours=hours) if hours else PERIOD[frequency]


def _materialise(session: Session, campaign: Campaign, frequency: Frequency, cutoff: datetime,
                 after_id: int, zone: str | None = None) -> tuple[int, int]:
    """One batch of readers; returns (last reader id seen, deliveries made). Reader ids walk upwards."""
    period = first_window(frequency)
    per_category = get_settings().digest_per_category
    in_zone = Subscriber.timezone == zone if zone else or_(
        Subscriber.timezone.is_(None), Subscriber.timezone == get_settings().timezone)
    readers = session.execute(
        select(Subscriber.id, Subscriber.digest_cursor)
        .where(Subscriber.status == Status.confirmed, Subscriber.frequency == frequency, Subscriber.id > after_id,
               in_zone)
        .order_by(Subscriber.id).limit(READER_BATCH)
    ).all()
    if not readers:
        return after_id, 0
    ids = [r[0] for r in readers]
    postgresql = session.get_bind().dialect.name == "postgresql"
    oldest = min((r[1] or cutoff - period) for r in readers)
    articles = _articles_since(session, oldest, cutoff)
    chosen: dict[int, list[int]] = defaultdict(list)
    for subscriber_id, category_id in session.execute(
        select(subscriber_categories.c.subscriber_id, subscriber_categories.c.category_id)
        .where(store.one_of(subscriber_categories.c.subscriber_id, ids, postgresql=postgresql))
    ):
        chosen[subscriber_id].append(category_id)
    received = _received(session, ids, articles)
    order = [c.id for c in store.categories(session)]
    planned: list[tuple[int, list[Any]]] = []
    # Readers with the same categories, cursor and ledger get the same digest: group once per kind of
    # reader, not once per reader (most readers of a run share one of a few dozen mixes).
    plans: dict[tuple[tuple[int, ...], datetime, frozenset[int]], list[Any]] = {}
    # A reader already in this run (a run carried on after a stop) is planned again but not added:
    # the insert below skips them, and only rows it inserted get ledger entries.
    for subscriber_id, cursor in readers:
        since = cursor or cutoff - period
        key = (tuple(chosen.get(subscriber_id, ())), since, frozenset(received[subscriber_id]))
        sections = plans.get(key)
        if sections is None:
            fresh = [a for a in articles if a.ingested is not None and a.ingested > since]
            grouped = build(chosen=list(key[0]), category_order=order, articles=fresh, received=set(key[2]),
                            per_category=per_category)
            sections = plans[key] = [[None if s.category_id == UNCATEGORISED else s.category_id,
                                      list(s.article_ids), list(s.more)] for s in grouped]
        if sections:
            planned.append((subscriber_id, sections))
    made = _add_to_run(session, campaign.id, planned, cutoff, postgresql=postgresql) if planned else 0
    session.execute(update(SUBSCRIBERS).where(store.one_of(SUBSCRIBERS.c.id, ids, postgresql=postgresql))
                    .values(digest_cursor=cutoff, updated_at=SUBSCRIBERS.c.updated_at))
    return ids[-1], made


# PostgreSQL: a batch of deliveries and their ledger entries as two statements over arrays, so the
# builder spends no Python on each row; the same statement text every time, prepared once.
_PG_DELIVERIES = text(
    "INSERT INTO deliveries (campaign_id, subscriber_id, state, attempts) "
    "SELECT :campaign_id, s, 'pending', 0 FROM unnest(CAST(:subscribers AS integer[])) AS s "
    "ON CONFLICT DO NOTHING RETURNING id, subscriber_id")
_PG_LEDGER = text(
    "INSERT INTO digest_entries (delivery_id, subscriber_id, created_at, sections) "
    "SELECT d, s, :created_at, CAST(j AS json) "
    "FROM unnest(CAST(:deliveries AS bigint[]), CAST(:subscribers AS integer[]), CAST(:sections AS text[])) "
    "AS t(d, s, j)")


def _add_to_run(session: Session, campaign_id: int, planned: list[tuple[int, list[Any]]], cutoff: datetime, *,
                postgresql: bool) -> int:
    """Add readers with their digests to the run; returns how many this call added.

    ON CONFLICT DO NOTHING: a second process building the same run at the same moment adds nobody
    twice, and only the rows this one inserted get ledger entries."""
    if postgresql:
        rows = session.execute(_PG_DELIVERIES, {"campaign_id": campaign_id,
                                                "subscribers": [s for s, _ in planned]}).all()
    else:
        rows = session.execute(
            store.insert_for(session)(DELIVERIES).on_conflict_do_nothing()
            .returning(DELIVERIES.c.id, DELIVERIES.c.subscriber_id),
            [{"campaign_id": campaign_id, "subscriber_id": s, "state": DeliveryState.pending.value,
              "attempts": 0} for s, _ in planned],
        ).all()
    delivery_of = {subscriber_id: delivery_id for delivery_id, subscriber_id in rows}
    added = [(s, sections) for s, sections in planned if s in delivery_of]
    if not added:
        return 0
    if postgresql:
        # Many readers share one plan (one list object): it is written out as JSON once.
        texts: dict[int, str] = {}
        session.execute(_PG_LEDGER, {
            "created_at": cutoff.astimezone(UTC).replace(tzinfo=None),
            "deliveries": [delivery_of[s] for s, _ in added], "subscribers": [s for s, _ in added],
            "sections": [texts.get(id(sections)) or texts.setdefault(id(sections), json.dumps(sections))
                         for _, sections in added]})
    else:
        session.execute(insert(LEDGER), [
            {"delivery_id": delivery_of[subscriber_id], "subscriber_id": subscriber_id, "created_at": cutoff,
             "sections": sections}
            for subscriber_id, sections in added])
    return len(added)


def run(frequency: Frequency, *, now: datetime | None = None, zone: str | None = None,
        progress: Callable[[int], None] | None = None) -> RunResult:
    """Create (or find) this period's digest run for readers in a zone (None: the site's), add the readers
    with something new, and start it."""
    now = now or utcnow()
    key = run_key(frequency, now, zone)
    try:
        with session_scope() as session:
            campaign = session.scalars(select(Campaign).where(Campaign.run_key == key)).first()
            if campaign is None:
                where = f" ({zone})" if zone else ""
                title = f"{frequency.value.capitalize()} digest, {long_date(now, zone)}{where}"
                campaign = Campaign(kind=CampaignKind.digest, subject=title, html="",
                                    text="", categories=[], status=CampaignStatus.draft, status_reason="", total=0,
                                    run_key=key, created_at=now)
                session.add(campaign)
                session.flush()
            campaign_id, status, building = campaign.id, campaign.status, bool(campaign.building)
            # A run carried on after a stop keeps the cutoff it began with: readers it already holds are
            # planned again and skipped, and a later cutoff would move their cursors past articles that
            # came in meanwhile, which no digest would then carry. A run that holds nobody yet (it found
            # nothing new, or stopped before its first reader) takes what has come in since.
            grace = timedelta(seconds=get_settings().digest_grace_seconds)
            cutoff = campaign.created_at - grace if campaign.building else now - grace
    except IntegrityError:
        # Another process made this period's run a moment ago; it carries on with it.
        return RunResult(None, 0, False, zone)
    if status is not CampaignStatus.draft and not building:
        return RunResult(campaign_id, 0, False, zone)
    # Sending starts with the first batch of readers and overlaps with adding the rest; the campaign
    # cannot finish until every reader is in. A run that stopped halfway carries on from here.
    settings = get_settings()
    last, total, started, walked = 0, 0, False, False
    try:
        while True:
            with session_scope() as session:
                campaign = session.get(Campaign, campaign_id)
                assert campaign is not None
                last_seen, made = _materialise(session, campaign, frequency, cutoff, last, zone)
            total += made
            if made:
                with session_scope() as session:
                    started = campaigns.start_building(session, campaign_id) or started
                    idle = not store.being_sent(session, campaign_id, worker_timeout=settings.worker_timeout)
                if idle:
                    campaigns.kick(campaign_id)
            if progress:
                progress(total)
            if last_seen == last:
                walked = True
                break
            last = last_seen
    finally:
        # A walk over every reader lets the campaign finish. One that stopped early leaves it building:
        # running the period again (due() offers it again later) carries on where it stopped.
        if walked:
            with session_scope() as session:
                campaigns.finish_building(session, campaign_id)
    return RunResult(campaign_id, total, started or building, zone)


def run_all(frequency: Frequency, *, progress: Callable[[int], None] | None = None) -> list[RunResult]:
    """This period's runs for every zone readers chose (a manual run: `mailer digest run`, the API).
    Each zone's run covers that zone's day or week, as the scheduled ones do."""
    with session_scope() as session:
        chosen = zones(session)
    results: list[RunResult] = []
    done = 0

    def counted(n: int) -> None:
        if progress:
            progress(done + n)

    for zone in chosen:
        result = run(frequency, zone=zone, progress=counted)
        done += result.readers
        if result.campaign_id is not None:
            results.append(result)
    return results


def preview(email: str) -> render.Rendered | None:
    """A reader's next digest, rendered for them, without sending or recording anything."""
    from mailer import tokens
    from mailer.errors import InvalidEmail
    from mailer.subscriptions import normalize_email

    _, key = normalize_email(email)
    now = utcnow()
    with session_scope() as session:
        reader = store.subscriber_by_email(session, key)
        if reader is None:
            raise InvalidEmail("There is no subscriber with that address.")
        sections, _ = plan(session, reader, now=now)
        if not sections:
            return None
        content = Content(tuple(
            (None if s.category_id == UNCATEGORISED else s.category_id, s.article_ids, len(s.more))
            for s in sections))
        variants = render_content(session, content, zone=reader.timezone)
        fields = compose.Reader(email=reader.email, name=reader.name, **tokens.urls(reader.id))
    template = variants.for_reader(fields)
    values = fields.fields()
    return render.Rendered(subject=template.subject.fill(values), text=template.text.fill(values),
                           html=template.html.fill(values).decode("ascii"))


# --- Rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """What one digest shows; readers with equal content share one render."""

    sections: tuple[tuple[int | None, tuple[int, ...], int], ...]


def contents(session: Session, delivery_ids: list[int]) -> dict[int, Content]:
    """What each digest delivery shows, from the ledger. The entries are read as JSON text and parsed
    once per distinct text: a run's hundred thousand entries hold a few dozen different ones."""
    return {
        delivery_id: _content(text)
        for delivery_id, text in session.execute(
            select(DigestEntry.delivery_id, cast_(DigestEntry.sections, Text))
            .where(DigestEntry.delivery_id.in_(delivery_ids))
        )
    }


@lru_cache(maxsize=4096)
def _content(text: str) -> Content:
    return Content(tuple((category, tuple(listed), len(more)) for category, listed, more in json.loads(text)))


def zone_of(run_key: str | None) -> str | None:
    """The readers' zone of a digest run ("daily:2026-11-25:Asia/Tokyo"); None for the site's zone."""
    parts = (run_key or "").split(":", 2)
    return parts[2] if len(parts) == 3 else None


def render_content(session: Session, content: Content, *, zone: str | None = None,
                   day: datetime | None = None) -> compose.Variants:
    """The digest template for one distinct content, rendered on first use. Dates and times are
    written in the readers' zone (a run holds the readers of one zone; None is the site's). The date
    is the run's (`day`), so a digest retried the next morning still says which day it covers."""
    article_ids = [a for _, ids, _ in content.sections for a in ids]
    articles = {a.id: a for a in session.scalars(select(Article).where(Article.id.in_(article_ids)))}
    categories = {c.id: c for c in store.categories(session)}
    settings = get_settings()
    sections: list[dict[str, Any]] = []
    for category_id, ids, more in content.sections:
        category = categories.get(category_id) if category_id else None
        sections.append({
            "name": category.name if category else "More news",
            "url": settings.category_link(category.slug) if category else settings.site_url or settings.base_url,
            "articles": [_article(articles[i], zone) for i in ids if i in articles],
            "more": more,
        })
    top = sections[0]["articles"][0]["title"] if sections and sections[0]["articles"] else ""
    context: dict[str, Any] = {"sections": sections, "top_headline": top,
                               "date": long_date(day or utcnow(), zone)}

    def rendered(markers: dict[str, Any]) -> render.Rendered:
        return render.render("digest", {**context, **markers})

    return compose.Variants(rendered)


def _article(article: Article, zone: str | None) -> dict[str, Any]:
    when = local(article.published_at or article.ingested_at, zone)
    return {"title": article.title, "url": article.url, "source": article.source, "summary": article.summary,
            "published": when.strftime("%b %-d, %H:%M %Z"), "image_url": article.image_url}
