"""Feeds polled on a schedule (MAILER_FEEDS), with conditional GET so unchanged feeds cost one 304."""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from datetime import timedelta

from mailer import articles
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.models import Feed, utcnow

log = logging.getLogger(__name__)


def poll(url: str) -> articles.Report:
    """Fetch one feed if it changed since last time, and import what is valid in it."""
    settings = get_settings()
    report = articles.Report()
    with session_scope() as session:
        feed = session.get(Feed, url) or Feed(url=url, status="")
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
                feed.etag = response.headers.get("ETag")
                feed.last_modified = response.headers.get("Last-Modified")
        except urllib.error.HTTPError as error:
            if error.code == 304:
                feed.status = "not modified"
                return report
            feed.status = f"HTTP {error.code}"
            report.problems.append(f"{url}: HTTP {error.code}")
            return report
        except (OSError, ValueError) as error:
            feed.status = f"unreachable: {error}"
            report.problems.append(f"{url}: {error}")
            return report
        articles.ingest(session, articles.read_source(content, report, base=url),
                        create_categories=settings.create_categories, report=report)
        feed.status = report.summary()
    log.info("feed %s: %s", url, report.summary())
    return report


def poll_due() -> int:
    """Poll every configured feed whose last poll is older than MAILER_FEED_POLL_MINUTES."""
    settings = get_settings()
    due_before = utcnow() - timedelta(minutes=settings.feed_poll_minutes)
    polled = 0
    for url in settings.feeds:
        with session_scope() as session:
            feed = session.get(Feed, url)
            if feed is not None and feed.polled_at is not None and feed.polled_at > due_before:
                continue
        poll(url)
        polled += 1
    return polled
