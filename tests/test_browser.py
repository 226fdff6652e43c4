"""The public pages in a real headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Browser

from mailer import queue
from mailer.models import Status
from tests.conftest import ARTIFACTS, SmtpSink, subscriber_row


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(("width", "height"), [(390, 844), (1280, 900)])
def test_sign_up_and_confirm_in_chromium(browser: Browser, server: str, smtp: SmtpSink, width: int,
                                         height: int) -> None:
    """A reader fills in the form on a phone and a desktop, then confirms with the button on the page."""
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{server}/subscribe")
    page.get_by_label("Email address").fill("browser@example.org")
    page.get_by_label("Name").fill("Brow Ser")
    page.get_by_label("U.S.–Russia Relations").check()
    page.get_by_label("Weekly digest").check()
    # Nothing may overflow sideways on a phone.
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.screenshot(path=str(ARTIFACTS / f"subscribe-{width}.png"), full_page=True)
    page.get_by_role("button", name="Subscribe").click()
    page.get_by_role("heading", name="Check your inbox").wait_for()

    queue.drain()
    [mail] = smtp.wait_for(1)
    link = re.search(r"http://127\.0\.0\.1:\d+/confirm/[\w.\-]+", mail.part("plain"))
    assert link
    page.goto(link.group(0))
    assert subscriber_row("browser@example.org").status is Status.pending
    page.get_by_role("button", name="Confirm my subscription").click()
    page.get_by_role("heading", name="You are subscribed").wait_for()
    page.screenshot(path=str(ARTIFACTS / f"confirmed-{width}.png"), full_page=True)
    row = subscriber_row("browser@example.org")
    assert (row.status, row.name, row.frequency.value) == (Status.confirmed, "Brow Ser", "weekly")
    assert [c.slug for c in row.categories] == ["us-russia-relations"]
    page.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_form_error_is_announced(browser: Browser, server: str) -> None:
    """A bad address comes back with the error shown, the field marked invalid, and what was typed kept."""
    page = browser.new_page()
    page.goto(f"{server}/subscribe")
    # The browser's own check would stop "a@b"; the server must still explain it for other clients.
    page.evaluate("document.querySelector('form').noValidate = true")
    page.get_by_label("Email address").fill("a@b")
    page.get_by_label("Name").fill("Kept")
    page.get_by_role("button", name="Subscribe").click()
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert "not valid" in alert.inner_text()
    assert page.get_by_label("Name").input_value() == "Kept"
    assert page.get_by_label("Email address").get_attribute("aria-invalid") == "true"
    page.close()
