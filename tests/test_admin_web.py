"""The admin console's pages over HTTP: sign-in, lock-out, CSRF, and each page doing its job."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from mailer import admins, queue
from mailer.db import session_scope
from mailer.web.app import create_app
from tests.conftest import ADMIN_TOKEN, SmtpSink, make_readers, subscriber_row

EMAIL, PASSWORD = "editor@news.example.org", "correct horse battery"


def make_admin() -> None:
    with session_scope() as session:
        admins.create(session, email=EMAIL, password=PASSWORD)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "the page has a form with a CSRF token"
    return found.group(1)


def sign_in(browser: TestClient, email: str = EMAIL, password: str = PASSWORD, *, follow_redirects: bool = True,
            **fields: str) -> httpx.Response:
    """Sign in as a browser does: fetch the form (and its pre-session cookie), then post it with its token."""
    token = csrf_of(browser.get("/admin/login").text)
    return browser.post("/admin/login", data={"email": email, "password": password, "csrf_token": token, **fields},
                        follow_redirects=follow_redirects)


@pytest.fixture
def console(env: Callable[..., None]) -> Iterator[TestClient]:
    """A browser signed in to the console."""
    make_admin()
    with TestClient(create_app(), base_url="https://news.example.org") as browser:
        signed = sign_in(browser, next="/admin", follow_redirects=False)
        assert signed.status_code == 303
        yield browser


def test_console_needs_sign_in_and_locks_out_after_wrong_passwords(client: TestClient) -> None:
    """Pages redirect to sign-in; wrong passwords block that account from that address only, with one
    answer for every refusal, and many more from anywhere lock the account."""
    make_admin()
    away = client.get("/admin/subscribers", follow_redirects=False)
    assert away.status_code == 303
    assert away.headers["location"] == "/admin/login?next=/admin/subscribers"
    unknown = sign_in(client, "nobody@example.org", "x" * 12)
    assert unknown.status_code == 401
    refusal = "Those details did not work."
    assert refusal in unknown.text
    for _ in range(5):
        wrong = sign_in(client, EMAIL, "wrong password")
        assert wrong.status_code == 401
        assert refusal in wrong.text
    blocked = sign_in(client)
    assert blocked.status_code == 401
    assert refusal in blocked.text, "the same words as a wrong password: nothing says the account exists"
    assert "mailer_admin" not in client.cookies
    # The admin at another address is not locked out by a stranger's guesses.
    with TestClient(create_app(), base_url="https://news.example.org", client=("203.0.113.7", 4000)) as elsewhere:
        assert sign_in(elsewhere).status_code == 200
        assert "mailer_admin" in elsewhere.cookies
    # Many failures from many addresses lock the account itself, for everyone.
    for n in range(admins.MAX_FAILURES):
        with TestClient(create_app(), base_url="https://news.example.org", client=(f"198.51.100.{n}", 4000)) as guesser:
            sign_in(guesser, EMAIL, "wrong password")
    with TestClient(create_app(), base_url="https://news.example.org", client=("203.0.113.8", 4000)) as owner:
        assert sign_in(owner).status_code == 401


def test_sign_in_sets_a_guarded_cookie_and_an_open_redirect_is_refused(client: TestClient) -> None:
    """The session cookie is HttpOnly, SameSite and Secure on https; `next` only leads inside /admin."""
    make_admin()
    signed = sign_in(client, EMAIL.upper(), next="//evil.example/admin", follow_redirects=False)
    assert signed.status_code == 303
    assert signed.headers["location"] == "/admin"
    cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("mailer_admin=")).lower()
    assert "httponly" in cookie
    assert "samesite=lax" in cookie
    assert "secure" in cookie
    assert client.get("/admin").status_code == 200


def test_sign_in_without_the_form_token_is_refused_and_counts_nothing(client: TestClient) -> None:
    """A sign-in POST without the form's token, or with a token made for another browser's cookie (login CSRF),
    gets a 400 page with a sentence, signs nobody in and counts no failure."""
    make_admin()
    with TestClient(create_app(), base_url="https://news.example.org", client=("203.0.113.9", 4000)) as attacker:
        foreign = csrf_of(attacker.get("/admin/login").text)
    refusals = [client.post("/admin/login", data={"email": EMAIL, "password": PASSWORD}, follow_redirects=False),
                client.post("/admin/login", data={"email": EMAIL, "password": PASSWORD, "csrf_token": foreign},
                            follow_redirects=False)]
    client.get("/admin/login")
    refusals.append(client.post("/admin/login", data={"email": EMAIL, "password": PASSWORD, "csrf_token": foreign},
                                follow_redirects=False))
    # More forged attempts with a wrong password than the lock-out allows: none of them may count.
    for _ in range(admins.MAX_FAILURES + 1):
        refusals.append(client.post("/admin/login", data={"email": EMAIL, "password": "wrong password",
                                                          "csrf_token": "garbage"}, follow_redirects=False))
    for refused in refusals:
        assert refused.status_code == 400
        assert "did not come from this site" in refused.text
        assert "mailer_admin" not in refused.headers.get("set-cookie", "")
    assert "mailer_admin" not in client.cookies
    assert client.get("/admin", follow_redirects=False).status_code == 303
    # The refusal page carries a good form: the real admin signs in from it at once, unhindered.
    token = csrf_of(refusals[-1].text)
    signed = client.post("/admin/login", data={"email": EMAIL, "password": PASSWORD, "csrf_token": token},
                         follow_redirects=False)
    assert signed.status_code == 303
    assert client.get("/admin").status_code == 200


def test_forms_without_the_csrf_token_change_nothing(console: TestClient) -> None:
    """A POST without the session's CSRF token (a forged cross-site form) is refused and changes nothing."""
    forged = console.post("/admin/suppressions", data={"email": "victim@example.org", "reason": "forged"})
    assert forged.status_code == 400
    assert "expired" in forged.text
    page = console.get("/admin/suppressions")
    assert "victim@example.org" not in page.text
    token = csrf_of(page.text)
    added = console.post("/admin/suppressions", data={"email": "victim@example.org", "reason": "asked",
                                                      "csrf_token": token})
    assert added.status_code == 200
    assert "victim@example.org is suppressed." in added.text
    assert "victim@example.org" in console.get("/admin/suppressions").text
    signed_out = console.post("/admin/logout", data={"csrf_token": token}, follow_redirects=False)
    assert signed_out.status_code == 303
    assert console.get("/admin", follow_redirects=False).status_code == 303


