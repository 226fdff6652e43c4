"""Articles in: from the API, from RSS 2.0 / Atom / JSON Feed files or URLs, or a JSON list.

Feed content is untrusted. Titles become plain text; summaries keep a small allow-list of HTML
(nh3); links other than http(s) are dropped. Category names map onto stored categories whatever
their case and punctuation ("U.S.–Russia Relations" is "US-Russia relations"). Ingesting a URL
again updates its article.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import nh3
from sqlalchemy import select
from sqlalchemy.orm import Session

from mailer import store
from mailer.categories import slugify
from mailer.models import Article, Category, utcnow

ALLOWED_TAGS = {"p", "br", "b", "strong", "i", "em", "a", "ul", "ol", "li", "blockquote"}
MAX_TITLE = 500
MAX_SUMMARY = 5_000
MAX_FEED_BYTES = 20_000_000
MAX_URL = 2000


@dataclass
class Report:
    """What an import did: counts, and each skipped item with its reason."""

    new: int = 0
    updated: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.new} new, {self.updated} updated, {len(self.skipped)} skipped"
        return text + ("" if not self.problems else f"; {'; '.join(self.problems)}")


@dataclass(frozen=True)
class Incoming:
    url: str
    title: str
    source: str = ""
    author: str = ""
    published_at: datetime | None = None
    summary: str = ""
    image_url: str | None = None
    categories: tuple[str, ...] = ()


def clean_url(raw: str | None, base: str | None = None) -> str | None:
    """An absolute http(s) URL without its fragment, or None (javascript:, data:, relative without a base…)."""
    if not raw or not isinstance(raw, str):
        return None
    try:
        url = urljoin(base, raw.strip()) if base else raw.strip()
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it rejects a port that is not a number.
    except ValueError:
        return None
    if parts.scheme.lower() not in {"http", "https"} or not parts.netloc or any(ch.isspace() for ch in url):
        return None
    cleaned = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))
    return cleaned if len(cleaned) <= MAX_URL else None


def plain_text(raw: str | None, limit: int) -> str:
    """One line of text. Titles are text, not markup (feedparser has already decoded a feed's HTML
    titles): a literal "<script>" stays as characters, which every template escapes."""
    text = "".join(ch if ch.isprintable() else " " for ch in raw or "")
    return " ".join(text.split())[:limit]


def safe_summary(raw: str | None, base: str | None = None) -> str:
    """Summary HTML through nh3's allow-list; links must be http(s) and open with rel=noopener."""

    def keep_link(tag: str, attribute: str, value: str) -> str | None:
        if tag == "a" and attribute == "href":
            return clean_url(value, base)
        return None

    # Cut before cleaning: cutting cleaned HTML could leave an open tag or attribute behind.
    cleaned = nh3.clean((raw or "")[:MAX_SUMMARY], tags=ALLOWED_TAGS, attributes={"a": {"href"}},
                        url_schemes={"http", "https"}, attribute_filter=keep_link, link_rel="noopener noreferrer")
    return str(cleaned)


def parse_time(value: Any) -> datetime | None:
    """A time-zone-aware time from a datetime, a feedparser time tuple, ISO 8601 or RFC 2822; else None."""
    try:
        parsed = _parse_time(value)
        return parsed.astimezone(UTC) if parsed is not None else None
    except (ValueError, TypeError, OverflowError):
        return None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, tuple | list) and len(value) >= 6:
        year, month, day, hour, minute, second = (int(v) for v in value[:6])
        return datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    if isinstance(value, str) and value.strip():
        for parse in (datetime.fromisoformat, parsedate_to_datetime):
            try:
                parsed = parse(value.strip().replace("Z", "+00:00") if parse is datetime.fromisoformat else value)
            except (ValueError, TypeError, IndexError):
                continue
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _category_map(session: Session) -> dict[str, Category]:
    return {c.slug: c for c in store.categories(session)}


def _categories(session: Session, names: Iterable[str], known: dict[str, Category], *, create: bool) -> list[Category]:
    found: list[Category] = []
    for name in names:
        slug = slugify(name)[:120].rstrip("-")
        if not slug:
            continue
        category = known.get(slug)
        if category is None and create:
            category = Category(slug=slug, name=plain_text(name, 200), description="",
                                position=store.next_category_position(session))
            session.add(category)
            session.flush()
            known[slug] = category
        if category is not None and category not in found:
            found.append(category)
    return found


def ingest(session: Session, items: Iterable[Incoming], *, create_categories: bool = False,
           progress: Callable[[int], None] | None = None, report: Report | None = None) -> Report:
    """Store articles, updating those whose URL is known. Invalid items are skipped with a reason.
    Pass the report the source was read into, so one report tells the whole import."""
    report = report or Report()
    known = _category_map(session)
    for count, item in enumerate(_guarded(items, report), 1):
        url = clean_url(item.url)
        title = plain_text(item.title, MAX_TITLE)
        if url is None:
            # An item without a link is named by its title, so the report says which one it was.
            report.skipped.append((str(item.url)[:200] or repr(item.title[:80] or "untitled"), "no http(s) link"))
            continue
        if not title:
            report.skipped.append((url, "no title"))
            continue
        article = session.scalars(select(Article).where(Article.url == url)).first()
        if article is None:
            article = Article(url=url, ingested_at=utcnow())
            session.add(article)
            report.new += 1
        else:
            report.updated += 1
        article.title = title
        article.source = plain_text(item.source, 200) or (urlsplit(url).hostname or "")
        article.author = plain_text(item.author, 200)
        article.published_at = item.published_at
        article.summary = safe_summary(item.summary, url)
        article.image_url = clean_url(item.image_url, url)
        article.categories = _categories(session, item.categories, known, create=create_categories)
        # Each article is committed on its own, so a digest run never misses one still in a long import.
        session.commit()
        if progress:
            progress(count)
    return report


