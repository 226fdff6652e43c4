"""Digest runs: a campaign of kind `digest` per frequency, period and zone, one delivery per reader with
something new, and the ledger of the articles it carries: each digest delivery points at one of its
run's few distinct contents (`digest_contents`).

Materialisation walks readers by id in batches and is safe to repeat: deliveries are unique per
(campaign, reader), a reader's delivery (with its ledger pointer) and cursor move in the same commit,
and the builder leaves out every article already in a reader's ledger. A run that failed halfway and is
run again keeps the cutoff it began with, so it neither repeats an article nor sends a reader two
digests nor skips what came in meanwhile. Readers with nothing new get no mail, and their cursor
moves on.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import Table, Text, exists, func, or_, select, text
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
    DigestContent,
    DigestCursor,
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
CONTENTS = cast(Table, DigestContent.__table__)
CURSORS = cast(Table, DigestCursor.__table__)
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
        # A run whose builder died (still draft or building, and not heard from for a while) is offered
        # again. Its builder's last batch counts, not when it began: a run carried on by a new builder
        # is not offered to yet another one on every tick.
        stale = now - timedelta(minutes=STALE_BUILD_MINUTES)
        alive = (Campaign.created_at > stale) | (Campaign.built_at > stale)
        made = set(session.scalars(select(Campaign.run_key).where(
            Campaign.run_key.in_(list(keys)),
            ~((Campaign.status == CampaignStatus.draft) | Campaign.building) | alive)))
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
    since = store.digest_cursor(session, reader.id) or now - first_window(frequency or reader.frequency)
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
    after it was ingested, so only contents made since then count. Every one of those has an id at least
    the smallest of theirs, so the reader's index is read from that id on: a few older contents may come
    along (ids do not follow the cutoffs exactly across zones and carried-on runs), which is harmless."""
    received: dict[int, set[int]] = defaultdict(set)
    if not articles:
        return received
    oldest = min(a.ingested or a.when for a in articles)
    # `id + 0`: PostgreSQL would otherwise walk the primary key from the oldest content up to the first
    # recent one (min() as ORDER BY id LIMIT 1), where the created_at index finds them at once.
    first = select(func.min(DigestContent.id + 0)).where(DigestContent.created_at >= oldest).scalar_subquery()
    postgresql = session.get_bind().dialect.name == "postgresql"
    pairs = session.execute(
        select(Delivery.subscriber_id, Delivery.content_id)
        .where(store.one_of(Delivery.subscriber_id, reader_ids, postgresql=postgresql), Delivery.content_id >= first)
    ).all()
    got = _article_sets(session, {content_id for _, content_id in pairs if content_id is not None})
    for subscriber_id, content_id in pairs:
        if content_id is not None:
            received[subscriber_id] |= got.get(content_id, frozenset())
    return received


def _article_sets(session: Session, content_ids: set[int]) -> dict[int, frozenset[int]]:
    """Every article id a content lists or counts in "and K more"."""
    return {content_id: _listed_and_more(sections)
            for content_id, sections in _texts(session, content_ids).items()}


def _texts(session: Session, content_ids: set[int]) -> dict[int, str]:
    """Contents' sections as their JSON text, parsed once per distinct text by the callers' caches."""
    if not content_ids:
        return {}
    return {content_id: text for content_id, text in session.execute(
        select(DigestContent.id, cast_(DigestContent.sections, Text)).where(DigestContent.id.in_(content_ids)))}


@lru_cache(maxsize=4096)
def _listed_and_more(text: str) -> frozenset[int]:
    return frozenset(a for _category, listed, more in json.loads(text) for a in (*listed, *more))


def first_window(frequency: Frequency) -> timedelta:
    """How far back a reader's first digest reaches: MAILER_FIRST_DIGEST_HOURS, or one period."""
    hours = get_settings().first_digest_hours
    return timedelta(hours=hours) if hours else PERIOD[frequency]


