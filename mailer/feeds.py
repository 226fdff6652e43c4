"""Feeds polled on a schedule (MAILER_FEEDS), with conditional GET so unchanged feeds cost one 304."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import articles
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidInput, NotFound
from mailer.models import Feed, utcnow

log = logging.getLogger(__name__)


def poll(url: str) -> articles.Report:
    """Fetch one feed if it changed since last time, and import what is valid in it."""
    settings = get_settings()
    report = articles.Report()
    with session_scope() as session:
        feed = session.get(Feed, url) or Feed(url=url, status="", added=False)
        session.add(feed)
        headers = {"User-Agent": "mailer/0.1 (+feed poller)"}
        if feed.etag:
            headers["If-None-Match"] = feed.etag
        if feed.last_modified:
            headers["If-Modified-Since"] = feed.last_modified
        feed.polled_at = utcnow()
        try:
            request = urllib.request.Request(url, headers=headers)  # noqa: S310 - MAILER_FEEDS is http(s) only.
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                content = bytes(response.read(articles.MAX_FEED_BYTES + 1))
                etag, last_modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
        except urllib.error.HTTPError as error:
            if error.code == 304:
                feed.status = "not modified"
                return report
            feed.status = f"HTTP {error.code}"
            report.problems.append(f"{url}: HTTP {error.code}")
            return report
        except Exception as error:
            # Anything a hostile server can make urllib raise is this feed's problem, reported on it.
            feed.status = f"unreachable: {type(error).__name__}: {error}"[:500]
            report.problems.append(f"{url}: {error}")
            return report
        polled_at = feed.polled_at
    # The poll is committed first, so a broken import cannot make the feed fail on every tick. The
    # validators are kept only once the import committed: after a crash the next poll fetches it all again
    # instead of getting a 304 for items that never arrived.
    with session_scope() as session:
        articles.ingest(session, articles.read_source(content, report, base=url),
                        create_categories=settings.create_categories, report=report)
    with session_scope() as session:
        stored = session.get(Feed, url)
        if stored is not None:
            stored.polled_at = polled_at
            stored.status = report.summary()[:500]
            stored.etag, stored.last_modified = etag, last_modified
    log.info("feed %s: %s", url, report.summary())
    return report


def all_feeds(session: Session) -> list[tuple[Feed, bool]]:
    """Feeds from MAILER_FEEDS (marked True) and those added through the API, with their last poll."""
    configured = get_settings().feeds
    stored = {feed.url: feed for feed in session.scalars(select(Feed).order_by(Feed.url))}
    listed = [(stored.get(url) or Feed(url=url, status="not polled yet"), True) for url in configured]
    return listed + [(feed, False) for url, feed in stored.items() if url not in configured and feed.added]


def add(session: Session, url: str) -> Feed:
    clean = articles.clean_url(url)
    if clean is None:
        raise InvalidInput("url", "A feed must be an absolute http(s) URL.")
    feed = session.get(Feed, clean)
    if feed is None:
        feed = Feed(url=clean, status="not polled yet", added=True)
        session.add(feed)
    feed.added = True
    session.flush()
    return feed


def remove(session: Session, url: str) -> None:
    feed = session.get(Feed, url)
    if feed is None or not feed.added:
        raise NotFound("There is no feed with that URL added through the API.")
    feed.added = False


def poll_due() -> int:
    """Poll every feed (MAILER_FEEDS and added ones) whose last poll is older than MAILER_FEED_POLL_MINUTES."""
    settings = get_settings()
    due_before = utcnow() - timedelta(minutes=settings.feed_poll_minutes)
    with session_scope() as session:
        added = list(session.scalars(select(Feed.url).where(Feed.added.is_(True))))
    polled = 0
    for url in dict.fromkeys([*settings.feeds, *added]):
        with session_scope() as session:
            feed = session.get(Feed, url)
            if feed is not None and feed.polled_at is not None and feed.polled_at > due_before:
                continue
        poll(url)
        polled += 1
    return polled