def _guarded(items: Iterable[Incoming], report: Report) -> Iterator[Incoming]:
    """Items from a source, skipping (with a reason) any that a malformed entry made unreadable."""
    iterator = iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (TypeError, KeyError, ValueError, AttributeError, IndexError) as error:
            report.skipped.append(("?", f"unreadable item: {type(error).__name__}: {error}"))
            continue
        yield item


# --- Reading sources -------------------------------------------------------------------------------


def from_json(data: Any, report: Report) -> Iterator[Incoming]:
    """A JSON Feed (https://jsonfeed.org), a list of article objects, or one article object."""
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        base = data.get("home_page_url") or data.get("feed_url")
        if not data["items"]:
            report.problems.append("the feed has no items")
        for entry in data["items"]:
            if not isinstance(entry, dict):
                report.skipped.append(("?", "an item is not an object"))
                continue
            authors = entry.get("authors")
            author = entry.get("author") or (authors[0] if isinstance(authors, list) and authors else {})
            yield Incoming(
                url=clean_url(entry.get("url") or entry.get("external_url"), base) or str(entry.get("url")),
                title=str(entry.get("title") or ""),
                author=str(author.get("name", "")) if isinstance(author, dict) else "",
                published_at=parse_time(entry.get("date_published")),
                summary=str(entry.get("summary") or entry.get("content_html") or entry.get("content_text") or ""),
                image_url=entry.get("image"),
                categories=tuple(str(t) for t in _listed(entry.get("tags")) if isinstance(t, str)),
                source=str(data.get("title") or ""),
            )
        return
    entries = data if isinstance(data, list) else [data]
    if not entries:
        report.problems.append("the list has no articles")
    for entry in entries:
        if not isinstance(entry, dict):
            report.skipped.append(("?", "an item is not an object"))
            continue
        categories = _listed(entry.get("categories"))
        yield Incoming(
            url=str(entry.get("url") or ""),
            title=str(entry.get("title") or ""),
            source=str(entry.get("source") or ""),
            author=str(entry.get("author") or ""),
            published_at=parse_time(entry.get("published_at") or entry.get("published")),
            summary=str(entry.get("summary") or ""),
            image_url=entry.get("image_url") or entry.get("image"),
            categories=tuple(str(c) for c in categories if isinstance(c, str)),
        )


def from_feed(content: bytes, report: Report, *, base: str | None = None) -> Iterator[Incoming]:
    """RSS 2.0 or Atom via feedparser, which also copes with entities, CDATA and odd encodings."""
    import feedparser

    parsed = feedparser.parse(content, response_headers={"content-location": base} if base else None)
    # feedparser flags harmless oddities (a missing or generic Content-Type, an encoding it overrode) the
    # same way as broken XML; only the latter is worth reporting.
    if parsed.bozo and isinstance(parsed.get("bozo_exception"), feedparser.ThingsNobodyCaresAboutButMe):
        parsed["bozo"] = False
    if parsed.bozo and not parsed.entries:
        report.problems.append(f"the feed could not be read: {parsed.get('bozo_exception', 'malformed')}")
        return
    if parsed.bozo:
        report.problems.append(f"the feed is not well-formed ({parsed.get('bozo_exception')}); "
                               "the readable items were imported")
    if not parsed.entries:
        report.problems.append("the feed has no items")
    feed_title = parsed.feed.get("title", "")
    feed_link = parsed.feed.get("link") or base
    for entry in parsed.entries:
        media = entry.get("media_content") or entry.get("media_thumbnail") or []
        yield Incoming(
            url=clean_url(entry.get("link"), feed_link) or str(entry.get("link") or ""),
            title=entry.get("title", ""),
            source=entry.get("source", {}).get("title", "") if isinstance(entry.get("source"), dict) else feed_title,
            author=entry.get("author", ""),
            published_at=parse_time(entry.get("published_parsed") or entry.get("updated_parsed")),
            summary=entry.get("summary", ""),
            image_url=media[0].get("url") if media and isinstance(media[0], dict) else None,
            categories=tuple(t.get("term", "") for t in entry.get("tags", []) if t.get("term")),
        )


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def read_source(content: bytes, report: Report, *, base: str | None = None) -> Iterator[Incoming]:
    """JSON (a feed or a list) or XML (RSS/Atom), told apart by the first character."""
    if len(content) > MAX_FEED_BYTES:
        report.problems.append(f"the source is larger than {MAX_FEED_BYTES // 1_000_000} MB and was not read")
        return iter(())
    head = content.lstrip()[:1]
    if head in {b"{", b"["}:
        try:
            data = json.loads(content)
        except (ValueError, RecursionError) as error:
            report.problems.append(f"the JSON could not be read: {error}")
            return iter(())
        return from_json(data, report)
    return from_feed(content, report, base=base)


_HTTP = re.compile(r"^https?://", re.I)


def is_url(location: str) -> bool:
    return bool(_HTTP.match(location))
