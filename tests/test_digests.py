"""Articles in, category digests out, with a real SMTP server."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from mailer import campaigns, digest, digests, queue
from mailer.db import session_scope
from mailer.models import Article, Delivery, DigestContent, Frequency, utcnow
from tests.campaign_helpers import wait_until
from tests.conftest import SmtpSink, make_readers


def add(admin: TestClient, *items: dict[str, object]) -> dict[str, object]:
    response = admin.post("/api/articles", json=list(items))
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def article(n: int, *categories: str, title: str | None = None) -> dict[str, object]:
    return {"url": f"https://news.example.org/a/{n}", "title": title or f"Talks resume, day {n}",
            "source": "falmouthpacket.co.uk", "summary": f"<p>Envoys met for round {n}.</p>",
            "categories": list(categories)}


def test_grouping_is_pure_and_stable() -> None:
    """Each article once, under the first of the reader's categories in site order; newest first; N per section."""
    now = utcnow()
    refs = [digest.ArticleRef(i, now - timedelta(minutes=i), frozenset(cats)) for i, cats in
            [(1, {2, 1}), (2, {2}), (3, {3}), (4, set()), *[(10 + i, {1}) for i in range(12)]]]
    sections = digest.build(chosen=[2, 1], category_order=[1, 2, 3], articles=refs, received={2})
    assert [s.category_id for s in sections] == [1]
    assert sections[0].article_ids[0] == 1
    assert len(sections[0].article_ids) == 10
    assert len(sections[0].more) == 3
    everything = digest.build(chosen=[], category_order=[1, 2, 3], articles=refs, received=set())
    assert [s.category_id for s in everything] == [1, 2, 3, digest.UNCATEGORISED]
    assert digest.build(chosen=[3], category_order=[1, 2, 3], articles=refs, received={3}) == []


def test_articles_are_updated_not_duplicated_and_sanitised(admin: TestClient) -> None:
    """The same URL again updates the article; scripts, bad links and odd category spellings are handled."""
    first = add(admin, {**article(1, "U.S.–Russia Relations"), "title": "<script>alert(1)</script>Summit"})
    assert (first["new"], first["updated"]) == (1, 0)
    second = add(admin, {**article(1, "US-Russia relations"), "title": "Summit, updated",
                         "summary": "<p onclick='x()'>Hi <a href='javascript:alert(1)'>x</a>"
                                    "<a href='https://ok.example/'>ok</a><script>bad()</script></p>"},
                 {"url": "javascript:alert(1)", "title": "bad"})
    assert (second["new"], second["updated"], len(second["skipped"])) == (0, 1, 1)
    empty = admin.post("/api/articles", json={"url": "https://news.example.org/b", "title": ""})
    assert empty.status_code == 422
    assert "title" in empty.json()["detail"]
    with session_scope() as session:
        stored = session.scalars(select(Article)).one()
        assert stored.title == "Summit, updated"
        assert [c.slug for c in stored.categories] == ["us-russia-relations"]
        assert "script" not in stored.summary
        assert "onclick" not in stored.summary
        assert "javascript" not in stored.summary
        assert 'href="https://ok.example/"' in stored.summary


