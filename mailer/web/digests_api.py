"""Admin API for articles and digests."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from mailer import articles, digests, feeds
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.models import Frequency
from mailer.web.api import require_admin

router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], tags=["articles and digests"])


class ArticleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2000, description="The canonical http(s) URL; sent again, it updates.")
    title: str = Field(min_length=1, max_length=2000)
    source: str = Field(default="", max_length=200)
    author: str = Field(default="", max_length=200)
    published_at: datetime | None = None
    summary: str = Field(default="", max_length=100_000, description="HTML; sanitised with an allow-list.")
    image_url: str | None = Field(default=None, max_length=2000)
    categories: list[str] = Field(default=[], max_length=50, description="Category names or slugs.")


class ImportReport(BaseModel):
    new: int
    updated: int
    skipped: list[dict[str, str]]


class DigestRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    frequency: Frequency


class ZoneRunOut(BaseModel):
    campaign_id: int | None
    readers: int
    started: bool
    zone: str | None = Field(default=None, description="The readers' time zone; null for the site's.")


class DigestRunOut(ZoneRunOut):
    """The site's zone's run first; `runs` holds one per time zone that readers chose."""

    runs: list[ZoneRunOut]


class PreviewOut(BaseModel):
    subject: str
    text: str
    html: str


@router.post("/articles", status_code=201)
def add_articles(body: ArticleIn | list[ArticleIn], create_categories: bool | None = None) -> ImportReport:
    items = body if isinstance(body, list) else [body]
    with session_scope() as session:
        report = articles.ingest(session, [articles.Incoming(
            url=item.url, title=item.title, source=item.source, author=item.author,
            published_at=articles.parse_time(item.published_at), summary=item.summary, image_url=item.image_url,
            categories=tuple(item.categories)) for item in items],
            create_categories=get_settings().create_categories if create_categories is None else create_categories)
    return ImportReport(new=report.new, updated=report.updated,
                        skipped=[{"item": what, "reason": why} for what, why in report.skipped])


@router.post("/digests/run", status_code=202)
def run_digest(body: DigestRunIn) -> DigestRunOut:
    results = digests.run_all(body.frequency)
    site = next((r.campaign_id for r in results if r.zone is None), None)
    runs = [ZoneRunOut(campaign_id=r.campaign_id, readers=r.readers, started=r.started, zone=r.zone)
            for r in results]
    return DigestRunOut(campaign_id=site, readers=sum(r.readers for r in runs),
                        started=any(r.started for r in runs), runs=runs)


@router.get("/digests/preview")
def preview(email: Annotated[str, Query(max_length=320)]) -> PreviewOut | None:
    """A reader's next digest, rendered for them; null when they have nothing new."""
    rendered = digests.preview(email)
    if rendered is None:
        return None
    return PreviewOut(subject=rendered.subject, text=rendered.text, html=rendered.html)


class FeedIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2000, description="An http(s) RSS, Atom or JSON Feed URL.")


class FeedOut(BaseModel):
    url: str
    polled_at: datetime | None
    status: str
    configured: bool = Field(description="True when it comes from MAILER_FEEDS rather than the API.")


@router.get("/feeds")
def list_feeds() -> list[FeedOut]:
    with session_scope() as session:
        return [FeedOut(url=f.url, polled_at=f.polled_at, status=f.status, configured=configured)
                for f, configured in feeds.all_feeds(session)]


@router.post("/feeds", status_code=201)
def add_feed(body: FeedIn) -> FeedOut:
    with session_scope() as session:
        feed = feeds.add(session, body.url)
        return FeedOut(url=feed.url, polled_at=feed.polled_at, status=feed.status, configured=False)


@router.delete("/feeds", status_code=204)
def remove_feed(url: Annotated[str, Query(max_length=2000)]) -> None:
    with session_scope() as session:
        feeds.remove(session, url)