def test_dashboard_and_subscriber_pages(console: TestClient) -> None:
    """The dashboard counts readers; a subscriber can be found, edited and erased from their page."""
    make_readers(3, categories=("us-russia-relations",))
    dashboard = console.get("/admin")
    assert dashboard.status_code == 200
    assert "<svg" in dashboard.text
    assert re.search(r"Confirmed</span><b>3</b>", dashboard.text)
    found = console.get("/admin/subscribers", params={"q": "reader1@"})
    assert "reader1@example.org" in found.text
    assert "reader2@example.org" not in found.text
    reader = subscriber_row("reader1@example.org")
    assert reader is not None
    page = console.get(f"/admin/subscribers/{reader.id}")
    token = csrf_of(page.text)
    no_reason = console.post(f"/admin/subscribers/{reader.id}", data={"csrf_token": token, "action": "erase"})
    assert "Say why" in no_reason.text
    erased = console.post(f"/admin/subscribers/{reader.id}",
                          data={"csrf_token": token, "action": "erase", "reason": "asked by phone"})
    assert "Erased" in erased.text
    assert subscriber_row("reader1@example.org") is None
    assert console.get("/admin/subscribers/999999").status_code == 404


def test_import_page_dry_run_then_import(console: TestClient) -> None:
    """The import page takes a CSV, shows the dry run's report with the bad rows, then imports on request."""
    token = csrf_of(console.get("/admin/import").text)
    content = b"email,name\nann@example.org,Ann\nbroken,Bad\n"
    uploaded = console.post("/admin/import", data={"csrf_token": token, "dry_run": "true"},
                            files={"file": ("people.csv", content, "text/csv")})
    queue.drain()
    job_page = console.get(str(uploaded.url.path))
    assert "Dry run of people.csv" in job_page.text
    assert "Import these rows" in job_page.text
    assert "broken" in job_page.text
    run = console.post(f"{uploaded.url.path}/run", data={"csrf_token": token})
    queue.drain()
    assert run.status_code == 200
    assert subscriber_row("ann@example.org") is not None
    assert "Import of people.csv" in console.get(str(uploaded.url.path)).text