def test_digest_groups_sends_once_and_never_repeats(admin: TestClient, smtp: SmtpSink) -> None:
    """Readers get their categories' new articles once, across categories and runs; nothing new, no mail."""
    make_readers(2, prefix="russia", categories=("us-russia-relations",))
    make_readers(1, prefix="all")
    make_readers(1, prefix="nato", categories=("us-nato-relations",))
    with session_scope() as session:
        session.execute(update(Article).values(ingested_at=utcnow()))
    add(admin, article(1, "U.S.–Russia Relations", "U.S.–NATO Relations"), article(2, "U.S.–Russia Relations"),
        {**article(3, "Peace & Diplomacy"), "title": "<script>alert('x')</script> Ceasefire"})
    result = admin.post("/api/digests/run", json={"frequency": "daily"}).json()
    assert result["readers"] == 4
    done = wait_until(admin, result["campaign_id"])
    assert done["counts"]["sent"] == 4
    mails = {m.recipients[0]: m for m in smtp.wait_for(4)}
    russia = mails["russia0@example.org"]
    assert russia.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    text = russia.part("plain")
    assert text.count("Talks resume, day 1") == 1
    assert "Talks resume, day 2" in text
    assert "Ceasefire" not in text
    everything = mails["all0@example.org"].part("html")
    assert "&lt;script&gt;" in everything
    assert "<script>" not in everything
    assert everything.count("Talks resume, day 1") == 1
    assert "Talks resume, day 2" not in mails["nato0@example.org"].part("plain")

    # The same period again changes nothing; a new article goes out next time, alone.
    again = admin.post("/api/digests/run", json={"frequency": "daily"}).json()
    assert (again["campaign_id"], again["started"]) == (result["campaign_id"], False)
    add(admin, article(4, "U.S.–Russia Relations"))
    second = digests.run(Frequency.daily, now=utcnow() + timedelta(days=1))
    assert second.readers == 3
    wait_until(admin, second.campaign_id)
    later = [m for m in smtp.wait_for(7)[4:]]
    for mail in later:
        body = mail.part("plain")
        assert "day 4" in body
        assert "day 1" not in body
        assert "day 2" not in body
    assert "nato0@example.org" not in {m.recipients[0] for m in later}
    with session_scope() as session:
        entries = session.execute(select(Delivery.subscriber_id, DigestContent.sections)
                                  .join(DigestContent, DigestContent.id == Delivery.content_id)).all()
        # One entry per digest: four in the first run, three in the second (the NATO reader had nothing new).
        assert len(entries) == 7
        got = [a for reader, sections in entries if reader == entries[0][0] for s in sections for a in s[1]]
        assert len(got) == len(set(got)), "an article went to one reader twice"
        # Readers who share a digest share its content: the run's ledger holds each distinct one once.
        assert session.scalar(select(func.count()).select_from(DigestContent)) < 7


