"""The admin console in a real headless Chromium: sign in, write, preview, test and send a campaign,
watch it finish, and look at the main pages at phone and desktop widths (screenshots in test-artifacts/)."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Browser, Page, expect

from mailer import admins
from mailer.db import session_scope
from tests.conftest import ARTIFACTS, SmtpSink, make_readers, subscriber_row

EMAIL, PASSWORD = "editor@news.example.org", "correct horse battery"
PHONE, DESKTOP = (390, 844), (1280, 900)


def sign_in(page: Page, server: str) -> None:
    with session_scope() as session:
        admins.create(session, email=EMAIL, password=PASSWORD)
    page.goto(f"{server}/admin/campaigns")
    page.get_by_label("Email").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    # Signing in leads back to the page that asked for it.
    expect(page.get_by_role("heading", name="Campaigns")).to_be_visible()


def shoot(page: Page, name: str, width: int) -> None:
    # Nothing may overflow sideways: wide tables scroll inside their own box.
    assert page.evaluate("document.documentElement.scrollWidth") <= width, f"{name} overflows at {width}px"
    # A mail preview is a sandboxed, so cross-origin, frame: Chromium paints it in its own process and only
    # while it is on screen. Below the fold of a phone-sized viewport it came out blank in a full-page
    # capture, though a reader who scrolls sees it. So the viewport is made as tall as the page, every
    # frame is waited for and two animation frames pass before the capture; then the viewport goes back.
    viewport = page.viewport_size
    assert viewport is not None
    page.set_viewport_size({"width": width, "height": page.evaluate("document.documentElement.scrollHeight")})
    for frame in page.frames[1:]:
        frame.wait_for_load_state()
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    page.screenshot(path=str(ARTIFACTS / f"admin-{name}-{width}.png"), full_page=True)
    page.set_viewport_size(viewport)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("width", "height"), [PHONE, DESKTOP])
def test_admin_writes_previews_tests_sends_and_watches_a_campaign(browser: Browser, server: str, smtp: SmtpSink,
                                                                   env: Callable[..., None], width: int,
                                                                   height: int) -> None:
    """An admin signs in, writes a campaign, previews it as a reader, sends a test, sends it and sees it finish."""
    ARTIFACTS.mkdir(exist_ok=True)
    make_readers(40, categories=("us-russia-relations",))
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{server}/admin/login")
    shoot(page, "login", width)
    sign_in(page, server)

    page.get_by_role("link", name="Write a campaign").first.click()
    page.get_by_label("Subject").fill("Petition: talks, not tanks")
    page.get_by_label("Markdown").check()
    page.get_by_label("Body", exact=True).fill(
        "# Talks, not tanks\n\nDear {{ name or 'reader' }}, [sign the petition](https://example.org/petition).")
    page.get_by_label("U.S.–Russia Relations").check()
    shoot(page, "campaign-new", width)
    page.get_by_role("button", name="Save draft").click()
    expect(page.get_by_text("Draft saved")).to_be_visible()
    campaign_url = page.url.split("?", 1)[0]

    page.get_by_label("As the subscriber with this address").fill("reader3@example.org")
    page.get_by_role("button", name="Preview").click()
    expect(page.locator("#preview-text")).to_contain_text("Dear Reader 3")
    frame = page.frame_locator("iframe.mail")
    expect(frame.get_by_role("heading", name="Talks, not tanks")).to_be_visible()

    page.get_by_label("To (up to 20").fill("editor@example.org")
    page.get_by_role("button", name="Send test").click()
    expect(page.get_by_text("editor@example.org: sent")).to_be_visible()
    test_mail = smtp.wait_for(1)[0]
    assert test_mail.recipients == ["editor@example.org"]
    assert "[Test] Petition" in test_mail.message["Subject"]

    page.get_by_role("button", name="Send now").click()
    # The page polls the counts; the status turns to finished without a reload.
    expect(page.locator("#status")).to_have_text("finished", timeout=30_000)
    expect(page.locator('[data-state="sent"]')).to_have_text("40")
    # Once finished, the page offers no more pause or cancel.
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)
    expect(page.frame_locator("iframe.mail").get_by_role("heading", name="Talks, not tanks")).to_be_visible()
    shoot(page, "campaign", width)
    assert len({m.recipients[0] for m in smtp.wait_for(41)}) == 41

    page.get_by_role("link", name="Delivery log").click()
    page.get_by_label("Address or SMTP reply contains").fill("reader7@")
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("cell", name="reader7@example.org")).to_be_visible()
    shoot(page, "deliveries", width)

    for path, name in (("/admin", "dashboard"), ("/admin/campaigns", "campaigns"),
                       ("/admin/subscribers", "subscribers"), ("/admin/suppressions", "suppressions"),
                       ("/admin/import", "import")):
        page.goto(f"{server}{path}")
        shoot(page, name, width)
    reader = subscriber_row("reader3@example.org")
    assert reader is not None
    page.goto(f"{server}/admin/subscribers/{reader.id}")
    expect(page.get_by_role("heading", name="Consent history")).to_be_visible()
    shoot(page, "subscriber", width)

    # With no SMTP server, mail lands in the outbox, which the console lists and shows.
    env(smtp_url="")
    page.goto(campaign_url)
    page.get_by_label("To (up to 20").fill("newcomer@example.org")
    page.get_by_role("button", name="Send test").click()
    expect(page.get_by_text("newcomer@example.org: sent")).to_be_visible()
    page.get_by_role("link", name="Outbox").click()
    expect(page.get_by_role("cell", name="newcomer@example.org")).to_be_visible()
    shoot(page, "outbox", width)
    page.get_by_role("link", name=re.compile("Petition: talks, not tanks")).click()
    expect(page.frame_locator("iframe").first.get_by_role("heading", name="Talks, not tanks")).to_be_visible()
    shoot(page, "outbox-message", width)
    page.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_import_with_bad_rows_in_chromium(browser: Browser, server: str, tmp_path: object) -> None:
    """An admin uploads a CSV: the dry run lists the bad rows, then the good rows are imported."""
    from pathlib import Path

    ARTIFACTS.mkdir(exist_ok=True)
    csv_file = Path(str(tmp_path)) / "people.csv"
    csv_file.write_text("email,name,categories,frequency,status\nann@example.org,Ann,us-russia-relations,weekly,\n"
                        "not an address,Bad,,daily,\nbob@example.org,Bob,Gardening,daily,\n", encoding="utf-8")
    page = browser.new_page(viewport={"width": PHONE[0], "height": PHONE[1]})
    sign_in(page, server)
    page.goto(f"{server}/admin/import")
    page.get_by_label("File").set_input_files(str(csv_file))
    page.get_by_role("button", name="Upload").click()
    expect(page.get_by_role("button", name="Import these rows")).to_be_visible(timeout=15_000)
    expect(page.get_by_text("Unknown category 'Gardening'")).to_be_visible()
    shoot(page, "import-dry-run", PHONE[0])
    page.get_by_role("button", name="Import these rows").click()
    expect(page.get_by_role("heading", name=re.compile("Import of people.csv"))).to_be_visible()
    expect(page.locator("#state")).to_have_text("done", timeout=15_000)
    assert subscriber_row("ann@example.org") is not None
    assert subscriber_row("bob@example.org") is None
    page.close()