def test_campaign_pages_write_preview_test_and_send(console: TestClient, smtp: SmtpSink) -> None:
    """An admin writes a Markdown campaign, previews it as a reader, sends a test, sends it and reads the log."""
    make_readers(2)
    token = csrf_of(console.get("/admin/campaigns/new").text)
    bad = console.post("/admin/campaigns/new", data={"csrf_token": token, "subject": "", "body": "x",
                                                     "format": "markdown"})
    assert bad.status_code == 422
    assert "subject" in bad.text.lower()
    created = console.post("/admin/campaigns/new", data={
        "csrf_token": token, "subject": "Sign the petition, {{ name }}", "format": "markdown",
        "body": "# Talks, not tanks\n\nDear {{ name }}, [sign here](https://example.org/p).\n\n"
                "[Leave]({{ unsubscribe_url }})"})
    assert created.status_code == 200
    path = created.url.path
    preview = console.get(path, params={"reader": "reader0@example.org"})
    assert "Sign the petition, Reader 0" in preview.text
    assert "/unsubscribe/" in preview.text
    frame = console.get(f"{path}/preview", params={"reader": "reader0@example.org"})
    assert "Talks, not tanks</h1>" in frame.text
    assert "sandbox" in frame.headers["content-security-policy"]
    tested = console.post(f"{path}/test", data={"csrf_token": token, "emails": "editor@example.org"})
    assert "editor@example.org: sent" in tested.text
    sent = console.post(f"{path}/action", data={"csrf_token": token, "do": "send"})
    assert sent.status_code == 200
    queue.drain()
    progress = console.get(f"{path}/progress").json()
    assert progress["counts"]["sent"] == 2
    log = console.get(f"{path}/deliveries", params={"q": "reader1"})
    assert "reader1@example.org" in log.text
    assert "reader0@example.org" not in log.text
    assert console.get("/admin/campaigns").status_code == 200


def test_outbox_shows_what_readers_get(env: Callable[..., None]) -> None:
    """With no SMTP server, the dev inbox lists the outbox's mail and shows its parts."""
    env(smtp_url="")
    make_admin()
    with TestClient(create_app(), base_url="https://news.example.org") as browser:
        sign_in(browser)
        browser.post("/subscribe", data={"email": "newcomer@example.org", "name": "New"})
        queue.drain()
        listing = browser.get("/admin/outbox")
        assert "newcomer@example.org" in listing.text
        key = re.search(r'href="/admin/outbox/([^"]+)"', listing.text)
        assert key
        shown = browser.get(f"/admin/outbox/{key.group(1)}")
        assert "Please confirm your subscription" in shown.text
        assert "https://news.example.org/confirm/" in shown.text
        html = browser.get(f"/admin/outbox/{key.group(1)}/html")
        assert "sandbox" in html.headers["content-security-policy"]
        assert "/confirm/" in html.text
        assert browser.get("/admin/outbox/..%2Fsecret").status_code == 404


def test_inbound_pages_list_what_came_back_and_show_it_raw(console: TestClient) -> None:
    """Mail nobody could classify is listed for an admin, who reads it exactly as it arrived."""
    from mailer import inbound

    raw = (b"From: Someone <someone@example.net>\r\nTo: bounces@news.example.org\r\nSubject: Quick question\r\n"
           b"\r\nCan you send me <b>last week's</b> digest again?\r\n")
    inbound_id = inbound.receive(channel="smtp", raw=raw, mail_from="someone@example.net",
                                 rcpt_to=["bounces@news.example.org"])
    queue.drain()
    listing = console.get("/admin/inbound", params={"kind": "unclassified"})
    assert "Quick question" in listing.text
    shown = console.get(f"/admin/inbound/{inbound_id}")
    assert "Can you send me &lt;b&gt;last week&#39;s&lt;/b&gt; digest again?" in shown.text
    assert console.get("/admin/inbound/987654").status_code == 404


