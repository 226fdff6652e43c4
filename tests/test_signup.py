"""Sign-up: validation, answers that reveal nothing, abuse limits and header injection."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from mailer import queue
from mailer.db import session_scope
from mailer.models import Status, Subscriber
from mailer.web.app import create_app
from tests.campaign_helpers import create, wait_until
from tests.conftest import Received, SmtpSink, backdate_notices, sign_up, subscriber_row
from tests.mails import confirm_link, header_unsubscribe_link


def subscriber_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Subscriber)) or 0


@pytest.mark.parametrize(
    ("email", "says"),
    [
        ("", "Please enter your email address."),
        ("not-an-address", "An email address must have an @-sign."),
        ("two@@example.org", "not valid"),
        ("space in@example.org", "not valid"),
        ("user@example", "not valid"),
        ("user@-example.org", "not valid"),
        ("a\r\nbcc@example.org", "not valid"),
        ("x" * 330 + "@example.org", "not valid"),
        ("jörg@example.org", "Internationalized characters before the @-sign are not supported"),
        ("nul\x00@example.org", "not valid"),
    ],
)
def test_invalid_emails_get_a_clear_message_and_store_nothing(client: TestClient, smtp: SmtpSink, email: str,
                                                              says: str) -> None:
    """Each kind of bad address is answered 422 with a sentence, and no row or mail is made."""
    form = client.post("/subscribe", data={"email": email})
    assert form.status_code == 422
    assert says in form.text
    assert 'aria-invalid="true"' in form.text
    as_json = client.post("/subscribe", json={"email": email})
    assert as_json.status_code == 422
    assert as_json.json()["field"] == "email"
    assert says in as_json.json()["detail"]
    assert subscriber_count() == 0
    assert smtp.messages == []


def test_other_bad_fields_are_named(client: TestClient) -> None:
    """A bad frequency, an unknown category or a wrongly typed JSON field gets a 4xx naming the field."""
    hourly = client.post("/subscribe", json={"email": "a@example.org", "frequency": "hourly"})
    assert (hourly.status_code, hourly.json()["field"]) == (422, "frequency")
    for categories in (["a\u0000b"], ["x"] * 1000, ["UPPER"], [""]):
        odd = client.post("/subscribe", json={"email": "a@example.org", "categories": categories})
        assert (odd.status_code, odd.json()["field"]) == (422, "categories")
    deep = client.post("/subscribe", content=b"[" * 100_000, headers={"Content-Type": "application/json"})
    assert deep.status_code == 422
    unknown = client.post("/subscribe", json={"email": "a@example.org", "categories": ["nope"]})
    assert (unknown.status_code, unknown.json()["field"]) == (422, "categories")
    assert client.post("/subscribe", json={"email": ["a@example.org"]}).status_code == 422
    assert client.post("/subscribe", json=["a@example.org"]).status_code == 422
    broken = client.post("/subscribe", content=b"{not json", headers={"Content-Type": "application/json"})
    assert broken.status_code == 422
    assert "not valid JSON" in broken.json()["detail"]
    assert subscriber_count() == 0


def test_email_is_normalised_and_unique_whatever_the_case(client: TestClient, smtp: SmtpSink) -> None:
    """Two sign-ups that differ in letter case are one subscriber; a Unicode domain is kept as IDNA and mailed."""
    sign_up(client, "Case@Example.ORG")
    sign_up(client, "case@example.org")
    assert subscriber_count() == 1
    assert subscriber_row("CASE@example.org").email == "Case@example.org"
    sign_up(client, "leser@bücher.example")
    assert subscriber_row("leser@xn--bcher-kva.example") is not None
    assert smtp.to("leser@xn--bcher-kva.example")


def test_concurrent_sign_ups_of_one_address_make_one_row(client: TestClient, smtp: SmtpSink) -> None:
    """Eight sign-ups of one new address at once: one subscriber, one confirmation mail, all answered 200."""
    from concurrent.futures import ThreadPoolExecutor

    from mailer import queue

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda case: client.post("/subscribe", data={"email": case}),
                                ["Race@example.org", "race@example.org", "RACE@example.org", "race@Example.org"] * 2))
    queue.drain()
    assert {a.status_code for a in answers} == {200}
    assert subscriber_count() == 1
    assert len(smtp.to("race@example.org")) == 1


def test_answer_is_identical_for_new_pending_confirmed_and_unsubscribed(client: TestClient, smtp: SmtpSink) -> None:
    """Nobody can learn from the answer whether an address is subscribed."""
    answers = {}
    answers["new"] = sign_up(client, "known@example.org")
    answers["pending"] = sign_up(client, "known@example.org")
    client.post(confirm_link(smtp.to("known@example.org")[0]))
    answers["confirmed"] = sign_up(client, "known@example.org")
    welcome = smtp.wait_for(2)[1]
    client.post(header_unsubscribe_link(welcome))
    answers["unsubscribed"] = sign_up(client, "known@example.org")
    answers["other new"] = sign_up(client, "other@example.org")
    reference = answers["new"]
    for state, response in answers.items():
        assert (response.status_code, response.text) == (reference.status_code, reference.text), state
    json_answers = {client.post("/subscribe", json={"email": e}).text for e in ("known@example.org", "x@example.org")}
    assert len(json_answers) == 1
    # A bad field is reported the same way whoever the address belongs to.
    confirmed = subscriber_row("known@example.org")
    assert confirmed is not None
    for email in ("known@example.org", "stranger@example.org"):
        odd = client.post("/subscribe", json={"email": email, "categories": ["nope"]})
        assert (odd.status_code, odd.json()["field"]) == (422, "categories"), email


def test_confirmed_address_is_not_confirmed_again(client: TestClient, smtp: SmtpSink) -> None:
    """Signing up a confirmed address sends no mail and changes nothing."""
    sign_up(client, "done@example.org", name="Original")
    client.post(confirm_link(smtp.wait_for(1)[0]))
    smtp.wait_for(2)
    backdate_notices("done@example.org", minutes=60)
    sign_up(client, "done@example.org", name="Attacker", frequency="weekly")
    assert len(smtp.messages) == 2
    row = subscriber_row("done@example.org")
    assert (row.status, row.name, row.frequency.value) == (Status.confirmed, "Original", "daily")


def test_one_confirmation_mail_per_ten_minutes_and_a_daily_cap(client: TestClient, smtp: SmtpSink,
                                                              env: Callable[..., None]) -> None:
    """Repeated sign-ups send one mail per 10 minutes per address, and no more than the daily cap."""
    env(confirm_daily_cap="2")
    for _ in range(3):
        sign_up(client, "flood@example.org")
    assert len(smtp.to("flood@example.org")) == 1
    backdate_notices("flood@example.org", minutes=11)
    sign_up(client, "flood@example.org")
    assert len(smtp.to("flood@example.org")) == 2
    backdate_notices("flood@example.org", minutes=11)
    sign_up(client, "flood@example.org")
    assert len(smtp.to("flood@example.org")) == 2, "the daily cap of 2 holds"
    backdate_notices("flood@example.org", minutes=24 * 60)
    sign_up(client, "flood@example.org")
    assert len(smtp.to("flood@example.org")) == 3


def test_signups_per_client_ip_are_rate_limited(client: TestClient, env: Callable[..., None]) -> None:
    """The 4th sign-up in a minute from one address gets a readable 429 page; X-Forwarded-For is ignored."""
    env(signup_rate_limit="3/minute")
    for number in range(3):
        assert client.post("/subscribe", data={"email": f"r{number}@example.org"},
                           headers={"X-Forwarded-For": f"203.0.113.{number}"}).status_code == 200
    limited = client.post("/subscribe", data={"email": "r9@example.org"}, headers={"X-Forwarded-For": "203.0.113.9"})
    assert limited.status_code == 429
    assert "Too many sign-ups" in limited.text
    assert "<h1>Please slow down</h1>" in limited.text
    assert subscriber_row("r9@example.org") is None
    assert client.post("/subscribe", json={"email": "r9@example.org"}).status_code == 429


def test_forwarded_for_counts_only_behind_a_trusted_proxy(env: Callable[..., None]) -> None:
    """Behind a trusted proxy each forwarded client has its own budget; a forged left-most hop does not help."""
    env(signup_rate_limit="2/minute", trusted_proxies="10.0.0.0/8")
    with TestClient(create_app(), client=("10.0.0.5", 4000)) as proxied:
        for client_address in ("198.51.100.1", "198.51.100.2"):
            for number in range(2):
                response = proxied.post("/subscribe", data={"email": f"p{client_address[-1]}{number}@example.org"},
                                        headers={"X-Forwarded-For": f"1.2.3.{number}, {client_address}"})
                assert response.status_code == 200
        third = proxied.post("/subscribe", data={"email": "p13@example.org"},
                             headers={"X-Forwarded-For": "9.9.9.9, 198.51.100.1"})
        assert third.status_code == 429


def test_ipv6_clients_share_a_budget_per_64(env: Callable[..., None]) -> None:
    """Addresses in one IPv6 /64 count together, so rotating the host part does not help."""
    env(signup_rate_limit="2/minute")
    codes = []
    for host in range(1, 4):
        with TestClient(create_app(), client=(f"2001:db8:1:2::{host}", 4000)) as peer:
            codes.append(peer.post("/subscribe", data={"email": f"v6-{host}@example.org"}).status_code)
    assert codes == [200, 200, 429]
    with TestClient(create_app(), client=("2001:db8:9:9::1", 4000)) as other:
        assert other.post("/subscribe", data={"email": "v6-other@example.org"}).status_code == 200


def test_garbage_forwarded_hops_are_not_trusted(env: Callable[..., None]) -> None:
    """Behind a trusted proxy, a forwarded value that is not an IP address is never used as the client."""
    env(signup_rate_limit="1/minute", trusted_proxies="10.0.0.0/8")
    with TestClient(create_app(), client=("10.0.0.5", 4000)) as proxied:
        first = proxied.post("/subscribe", data={"email": "g1@example.org"}, headers={"X-Forwarded-For": "x" * 80})
        second = proxied.post("/subscribe", data={"email": "g2@example.org"}, headers={"X-Forwarded-For": "y" * 80})
    assert (first.status_code, second.status_code) == (200, 429)


def test_honeypot_drops_bots_silently(client: TestClient, smtp: SmtpSink) -> None:
    """A filled hidden field gets the normal answer, but nothing is stored or sent."""
    normal = sign_up(client, "human@example.org")
    bot = sign_up(client, "bot@example.org", website="http://spam.example")
    assert (bot.status_code, bot.text) == (normal.status_code, normal.text)
    assert subscriber_row("bot@example.org") is None
    assert smtp.to("bot@example.org") == []


@pytest.mark.parametrize("name", ["Eve\r\nBcc: victim@example.net", "Eve\nSubject: spam", "Eve\x00\x1b[31m\u2028x"])
def test_no_header_injection_through_the_name(client: TestClient, smtp: SmtpSink, name: str) -> None:
    """Control characters in a name never reach a header: the mail has one To, no Bcc, no extra Subject."""
    sign_up(client, "eve@example.org", name=name)
    [mail] = smtp.wait_for(1)
    assert mail.recipients == ["eve@example.org"]
    headers = mail.data.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":")[0].lower() for line in headers.split(b"\r\n") if not line[:1].isspace()]
    assert b"bcc" not in names
    assert names.count(b"subject") == 1
    assert b"\x00" not in headers
    assert b"\x1b" not in headers
    # A confirmation carries no typed name at all (notices.py); the welcome and campaign tests below cover
    # the mails that do.
    assert str(mail.message["To"]) == "eve@example.org"
    assert "\n" not in subscriber_row("eve@example.org").name


# Line breaks of every kind, a folded-line attempt, and terminal escapes and format characters.
INJECTED_NAMES = ["Eve\r\nBcc: victim@example.net", "Eve\nSubject: spam", "Eve\r\n X-Folded: yes",
                  "Eve\rCc: victim@example.net", "Eve\x85X-Nel: yes\u2028\u2029x", "Eve\x00\x1b[31m\u200ex\t"]


def assert_headers_intact(mail: Received, email: str) -> str:
    """Check that a mail's header block holds each header once, none an injected name could add, and no
    control character; returns its To header as received."""
    assert mail.recipients == [email]
    headers = mail.data.split(b"\r\n\r\n", 1)[0]
    names = [line.split(b":")[0].lower() for line in headers.split(b"\r\n") if not line[:1].isspace()]
    assert len(names) == len(set(names)), names
    assert not {b"bcc", b"cc", b"x-folded", b"x-nel"} & set(names), names
    # Folding (CRLF then a space) is the only line break allowed inside the block.
    unfolded = headers.replace(b"\r\n ", b" ").replace(b"\r\n", b"")
    assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]", unfolded), headers
    to = str(mail.message["To"])
    assert to.endswith(f"<{email}>"), to
    assert "Eve" in to
    return to


@pytest.mark.parametrize("name", INJECTED_NAMES)
def test_no_header_injection_through_an_admin_added_name_in_the_welcome(admin: TestClient, smtp: SmtpSink,
                                                                         name: str) -> None:
    """A name with control characters given to `POST /api/subscribers` (confirmed, with the welcome mail) is
    stored clean and ends in a welcome whose headers are intact."""
    added = admin.post("/api/subscribers", json={"email": "eve@example.org", "name": name, "confirmed": True,
                                                 "send_welcome": True})
    assert added.status_code == 201, added.text
    queue.drain()
    [welcome] = smtp.wait_for(1)
    assert welcome.message["Subject"].startswith("Welcome")
    assert_headers_intact(welcome, "eve@example.org")
    stored = subscriber_row("eve@example.org").name
    assert stored.startswith("Eve ")
    assert stored.isprintable()


@pytest.mark.parametrize("name", INJECTED_NAMES)
def test_no_header_injection_through_the_name_in_a_campaign(admin: TestClient, smtp: SmtpSink, name: str) -> None:
    """A campaign mail, personalised at the byte level, to a reader whose name came through the admin API keeps
    its headers intact, with the clean name in its To and its personalised Subject."""
    added = admin.post("/api/subscribers", json={"email": "eve@example.org", "name": name, "confirmed": True})
    assert added.status_code == 201, added.text
    campaign_id = create(admin, subject="{{ name }}: sign the petition")
    assert admin.post(f"/api/campaigns/{campaign_id}/send").status_code == 202
    assert wait_until(admin, campaign_id)["counts"]["sent"] == 1
    [mail] = smtp.wait_for(1)
    stored = subscriber_row("eve@example.org").name
    assert_headers_intact(mail, "eve@example.org")
    assert mail.message["To"].addresses[0].display_name == stored
    assert mail.message["Subject"] == f"{stored}: sign the petition"


def test_json_sign_up_from_the_sites_own_pages_passes_cors(client: TestClient, smtp: SmtpSink,
                                                           env: Callable[..., None]) -> None:
    """Script on a listed origin may POST a JSON sign-up; other origins get no CORS grant, and no credentials."""
    env(signup_origins="https://www.example-news.org")
    preflight = client.options("/subscribe", headers={"Origin": "https://www.example-news.org",
                                                      "Access-Control-Request-Method": "POST",
                                                      "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "https://www.example-news.org"
    assert "access-control-allow-credentials" not in preflight.headers
    posted = client.post("/subscribe", json={"email": "script@example.org"},
                         headers={"Origin": "https://www.example-news.org"})
    assert posted.status_code == 200
    assert posted.headers["access-control-allow-origin"] == "https://www.example-news.org"
    queue.drain()
    assert smtp.wait_for(1)[0].recipients == ["script@example.org"]
    stranger = client.options("/subscribe", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert stranger.status_code == 403
    assert "access-control-allow-origin" not in client.post(
        "/subscribe", json={"email": "other@example.org"}, headers={"Origin": "https://evil.example"}).headers
    assert "access-control-allow-origin" not in client.get("/api/categories",
                                                           headers={"Origin": "https://www.example-news.org"}).headers