def _materialise(session: Session, campaign: Campaign, frequency: Frequency, cutoff: datetime,
                 after_id: int, known: dict[str, int], zone: str | None = None) -> tuple[int, int]:
    """One batch of readers; returns (last reader id seen, deliveries made). Reader ids walk upwards.
    `known` maps the run's contents (their JSON text) to their ids, across batches."""
    period = first_window(frequency)
    per_category = get_settings().digest_per_category
    in_zone = Subscriber.timezone == zone if zone else or_(
        Subscriber.timezone.is_(None), Subscriber.timezone == get_settings().timezone)
    readers = session.execute(
        select(Subscriber.id, DigestCursor.at)
        .outerjoin(DigestCursor, DigestCursor.subscriber_id == Subscriber.id)
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
    planned: list[tuple[int, str]] = []
    # Readers with the same categories, cursor and ledger get the same digest: group once per kind of
    # reader, not once per reader (most readers of a run share one of a few dozen mixes). A plan is
    # kept as its JSON text ("" for nothing new), which is what the run's contents are keyed by.
    plans: dict[tuple[tuple[int, ...], datetime, frozenset[int]], str] = {}
    # A reader already in this run (a run carried on after a stop) has their cursor at the cutoff, so
    # nothing is new for them; were they planned again anyway, the insert below would skip them.
    for subscriber_id, at in readers:
        since = at or cutoff - period
        key = (tuple(chosen.get(subscriber_id, ())), since, frozenset(received[subscriber_id]))
        sections = plans.get(key)
        if sections is None:
            fresh = [a for a in articles if a.ingested is not None and a.ingested > since]
            grouped = build(chosen=list(key[0]), category_order=order, articles=fresh, received=set(key[2]),
                            per_category=per_category)
            sections = plans[key] = json.dumps([
                [None if s.category_id == UNCATEGORISED else s.category_id, list(s.article_ids), list(s.more)]
                for s in grouped]) if grouped else ""
        if sections:
            planned.append((subscriber_id, sections))
    made = _add_to_run(session, campaign.id, planned, cutoff, known, postgresql=postgresql) if planned else 0
    _move_cursors(session, ids, cutoff, postgresql=postgresql)
    return ids[-1], made


def content_key(text: str) -> str:
    """A content's key within its run: the SHA-256 of its sections' JSON text."""
    return hashlib.sha256(text.encode()).hexdigest()


# PostgreSQL: a batch of deliveries, each with its ledger pointer, as one statement over arrays, so the
# builder spends no Python on each row; the same statement text every time, prepared once.
_PG_DELIVERIES = text(
    "INSERT INTO deliveries (campaign_id, subscriber_id, content_id, state, attempts) "
    "SELECT :campaign_id, s, c, 'pending', 0 "
    "FROM unnest(CAST(:subscribers AS integer[]), CAST(:contents AS bigint[])) AS t(s, c) "
    "ON CONFLICT DO NOTHING RETURNING id")
# A cursor only moves forwards: a reader who moved to a zone whose run has an earlier cutoff keeps theirs.
_PG_CURSORS = text(
    "INSERT INTO digest_cursors (subscriber_id, at) SELECT s, :at FROM unnest(CAST(:subscribers AS integer[])) AS s "
    "ON CONFLICT (subscriber_id) DO UPDATE SET at = GREATEST(digest_cursors.at, excluded.at)")


def _add_to_run(session: Session, campaign_id: int, planned: list[tuple[int, str]], cutoff: datetime,
                known: dict[str, int], *, postgresql: bool) -> int:
    """Add readers with their digests to the run; returns how many this call added.

    ON CONFLICT DO NOTHING: a second process building the same run at the same moment adds nobody
    twice. A reader's ledger entry is their delivery's content, so it is written in the same row."""
    content_of = _content_ids(session, campaign_id, {sections for _, sections in planned}, cutoff, known)
    if postgresql:
        rows = session.execute(_PG_DELIVERIES, {"campaign_id": campaign_id,
                                                "subscribers": [s for s, _ in planned],
                                                "contents": [content_of[sections] for _, sections in planned]}).all()
    else:
        rows = session.execute(
            store.insert_for(session)(DELIVERIES).on_conflict_do_nothing().returning(DELIVERIES.c.id),
            [{"campaign_id": campaign_id, "subscriber_id": s, "content_id": content_of[sections],
              "state": DeliveryState.pending.value, "attempts": 0} for s, sections in planned],
        ).all()
    return len(rows)


def _content_ids(session: Session, campaign_id: int, texts: set[str], cutoff: datetime,
                 known: dict[str, int]) -> dict[str, int]:
    """The run's content row for each plan, made on first sight. The upsert hands back the id of a row a
    run carried on after a stop (or another builder) made already, so a content is never stored twice."""
    # In key order: two builders of one run then take the unique index's entries in the same order, and
    # neither can wait on the other for one while holding another.
    keys = {t: content_key(t) for t in texts if t not in known}
    if keys:
        insert_ = store.insert_for(session)(CONTENTS)
        rows = session.execute(
            insert_.on_conflict_do_update(index_elements=[CONTENTS.c.campaign_id, CONTENTS.c.key],
                                          set_={"key": insert_.excluded.key})
            .returning(CONTENTS.c.id, CONTENTS.c.key),
            [{"campaign_id": campaign_id, "key": key, "sections": json.loads(t), "created_at": cutoff}
             for t, key in sorted(keys.items(), key=lambda item: item[1])],
        ).all()
        by_key = {key: content_id for content_id, key in rows}
        known.update({t: by_key[key] for t, key in keys.items()})
    return known


def _move_cursors(session: Session, ids: list[int], cutoff: datetime, *, postgresql: bool) -> None:
    if postgresql:
        session.execute(_PG_CURSORS, {"at": cutoff.astimezone(UTC).replace(tzinfo=None), "subscribers": ids})
        return
    insert_ = store.insert_for(session)(CURSORS)
    session.execute(insert_.on_conflict_do_update(index_elements=[CURSORS.c.subscriber_id],
                                                  set_={"at": func.max(CURSORS.c.at, insert_.excluded.at)}),
                    [{"subscriber_id": s, "at": cutoff} for s in ids])


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
            # A run carried on after a stop keeps the cutoff it began with: the cursors of readers it
            # already holds sit at that cutoff, and a later one would move them past articles that came
            # in meanwhile, which no digest would then carry. That holds from its first committed reader,
            # even one the builder committed just before it died, before marking the run as building. A
            # run that holds nobody yet (it found nothing new, or stopped before its first reader) takes
            # what has come in since.
            grace = timedelta(seconds=get_settings().digest_grace_seconds)
            holds = building or session.scalar(select(exists().where(Delivery.campaign_id == campaign_id)))
            cutoff = campaign.created_at - grace if holds else now - grace
    except IntegrityError:
        # Another process made this period's run a moment ago; it carries on with it.
        return RunResult(None, 0, False, zone)
    if status is not CampaignStatus.draft and not building:
        return RunResult(campaign_id, 0, False, zone)
    # Sending starts with the first batch of readers and overlaps with adding the rest; the campaign
    # cannot finish until every reader is in. A run that stopped halfway carries on from here.
    settings = get_settings()
    last, total, started, walked = 0, 0, False, False
    known: dict[str, int] = {}
    if holds and not building:
        # The builder died after committing readers but before starting the run: start it now, or the
        # walk below, which adds none of them again, would end it as having nobody.
        with session_scope() as session:
            started = campaigns.start_building(session, campaign_id)
        if started:
            campaigns.kick(campaign_id)
    try:
        while True:
            with session_scope() as session:
                campaign = session.get(Campaign, campaign_id)
                assert campaign is not None
                last_seen, made = _materialise(session, campaign, frequency, cutoff, last, known, zone)
                campaign.built_at = utcnow()
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


def contents(session: Session, content_ids: set[int]) -> dict[int, Content]:
    """What each of these digest contents shows, from the ledger. Each JSON text is parsed once per
    process: a run's hundred thousand deliveries share a few dozen of them."""
    return {content_id: _content(text) for content_id, text in _texts(session, content_ids).items()}


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