def test_campaign_counts_bounces_complaints_and_unsubscribes_that_came_back(console: TestClient) -> None:
    """The campaign's line counts the bounce and the complaint that named it, and the reader who left after it."""
    from mailer import subscriptions
    from mailer.subscriptions import Origin
    from tests.inbound_helpers import sample, sent_campaign, take_in

    bounced, complained, leaver, stayer = sent_campaign(4)
    take_in(sample("postfix_user_unknown", **bounced.values()), rcpt_to=[bounced.return_path])
    take_in(sample("yahoo_arf", **complained.values()), rcpt_to=[complained.return_path])
    with session_scope() as session:
        subscriptions.unsubscribe(session, subscriber_id=leaver.subscriber_id, origin=Origin(channel="one-click"))
    [line] = [c for c in console.get("/api/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()[
        "campaigns"] if c["id"] == bounced.campaign_id]
    assert (line["counts"]["sent"], line["bounced"], line["complained"], line["unsubscribed"]) == (4, 1, 1, 1)
    page = console.get(f"/admin/campaigns/{bounced.campaign_id}")
    assert "Bounced later: 1 · complaints: 1 · unsubscribed after it: 1" in page.text
    assert stayer.email not in page.text


def test_console_pages_are_not_cached_framed_or_spoofed(console: TestClient) -> None:
    """Console pages say no-store and same-origin framing; a note in a link shows only if we signed it."""
    page = console.get("/admin", params={"note": "Your session expired: sign in again at evil.example"})
    assert "evil.example" not in page.text
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "SAMEORIGIN"
    token = csrf_of(console.get("/admin/suppressions").text)
    added = console.post("/admin/suppressions", data={"email": "noted@example.org", "reason": "test",
                                                      "csrf_token": token})
    assert "noted@example.org is suppressed." in added.text


def test_search_takes_percent_and_underscore_as_letters(console: TestClient) -> None:
    """A search for "a_b" finds a_b, not axb: LIKE wildcards in a query are escaped."""
    make_readers(1, prefix="a_b")
    make_readers(1, prefix="axb")
    found = console.get("/admin/subscribers", params={"q": "a_b"}).text
    assert "a_b0@example.org" in found
    assert "axb0@example.org" not in found
    assert "Nobody matches" in console.get("/admin/subscribers", params={"q": "%"}).text