def test_a_run_that_failed_halfway_is_finished_without_repeats(admin: TestClient, smtp: SmtpSink,
                                                              env: Callable[..., None]) -> None:
    """Materialisation that stops between reader batches is completed by running again; nobody twice."""
    make_readers(5, prefix="r")
    add(admin, article(1, "Peace & Diplomacy"))
    original = digests.READER_BATCH
    digests.READER_BATCH = 2
    calls = {"n": 0}
    real = digests._materialise

    def crash_on_second(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker died")
        return real(*args, **kwargs)

    digests._materialise = crash_on_second  # type: ignore[assignment]
    try:
        with pytest.raises(RuntimeError):
            digests.run(Frequency.daily)
    finally:
        digests._materialise = real  # type: ignore[assignment]
    # An article that arrives between the stop and the second try belongs to the next period, for every
    # reader: those added before the stop as much as the others.
    add(admin, article(2, "Peace & Diplomacy"))
    try:
        result = digests.run(Frequency.daily)
    finally:
        digests.READER_BATCH = original
    assert result.started
    wait_until(admin, result.campaign_id)
    counts: dict[str, int] = {}
    for mail in smtp.wait_for(5):
        counts[mail.recipients[0]] = counts.get(mail.recipients[0], 0) + 1
        assert "day 1" in mail.part("plain")
        assert "day 2" not in mail.part("plain")
    assert counts == {f"r{i}@example.org": 1 for i in range(5)}
    following = digests.run(Frequency.daily, now=utcnow() + timedelta(days=1))
    assert following.readers == 5
    wait_until(admin, following.campaign_id)
    later = smtp.wait_for(10)[5:]
    assert sorted(m.recipients[0] for m in later) == [f"r{i}@example.org" for i in range(5)]
    for mail in later:
        assert "day 2" in mail.part("plain")
        assert "day 1" not in mail.part("plain")


def test_a_builder_that_died_before_marking_its_run_keeps_the_cutoff_of_its_first_readers(
        admin: TestClient, smtp: SmtpSink, env: Callable[..., None], monkeypatch: pytest.MonkeyPatch) -> None:
    """Readers committed to a run just before the builder died (the run not yet marked as building) are
    not moved past what came in meanwhile: it reaches them in the next period."""
    make_readers(3, prefix="g")
    add(admin, article(1, "Peace & Diplomacy"))
    real = campaigns.start_building

    def dies(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("builder died")

    monkeypatch.setattr(campaigns, "start_building", dies)
    with pytest.raises(RuntimeError):
        digests.run(Frequency.daily)
    monkeypatch.setattr(campaigns, "start_building", real)
    add(admin, article(2, "Peace & Diplomacy"))
    result = digests.run(Frequency.daily)
    assert result.started
    wait_until(admin, result.campaign_id)
    for mail in smtp.wait_for(3):
        assert "day 1" in mail.part("plain")
        assert "day 2" not in mail.part("plain")
    following = digests.run(Frequency.daily, now=utcnow() + timedelta(days=1))
    assert following.readers == 3
    wait_until(admin, following.campaign_id)
    for mail in smtp.wait_for(6)[3:]:
        assert "day 2" in mail.part("plain")


def test_preview_and_odd_feeds(admin: TestClient, tmp_path: Path) -> None:
    """Feeds with entities, CDATA, no dates, relative links and Latin-1 import; preview records nothing."""
    from mailer import articles

    rss = ('<?xml version="1.0" encoding="ISO-8859-1"?><rss version="2.0"><channel><title>Caf\xe9 news</title>'
           '<link>https://site.example/</link><item><title>Caf\xe9 &amp; talks</title><link>/a/1</link>'
           '<description><![CDATA[<p>Inside <b>CDATA</b><script>x()</script></p>]]></description>'
           '<category>U.S.&#8211;Russia Relations</category></item>'
           '<item><title>No link</title></item></channel></rss>').encode("latin-1")
    report = articles.Report()
    with session_scope() as session:
        articles.ingest(session, articles.read_source(rss, report), report=report)
        stored = session.scalars(select(Article)).one()
        assert stored.url == "https://site.example/a/1"
        assert stored.title == "Café & talks"
        # No date in the feed: the article is dated by when it came in, never by a guess.
        assert stored.published_at is None
        assert [c.slug for c in stored.categories] == ["us-russia-relations"]
        assert "<script>" not in stored.summary
    assert len(report.skipped) == 1
    broken = articles.Report()
    list(articles.read_source(b"<rss><channel><item><title>x</ti", broken))
    assert broken.problems
    make_readers(1, prefix="pv", categories=("us-russia-relations",))
    with session_scope() as session:
        session.execute(update(Article).values(ingested_at=utcnow()))
    shown = admin.get("/api/digests/preview", params={"email": "pv0@example.org"}).json()
    assert "Caf&#233; &amp; talks" in shown["html"]
    assert shown["subject"].endswith("Café & talks")
    ingested = digests.local(utcnow()).strftime("%b %-d")
    assert f"Café news, {ingested}" in shown["text"]
    with session_scope() as session:
        assert session.scalars(select(DigestContent)).all() == []
        assert session.scalars(select(Delivery)).all() == []
    queue.drain()


def test_a_run_still_being_built_is_not_offered_again_but_a_silent_one_is(env: Callable[..., None]) -> None:
    """A run whose builder died is offered again; once a new builder carries it on and commits batches,
    the tick does not start yet another builder for it, however long ago the run began."""
    from mailer.models import Campaign, CampaignKind, CampaignStatus

    env(schedule_digests="true", digest_hour="0")
    now = utcnow()
    with session_scope() as session:
        session.add(Campaign(kind=CampaignKind.digest, subject="Daily digest", html="", text="", categories=[],
                             status=CampaignStatus.sending, status_reason="", total=0, building=True,
                             run_key=digests.run_key(Frequency.daily, now), created_at=now - timedelta(hours=2)))
    assert (Frequency.daily, None) in digests.due(now)
    with session_scope() as session:
        session.execute(update(Campaign).values(built_at=now - timedelta(minutes=1)))
    assert (Frequency.daily, None) not in digests.due(now)


def test_digests_are_due_at_the_hour_in_the_site_time_zone(env: Callable[..., None]) -> None:
    """Daily runs start at MAILER_DIGEST_HOUR local time, weekly ones on the weekday; a made run is not due."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    env(schedule_digests="true", timezone="Asia/Tokyo", digest_hour="7", digest_weekday="0")
    tokyo = ZoneInfo("Asia/Tokyo")
    monday_early = datetime(2026, 11, 30, 6, 59, tzinfo=tokyo)
    monday_seven = datetime(2026, 11, 30, 7, 0, tzinfo=tokyo)
    tuesday = datetime(2026, 12, 1, 9, 0, tzinfo=tokyo)
    assert digests.due(monday_early) == []
    assert digests.due(monday_seven) == [(Frequency.daily, None), (Frequency.weekly, None)]
    assert digests.due(tuesday) == [(Frequency.daily, None)]
    # 23:30 UTC on Sunday is already Monday morning in Tokyo.
    assert digests.run_key(Frequency.daily, datetime(2026, 11, 29, 23, 30, tzinfo=ZoneInfo("UTC"))) == \
        "daily:2026-11-30"
    digests.run(Frequency.daily, now=monday_seven)
    assert digests.due(monday_seven) == [(Frequency.weekly, None)]


def test_readers_get_their_digest_at_the_hour_in_their_own_zone(admin: TestClient, smtp: SmtpSink,
                                                                env: Callable[..., None]) -> None:
    """A reader in Tokyo gets the daily digest at 07:00 Tokyo time, New York readers at 07:00 there."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    env(schedule_digests="true", timezone="America/New_York", digest_hour="7", digest_weekday="6")
    admin.post("/api/subscribers", json={"email": "tokyo@example.org", "confirmed": True, "timezone": "Asia/Tokyo"})
    make_readers(1, prefix="newyork")
    bad = admin.post("/api/subscribers", json={"email": "x@example.org", "confirmed": True, "timezone": "Mars/Base"})
    assert bad.status_code == 422
    tokyo_morning = datetime(2026, 12, 1, 7, 5, tzinfo=ZoneInfo("Asia/Tokyo"))  # 17:05 the day before in New York
    add(admin, article(1, "Peace & Diplomacy"))
    with session_scope() as session:
        session.execute(update(Article).values(ingested_at=tokyo_morning - timedelta(hours=1),
                                               published_at=datetime(2026, 11, 30, 22, 30, tzinfo=ZoneInfo("UTC"))))
    assert digests.due(tokyo_morning) == [(Frequency.daily, None), (Frequency.daily, "Asia/Tokyo")]
    tokyo_only = digests.due(tokyo_morning.replace(hour=7).astimezone(ZoneInfo("America/New_York"))
                             .replace(hour=6))
    assert tokyo_only == [(Frequency.daily, "Asia/Tokyo")]
    # From here the test starts the run itself: the tick must not start one by the real clock's hour.
    env(schedule_digests="false")
    result = digests.run(Frequency.daily, now=tokyo_morning, zone="Asia/Tokyo")
    wait_until(admin, result.campaign_id)
    [mail] = smtp.wait_for(1)
    assert mail.recipients == ["tokyo@example.org"]
    # Dates and times are the reader's own: the run's day in Tokyo (whenever the mail goes out), and
    # 22:30 UTC as 07:30 the next day there.
    assert mail.message["Subject"].startswith("Tuesday, December 1, 2026: ")
    assert "Dec 1, 07:30 JST" in mail.part("plain")
    with session_scope() as session:
        from mailer.models import Campaign

        assert session.get(Campaign, result.campaign_id).subject == \
            "Daily digest, Tuesday, December 1, 2026 (Asia/Tokyo)"


@contextmanager
def feed_server(body: bytes, *, etag: str | None = None, last_modified: str | None = None
                ) -> Iterator[tuple[str, list[str | None]]]:
    """A real HTTP server on loopback that serves one feed with conditional GET: a 304 when the request
    carries the validator it gave. Yields its URL and the validator each request carried."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked = "If-None-Match" if etag else "If-Modified-Since"
    validator = etag or last_modified
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get(asked))
            if validator is not None and self.headers.get(asked) == validator:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            if etag:
                self.send_header("ETag", etag)
                self.send_header("Content-Type", "application/rss+xml")
            if last_modified:
                self.send_header("Last-Modified", last_modified)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()


def test_feed_polling_uses_conditional_get(admin: TestClient, env: Callable[..., None]) -> None:
    """A polled feed is imported once; the next poll sends If-None-Match and gets a 304."""
    from mailer import feeds

    body = (b'<?xml version="1.0"?><rss version="2.0"><channel><title>Packet</title>'
            b"<item><title>Envoys meet</title><link>https://news.example.org/p/1</link></item></channel></rss>")
    with feed_server(body, etag='"v1"') as (base, seen):
        url = f"{base}/feed.xml"
        env(feeds=url, feed_poll_minutes="0.0001")
        assert feeds.poll_due() == 1
        import time

        time.sleep(0.05)
        assert feeds.poll_due() == 1
        assert seen == [None, '"v1"']
        with session_scope() as session:
            assert [a.title for a in session.scalars(select(Article))] == ["Envoys meet"]
            from mailer.models import Feed

            assert session.get(Feed, url).status == "not modified"


def test_feeds_are_managed_through_the_api(admin: TestClient, env: Callable[..., None]) -> None:
    """Admins add and remove polled feeds; MAILER_FEEDS ones are listed as configured; bad input is a 4xx."""
    env(feeds="https://wire.example/rss")
    assert admin.post("/api/feeds", json={"url": "ftp://x.example/feed"}).status_code == 422
    assert admin.post("/api/feeds", json={"url": "https://packet.example/feed.xml"}).status_code == 201
    listed = {f["url"]: f["configured"] for f in admin.get("/api/feeds").json()}
    assert listed == {"https://wire.example/rss": True, "https://packet.example/feed.xml": False}
    assert admin.delete("/api/feeds", params={"url": "https://nowhere.example/"}).status_code == 404
    assert admin.delete("/api/feeds", params={"url": "https://packet.example/feed.xml"}).status_code == 204
    assert [f["url"] for f in admin.get("/api/feeds").json()] == ["https://wire.example/rss"]


def test_an_article_still_being_imported_is_not_skipped(admin: TestClient, smtp: SmtpSink,
                                                        env: Callable[..., None]) -> None:
    """A run leaves out articles ingested in the last MAILER_DIGEST_GRACE_SECONDS, so an import still
    committing cannot fall behind a reader's cursor; the next run carries it."""
    env(digest_grace_seconds="30")
    make_readers(1, prefix="grace")
    add(admin, article(1, "Peace & Diplomacy"))
    first = digests.run(Frequency.daily)
    assert first.readers == 0
    later = digests.run(Frequency.daily, now=utcnow() + timedelta(days=1))
    assert later.readers == 1
    wait_until(admin, later.campaign_id)
    assert "day 1" in smtp.wait_for(1)[0].part("plain")


def test_hostile_inputs_are_reported_not_raised(admin: TestClient) -> None:
    """Odd JSON Feed fields, far dates, long links and bad feed URLs are skipped or refused with a reason."""
    from mailer import articles

    feed = {"items": [{"url": "https://x.example/1", "title": "ok", "authors": {"name": "x"}, "tags": 5},
                      {"url": "https://x.example/" + "a" * 3000, "title": "too long"},
                      {"url": "https://x.example/2", "title": "future", "date_published": "0001-01-01T00:00:00+01:00"}]}
    import json

    report = articles.Report()
    with session_scope() as session:
        articles.ingest(session, articles.read_source(json.dumps(feed).encode(), report), report=report)
    assert (report.new, len(report.skipped)) == (2, 1)
    far = admin.post("/api/articles", json={**article(9), "published_at": "0001-01-01T00:00:00+01:00"})
    assert far.status_code == 201
    assert admin.post("/api/feeds", json={"url": "http://127.0.0.1:abc/x"}).status_code == 422


def test_more_links_lead_to_the_site_and_personal_links_come_out_exact(admin: TestClient, smtp: SmtpSink,
                                                                      env: Callable[..., None]) -> None:
    """"and K more" leads to the site's category page; each reader's own links are exact in headers, HTML and text."""
    import html

    env(site_url="https://www.truthandresistance.example", digest_per_category="2")
    [reader_id] = make_readers(1, prefix="links", categories=("us-russia-relations",))
    add(admin, *[article(n, "U.S.–Russia Relations") for n in range(1, 6)])
    result = admin.post("/api/digests/run", json={"frequency": "daily"}).json()
    wait_until(admin, result["campaign_id"])
    [mail] = smtp.wait_for(1)
    text, body = mail.part("plain"), mail.part("html")
    more = "https://www.truthandresistance.example/category/us-russia-relations"
    assert f"and 3 more: {more}" in text
    assert re.search(f'<a href="{re.escape(more)}"[^>]*>and 3 more in U.S.(–|&#8211;)Russia Relations</a>', body)
    from mailer import tokens

    own = tokens.urls(reader_id)
    header = mail.message["List-Unsubscribe"]
    assert f"<{own['unsubscribe_url']}>" in header
    for url in (own["unsubscribe_url"], own["preferences_url"]):
        assert url in text
        assert f'href="{html.escape(url)}"' in body or f'href="{url}"' in body
    # Nobody else's token, and no marker left behind, in either part.
    assert len(set(re.findall(r"/unsubscribe/[^\s\"<>]+", text + body))) == 1
    assert "\x00" not in text + body


def test_a_returning_reader_does_not_get_the_backlog(admin: TestClient, smtp: SmtpSink, client: TestClient) -> None:
    """A first digest covers one period; a reader who left and confirms again starts afresh, not with the backlog."""
    from mailer.models import Subscriber

    make_readers(1, prefix="back")
    add(admin, article(1, "Peace & Diplomacy"), article(2, "Peace & Diplomacy"))
    with session_scope() as session:
        # Article 1 came in three days ago, before the first window of a daily reader.
        session.execute(update(Article).where(Article.url.endswith("/1"))
                        .values(ingested_at=utcnow() - timedelta(days=3)))
    first = digests.run(Frequency.daily)
    wait_until(admin, first.campaign_id)
    [mail] = smtp.wait_for(1)
    assert "day 2" in mail.part("plain")
    assert "day 1" not in mail.part("plain")
    smtp.clear()
    # The reader leaves for a while; articles pile up; then they sign up and confirm again.
    with session_scope() as session:
        reader = session.scalars(select(Subscriber)).one()
        reader.status = reader.status.__class__.unsubscribed
        email = reader.email
    tomorrow = utcnow() + timedelta(days=1)
    add(admin, article(3, "Peace & Diplomacy"), article(4, "Peace & Diplomacy"))
    with session_scope() as session:
        session.execute(update(Article).where(Article.url.endswith("/3"))
                        .values(ingested_at=tomorrow - timedelta(days=5)))
        session.execute(update(Article).where(Article.url.endswith("/4"))
                        .values(ingested_at=tomorrow - timedelta(hours=2)))
    assert client.post("/subscribe", data={"email": email}).status_code == 200
    queue.drain()
    [confirmation] = smtp.wait_for(1)
    link = re.search(r"https://news\.example\.org(/confirm/[^\s]+)", confirmation.part("plain"))
    assert link is not None
    assert client.post(link.group(1)).status_code == 200
    queue.drain()
    smtp.clear()
    later = digests.run(Frequency.daily, now=tomorrow)
    wait_until(admin, later.campaign_id)
    [mail] = smtp.wait_for(1)
    assert "day 4" in mail.part("plain")
    assert "day 3" not in mail.part("plain")


def test_cli_imports_a_feed_and_previews_a_digest(tmp_path: Path, env: Callable[..., None], backend: str,
                                                  smtp: SmtpSink) -> None:
    """`mailer articles import` reports new, updated, skipped and what was wrong; `mailer preview` records nothing."""
    import os
    import subprocess
    import sys

    from tests.conftest import base_env

    settings = base_env(backend, smtp.port, tmp_path / "outbox")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}

    def mailer(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailer.cli", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=False, env={**clean, **settings, **extra})

    (tmp_path / "feed.xml").write_bytes(
        b'<?xml version="1.0"?><rss version="2.0"><channel><title>Packet</title><link>https://p.example/</link>'
        b"<item><title>Envoys meet &amp; talk</title><link>/a/1</link><category>Mars Affairs</category></item>"
        b"<item><title>Ceasefire holds</title><link>https://p.example/a/2</link>"
        b"<category>US-Russia relations</category></item>"
        b"<item><title>No link at all</title></item><item><title>broken")
    first = mailer("articles", "import", "feed.xml")
    assert first.returncode == 0, first.stderr
    assert "not well-formed" in first.stdout
    assert "2 new, 0 updated, 2 skipped" in first.stdout.replace("\n", " ")
    assert "skipped 'No link at all': no http(s) link" in first.stdout
    created = mailer("articles", "import", "feed.xml", "--create-categories")
    assert "0 new, 2 updated" in created.stdout.replace("\n", " ")
    with session_scope() as session:
        from mailer.models import Category

        assert session.scalars(select(Category).where(Category.name == "Mars Affairs")).one()
    (tmp_path / "empty.json").write_text("[]")
    empty = mailer("articles", "import", "empty.json")
    assert "the list has no articles" in empty.stdout
    (tmp_path / "huge.xml").write_bytes(b"<rss>" + b" " * (21_000_000))
    huge = mailer("articles", "import", "huge.xml")
    assert "larger than 20 MB" in huge.stdout
    missing = mailer("articles", "import", "nowhere.xml")
    assert missing.returncode == 1
    assert "cannot read nowhere.xml" in missing.stderr
    make_readers(1, prefix="cli", categories=("us-russia-relations",))
    shown = mailer("preview", "--email", "cli0@example.org")
    assert shown.returncode == 0, shown.stderr
    assert "Ceasefire holds" in shown.stdout
    assert "Envoys meet" not in shown.stdout
    out = mailer("preview", "--email", "cli0@example.org", "--out", "next.html")
    assert "Ceasefire holds" in (tmp_path / "next.html").read_text()
    assert out.returncode == 0
    nobody = mailer("preview", "--email", "not an address")
    assert nobody.returncode == 1
    assert nobody.stderr.startswith("Error: email:")
    assert "Traceback" not in first.stderr + shown.stderr + nobody.stderr + missing.stderr + huge.stderr
    with session_scope() as session:
        assert session.scalars(select(DigestContent)).all() == []
        assert session.scalars(select(Delivery)).all() == []


def test_feed_polling_honours_last_modified_and_reports_an_empty_feed(env: Callable[..., None]) -> None:
    """A feed without an ETag is asked If-Modified-Since; a feed with no items says so in its status."""
    from mailer import feeds

    stamp = "Tue, 01 Dec 2026 06:00:00 GMT"
    quiet = b'<?xml version="1.0"?><rss version="2.0"><channel><title>Quiet</title></channel></rss>'
    with feed_server(quiet, last_modified=stamp) as (base, seen):
        url = f"{base}/quiet.xml"
        report = feeds.poll(url)
        assert report.problems == ["the feed has no items"]
        assert feeds.poll(url).problems == []
        assert seen == [None, stamp]


def test_a_digest_run_previews_what_each_reader_got(admin: TestClient, smtp: SmtpSink) -> None:
    """A digest run's preview shows the chosen reader's own digest from the ledger; a reader not in it is a 4xx."""
    make_readers(1, prefix="russia", categories=("us-russia-relations",))
    make_readers(1, prefix="nato", categories=("us-nato-relations",))
    make_readers(1, prefix="idle", categories=("petitions-and-actions",))
    add(admin, article(1, "U.S.–Russia Relations"), article(2, "U.S.–NATO Relations"))
    result = admin.post("/api/digests/run", json={"frequency": "daily"}).json()
    wait_until(admin, result["campaign_id"])
    preview = f"/api/campaigns/{result['campaign_id']}/preview"
    russia = admin.get(preview, params={"email": "russia0@example.org"}).json()
    assert "day 1" in russia["text"]
    assert "day 2" not in russia["text"]
    assert russia["to"] == "russia0@example.org"
    nato = admin.get(preview, params={"email": "nato0@example.org"}).json()
    assert "day 2" in nato["text"]
    assert "day 1" not in nato["text"]
    idle = admin.get(preview, params={"email": "idle0@example.org"})
    assert idle.status_code == 422
    assert "no digest in this run" in idle.text
    listed = admin.get("/api/campaigns").json()
    assert any(c["subject"].startswith("Daily digest, ") for c in (listed["campaigns"] if isinstance(listed, dict)
                                                                   else listed))


def test_a_period_with_nothing_new_is_done_and_its_articles_go_next_time(admin: TestClient, smtp: SmtpSink) -> None:
    """A run that found nothing finishes saying so; running the period again adds nobody; the next period
    carries what came in meanwhile, once."""
    make_readers(1, prefix="noon")
    morning = digests.run(Frequency.daily)
    assert morning.readers == 0
    assert admin.get(f"/api/campaigns/{morning.campaign_id}").json()["status_reason"] == "Nobody had anything new."
    add(admin, article(1, "Peace & Diplomacy"))
    noon = digests.run(Frequency.daily)
    assert (noon.campaign_id, noon.readers, noon.started) == (morning.campaign_id, 0, False)
    tomorrow = digests.run(Frequency.daily, now=utcnow() + timedelta(days=1))
    assert tomorrow.readers == 1
    wait_until(admin, tomorrow.campaign_id)
    [mail] = smtp.wait_for(1)
    assert "day 1" in mail.part("plain")