def test_a_draft_can_be_edited_until_it_is_sent(console: TestClient) -> None:
    """An admin fixes a typo in a draft from its page; once sending, an edit is refused with a sentence."""
    make_readers(1)
    token = csrf_of(console.get("/admin/campaigns/new").text)
    created = console.post("/admin/campaigns/new", data={
        "csrf_token": token, "subject": "Petiton", "format": "markdown", "body": "Sign *now*."})
    path = created.url.path
    form = console.get(f"{path}/edit")
    assert 'value="Petiton"' in form.text
    assert "Sign *now*." in form.text
    saved = console.post(f"{path}/edit", data={"csrf_token": token, "subject": "Petition", "format": "markdown",
                                               "body": "Sign **today**."})
    assert "Saved." in saved.text
    assert "Petition" in saved.text
    assert "<strong>today</strong>" in console.get(f"{path}/preview").text
    console.post(f"{path}/action", data={"csrf_token": token, "do": "send"})
    queue.drain()
    late = console.post(f"{path}/edit", data={"csrf_token": token, "subject": "Changed", "format": "markdown",
                                              "body": "x"})
    assert late.status_code == 422
    assert "only a draft or a scheduled campaign can be edited" in late.text
    api = console.patch(f"/api/campaigns/{path.rsplit('/', 1)[1]}", json={"subject": "x", "html": "<p>x</p>"},
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert api.status_code == 409


def test_live_rate_counts_only_the_seconds_a_campaign_has_been_sending(console: TestClient) -> None:
    """Ten seconds into a send, 100 mails sent show as about 10 mails/s with ten seconds left, not a sixth
    of that; after a minute the rate is taken over the last minute only."""
    from datetime import timedelta

    from sqlalchemy import select, update

    from mailer import campaigns
    from mailer.models import Campaign, Delivery, DeliveryState, utcnow

    make_readers(200)
    now = utcnow()
    with session_scope() as session:
        campaign_id = campaigns.create(session, subject="Rate", html="<p>Sign.</p>").id
        # Started in the database, not kicked: the test sets the timestamps a real send would leave.
        campaigns.start(session, campaign_id)
        session.execute(update(Campaign).where(Campaign.id == campaign_id)
                        .values(started_at=now - timedelta(seconds=10)))
        first = session.scalars(select(Delivery.id).where(Delivery.campaign_id == campaign_id)
                                .order_by(Delivery.id).limit(100)).all()
        for n, delivery_id in enumerate(first):
            session.execute(update(Delivery).where(Delivery.id == delivery_id).values(
                state=DeliveryState.sent, sent_at=now - timedelta(seconds=9.5 - n * 0.09)))
    live = console.get(f"/admin/campaigns/{campaign_id}/progress").json()
    assert (live["status"], live["done"], live["total"]) == ("sending", 100, 200)
    assert 9.0 <= live["rate"] <= 10.0, live
    assert 9 <= live["eta_seconds"] <= 12, live
    page = console.get(f"/admin/campaigns/{campaign_id}")
    shown = re.search(r'<span id="rate">([\d.]+)</span> mails/s', page.text)
    assert shown
    assert 9.0 <= float(shown.group(1)) <= 10.0
    with session_scope() as session:
        session.execute(update(Campaign).where(Campaign.id == campaign_id)
                        .values(started_at=now - timedelta(hours=1)))
    later = console.get(f"/admin/campaigns/{campaign_id}/progress").json()
    assert later["rate"] == round(100 / 60, 1)


def trail() -> list[tuple[str, str, str, str]]:
    """The audit trail, oldest first: (actor, action, target, reason)."""
    from sqlalchemy import select

    from mailer.models import AdminAction

    with session_scope() as session:
        return [(a.actor, a.action, a.target, a.reason)
                for a in session.scalars(select(AdminAction).order_by(AdminAction.id))]


def campaign_state(campaign_id: int) -> tuple[str, str, object]:
    from mailer.models import Campaign

    with session_scope() as session:
        found = session.get(Campaign, campaign_id)
        assert found is not None
        return found.status.value, found.status_reason, found.scheduled_at


def test_campaign_page_schedules_cancels_pauses_and_resumes(console: TestClient, smtp: SmtpSink) -> None:
    """The schedule, cancel, pause and resume forms of a campaign page move the campaign in the database
    and write the audit trail; a bad time or an impossible move changes nothing and says why."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from mailer import campaigns
    from mailer.config import get_settings

    make_readers(2)
    with session_scope() as session:
        later = campaigns.create(session, subject="Later", html="<p>Later.</p>").id
        now = campaigns.create(session, subject="Now", html="<p>Now.</p>").id
        # Sending, but with no loop started: the pause form must find it still sending.
        campaigns.start(session, now)
    token = csrf_of(console.get(f"/admin/campaigns/{later}").text)

    def act(campaign_id: int, do: str, **fields: str) -> str:
        response = console.post(f"/admin/campaigns/{campaign_id}/action",
                                data={"csrf_token": token, "do": do, **fields})
        assert response.status_code == 200
        return response.text

    assert "Pick a date and time to send at." in act(later, "schedule", at="soon")
    assert campaign_state(later)[0] == "draft"
    assert trail() == [], "a refused change leaves no line in the audit trail"
    assert "Scheduled." in act(later, "schedule", at="2030-01-01T08:00")
    status, _reason, at = campaign_state(later)
    assert status == "scheduled"
    assert at == datetime(2030, 1, 1, 8, 0, tzinfo=ZoneInfo(get_settings().timezone))
    assert "Cancelled." in act(later, "cancel")
    assert campaign_state(later)[0] == "cancelled"
    assert "it cannot become paused" in act(later, "pause")
    assert campaign_state(later)[0] == "cancelled"

    assert "Paused." in act(now, "pause")
    assert campaign_state(now)[:2] == ("paused", f"Paused by {EMAIL}.")
    assert "Resumed." in act(now, "resume")
    queue.drain()
    assert campaign_state(now)[0] in {"sending", "finished"}
    assert len(smtp.wait_for(2)) == 2, "resuming sends the rest"
    assert trail() == [
        (EMAIL, "campaign-schedule", f"campaign {later}", "2030-01-01T08:00"),
        (EMAIL, "campaign-cancel", f"campaign {later}", ""),
        (EMAIL, "campaign-pause", f"campaign {now}", ""),
        (EMAIL, "campaign-resume", f"campaign {now}", ""),
    ]


def test_subscriber_page_edits_unsubscribes_and_suppresses(console: TestClient) -> None:
    """The subscriber page's edit, unsubscribe and suppress forms change the reader in the database and
    record each change in the consent history and the audit trail; a missing reason changes nothing."""
    from sqlalchemy import select

    from mailer.models import Suppression
    from mailer.subscriptions import hash_email
    from tests.conftest import consent_actions

    [reader_id] = make_readers(1, categories=("us-russia-relations",))
    here = f"/admin/subscribers/{reader_id}"
    token = csrf_of(console.get(here).text)

    def act(action: str, **fields: object) -> str:
        response = console.post(here, data={"csrf_token": token, "action": action, **fields})
        assert response.status_code == 200
        return response.text

    assert "Pick daily or weekly." in act("edit", name="Ann", frequency="hourly")
    assert "Saved." in act("edit", name="Ann Example", frequency="weekly",
                           categories=["peace-and-diplomacy", "us-nato-relations"])
    reader = subscriber_row("reader0@example.org")
    assert reader is not None
    assert (reader.name, reader.frequency.value) == ("Ann Example", "weekly")
    assert sorted(c.slug for c in reader.categories) == ["peace-and-diplomacy", "us-nato-relations"]
    assert consent_actions("reader0@example.org") == ["preferences"]

    assert "Say why" in act("unsubscribe", reason="  ")
    assert subscriber_row("reader0@example.org").status.value == "confirmed"  # type: ignore[union-attr]
    assert "Unsubscribed." in act("unsubscribe", reason="asked by phone")
    assert subscriber_row("reader0@example.org").status.value == "unsubscribed"  # type: ignore[union-attr]
    assert "Suppressed" in act("suppress", reason="spam trap")
    with session_scope() as session:
        entry = session.scalar(select(Suppression).where(Suppression.email_hash == hash_email("reader0@example.org")))
        assert entry is not None
        assert (entry.reason, entry.detail) == ("admin", "spam trap")
    assert consent_actions("reader0@example.org") == ["preferences", "unsubscribe", "suppress"]
    assert trail() == [(EMAIL, "unsubscribe", "reader0@example.org", "asked by phone"),
                       (EMAIL, "suppress", "reader0@example.org", "spam trap")]


def test_console_export_is_a_csv_of_the_chosen_readers(console: TestClient) -> None:
    """The console's export link gives a CSV of the readers with the chosen status, in the columns an
    import takes; it needs a signed-in admin and changes nothing."""
    make_readers(2)
    make_readers(1, prefix="gone", status="unsubscribed")
    exported = console.get("/admin/subscribers/export", params={"status": "confirmed"})
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    header, *rows = exported.text.splitlines()
    assert header.split(",")[:5] == ["email", "name", "categories", "frequency", "status"]
    assert sorted(row.split(",")[0] for row in rows) == ["reader0@example.org", "reader1@example.org"]
    everyone = console.get("/admin/subscribers/export").text
    assert "gone0@example.org" in everyone
    assert trail() == []
    with TestClient(create_app(), base_url="https://news.example.org") as stranger:
        away = stranger.get("/admin/subscribers/export", follow_redirects=False)
        assert away.status_code == 303
        assert "reader0" not in away.text


def test_console_removes_a_suppression_with_a_reason(console: TestClient) -> None:
    """Removing an entry from the suppression list needs a reason; it deletes the entry and the audit
    trail keeps who removed it, why and what the entry said."""
    from sqlalchemy import func, select

    from mailer import suppressions
    from mailer.models import Suppression

    with session_scope() as session:
        suppressions.add(session, email="typo@example.org", reason="typed by mistake", actor="cli")
    page = console.get("/admin/suppressions")
    found = re.search(r'action="/admin/suppressions/(\d+)/remove"', page.text)
    assert found, "each entry has a remove form"
    token = csrf_of(page.text)
    path = f"/admin/suppressions/{found.group(1)}/remove"
    refused = console.post(path, data={"csrf_token": token, "reason": ""})
    assert refused.status_code == 200
    assert "Say why, in a few words" in refused.text

    def entries() -> int:
        with session_scope() as session:
            return int(session.scalar(select(func.count()).select_from(Suppression)) or 0)

    assert entries() == 1
    removed = console.post(path, data={"csrf_token": token, "reason": "the address was mistyped"})
    assert "Removed typo@example.org from the suppression list." in removed.text
    assert entries() == 0
    assert trail()[-1] == (EMAIL, "unsuppress", "typo@example.org",
                           "the address was mistyped (was: admin: typed by mistake)")
