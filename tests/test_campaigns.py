"""Campaigns through the admin API, sent in-process: audience, personalisation and lifecycle."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from mailer import addresses, campaigns, queue, store, tokens
from mailer.db import session_scope
from mailer.models import Delivery, Subscriber, utcnow
from mailer.recorder import Recorder
from mailer.web.app import create_app
from tests.campaign_helpers import create, deliveries, wait_until
from tests.conftest import ADMIN_TOKEN, SmtpSink, make_readers, subscriber_row


def test_bad_campaigns_are_refused_with_the_field_named(admin: TestClient) -> None:
    """Empty fields, template errors, sandbox escapes and unknown categories get 422 naming the field."""
    cases = [
        ({"subject": " ", "html": "<p>x</p>"}, "subject"),
        ({"subject": "Hi", "html": "<p>{% if %}</p>"}, "html"),
        ({"subject": "Hi {{ name", "html": "<p>x</p>"}, "subject"),
        ({"subject": "Hi", "html": "<p>{{ ''.__class__.__mro__[1].__subclasses__() }}</p>"}, "html"),
        ({"subject": "Hi", "html": "<p>{{ nobody }}</p>"}, "html"),
        ({"subject": "Hi", "html": "<p>x</p>", "categories": ["nope"]}, "categories"),
        ({"subject": "Hi", "html": "<p>x</p>", "text": "{{ name | nofilter }}"}, "text"),
        ({"subject": "Hi {{ name | upper }}", "html": "<p>x</p>"}, "subject"),
        ({"subject": "Hi", "html": "<p>{{ email | replace('mail', 'x') }}</p>"}, "html"),
    ]
    for body, field in cases:
        response = admin.post("/api/campaigns", json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["field"] == field, body
    assert admin.post("/api/campaigns", json={"subject": "Hi"}).status_code == 422
    assert admin.get("/api/campaigns").json() == []


def test_every_reader_gets_one_personal_mail(admin: TestClient, smtp: SmtpSink) -> None:
    """Each reader gets exactly one mail with their name (escaped) and their own links in headers and body."""
    make_readers(30)
    with session_scope() as session:
        tricky = session.get(Subscriber, make_readers(1, prefix="tricky")[0])
        assert tricky is not None
        tricky.name = "<b>Bold</b> & Co"
    campaign_id = create(admin, subject="{{ name }}: sign the petition",
                         html="<p>Dear {{ name }},</p><p><a href='{{ preferences_url }}'>prefs</a></p>")
    assert admin.post(f"/api/campaigns/{campaign_id}/send").status_code == 202
    done = wait_until(admin, campaign_id)
    assert (done["total"], done["counts"]["sent"]) == (31, 31)
    mails = smtp.wait_for(31)
    assert Counter(m.recipients[0] for m in mails).most_common(1)[0][1] == 1
    rows = deliveries(campaign_id)
    for mail in mails:
        reader = subscriber_row(mail.recipients[0])
        unsubscribe = f"https://news.example.org/unsubscribe/{tokens.unsubscribe_token(reader.id)}"
        preferences = f"https://news.example.org/preferences/{tokens.preferences_token(reader.id)}"
        message = mail.message
        assert message["Subject"] == f"{reader.name}: sign the petition"
        assert str(message["List-Unsubscribe"]).startswith(f"<{unsubscribe}>")
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert message["Message-ID"].startswith(f"<c{campaign_id}.d")
        # Signed over its ids, so a report quoting it names this delivery; the record keeps the same one.
        assert addresses.read_message_id(message["Message-ID"]) == (campaign_id, rows[reader.email_key].id)
        assert rows[reader.email_key].message_id == message["Message-ID"]
        assert rows[reader.email_key].sent_at is not None
        html, text = mail.part("html"), mail.part("plain")
        assert unsubscribe in html
        assert unsubscribe in text
        assert f"href=\"{preferences}\"" in html
        if reader.name.startswith("<b>"):
            assert "Dear &lt;b&gt;Bold&lt;/b&gt; &amp; Co," in html
            assert "Dear <b>Bold</b> & Co," in text
        else:
            assert f"Dear {reader.name}," in html


def test_category_audience(admin: TestClient, smtp: SmtpSink) -> None:
    """A category campaign reaches readers of that category and readers who chose none (all), nobody else."""
    make_readers(3, prefix="russia", categories=("us-russia-relations",))
    make_readers(2, prefix="nato", categories=("us-nato-relations",))
    make_readers(2, prefix="all")
    make_readers(2, prefix="pending", status="pending", categories=("us-russia-relations",))
    campaign_id = create(admin, categories=["us-russia-relations"])
    admin.post(f"/api/campaigns/{campaign_id}/send")
    wait_until(admin, campaign_id)
    got = sorted(m.recipients[0].split("@")[0] for m in smtp.wait_for(5))
    assert got == ["all0", "all1", "russia0", "russia1", "russia2"]


def test_pause_resume_double_start_and_restart_send_exactly_once(admin: TestClient, smtp: SmtpSink,
                                                                 env: Callable[..., None]) -> None:
    """Many pauses and resumes, a second start and a new app in between: every reader gets one mail."""
    # The bucket lets a second's worth through at each resume: five rounds of 40 leave mail for the end.
    env(smtp_rate="40", batch_size="20")
    make_readers(300)
    campaign_id = create(admin)
    assert admin.post(f"/api/campaigns/{campaign_id}/send").json()["status"] == "sending"
    again = admin.post(f"/api/campaigns/{campaign_id}/send")
    assert (again.status_code, again.json()["total"]) == (202, 300)
    paused_counts = []
    for round_number in range(5):
        time.sleep(0.1)
        paused = admin.post(f"/api/campaigns/{campaign_id}/pause").json()
        assert paused.get("status") == "paused", paused
        # Within a second (not after the loops end): only mail already handed over may still finish.
        time.sleep(0.5)
        before = admin.get(f"/api/campaigns/{campaign_id}").json()["counts"]
        time.sleep(0.5)
        after = admin.get(f"/api/campaigns/{campaign_id}").json()["counts"]
        assert before == after, "nothing moves while paused"
        assert after["sending"] == 0
        assert len(smtp.messages) == after["sent"]
        paused_counts.append(after["sent"])
        if round_number == 2:
            # A restart of the app: a new process would start with a fresh app and no loops running.
            with TestClient(create_app(), base_url="https://news.example.org",
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as fresh:
                assert fresh.post(f"/api/campaigns/{campaign_id}/resume").json()["status"] == "sending"
        else:
            admin.post(f"/api/campaigns/{campaign_id}/resume")
        admin.post(f"/api/campaigns/{campaign_id}/send")
    done = wait_until(admin, campaign_id)
    assert done["counts"]["sent"] == 300
    assert paused_counts[0] < 300, "the first pause came before the end"
    counts = Counter(m.recipients[0] for m in smtp.wait_for(300))
    assert len(counts) == 300
    assert set(counts.values()) == {1}


def test_nobody_gets_mail_after_leaving_mid_campaign(admin: TestClient, smtp: SmtpSink,
                                                     env: Callable[..., None]) -> None:
    """A reader who unsubscribes, or an address suppressed, while a campaign is paused gets nothing after."""
    env(batch_size="5", smtp_rate="40")
    ids = make_readers(40)
    campaign_id = create(admin)
    admin.post(f"/api/campaigns/{campaign_id}/send")
    admin.post(f"/api/campaigns/{campaign_id}/pause")
    queue.drain()
    sent_before = {m.recipients[0] for m in smtp.messages}
    leaving = [i for i in ids if f"reader{ids.index(i)}@example.org" not in sent_before][:2]
    assert len(leaving) == 2
    admin.post(f"/unsubscribe/{tokens.unsubscribe_token(leaving[0])}")
    from mailer import store
    from mailer.subscriptions import hash_email

    email = f"reader{ids.index(leaving[1])}@example.org"
    with session_scope() as session:
        store.add_suppression(session, email_hash=hash_email(email), email=email, reason="admin", detail="test")
    admin.post(f"/api/campaigns/{campaign_id}/resume")
    done = wait_until(admin, campaign_id)
    assert done["counts"]["skipped"] == 2
    assert done["counts"]["sent"] == 38
    got = {m.recipients[0] for m in smtp.messages}
    assert f"reader{ids.index(leaving[0])}@example.org" not in got
    assert email not in got


def test_cancel_schedule_and_wrong_moves(admin: TestClient, smtp: SmtpSink) -> None:
    """Cancel skips what is left; a due schedule starts at the next tick; impossible moves get 409."""
    make_readers(5)
    draft = create(admin)
    assert admin.post(f"/api/campaigns/{draft}/pause").status_code == 409
    assert "draft" in admin.post(f"/api/campaigns/{draft}/resume").json()["detail"]
    assert admin.get("/api/campaigns/999999").status_code == 404
    cancelled = admin.post(f"/api/campaigns/{draft}/cancel").json()
    assert cancelled["status"] == "cancelled"
    assert admin.post(f"/api/campaigns/{draft}/send").status_code == 409

    scheduled = create(admin)
    future = datetime.now(UTC) + timedelta(hours=1)
    body = admin.post(f"/api/campaigns/{scheduled}/schedule", json={"at": future.isoformat()}).json()
    assert body["status"] == "scheduled"
    naive = admin.post(f"/api/campaigns/{scheduled}/schedule", json={"at": "2026-12-01T08:00:00"})
    assert (naive.status_code, naive.json()["field"]) == (422, "at")
    from mailer import campaigns

    campaigns.tick()
    assert admin.get(f"/api/campaigns/{scheduled}").json()["status"] == "scheduled"
    past = datetime.now(UTC) - timedelta(seconds=1)
    admin.post(f"/api/campaigns/{scheduled}/schedule", json={"at": past.isoformat()})
    done = wait_until(admin, scheduled)
    assert done["counts"]["sent"] == 5
    assert len(smtp.wait_for(5)) == 5


def test_cancel_mid_send_stops_within_a_second(admin: TestClient, smtp: SmtpSink,
                                              env: Callable[..., None]) -> None:
    """Cancelling a sending campaign stops it within a second; what was not sent is skipped, not lost track of."""
    env(smtp_rate="100", batch_size="50")
    make_readers(300)
    campaign_id = create(admin)
    admin.post(f"/api/campaigns/{campaign_id}/send")
    time.sleep(0.4)
    assert admin.post(f"/api/campaigns/{campaign_id}/cancel").json()["status"] == "cancelled"
    time.sleep(1.0)
    counts = admin.get(f"/api/campaigns/{campaign_id}").json()["counts"]
    time.sleep(0.5)
    assert admin.get(f"/api/campaigns/{campaign_id}").json()["counts"] == counts
    assert 0 < counts["sent"] < 150
    assert counts["sent"] + counts["skipped"] == 300
    assert len(smtp.messages) == counts["sent"]


def test_more_bad_input_gets_4xx(admin: TestClient) -> None:
    """Fields that are cut or measured, failing expressions, control characters, huge ids and far dates."""
    for body, field in [
        ({"subject": "Hi {{ name[:1] }}", "html": "<p>x</p>"}, "subject"),
        ({"subject": "Hi", "html": "<p>{{ name|length }}</p>"}, "html"),
        ({"subject": "Hi", "html": "<p>{{ name|truncate(12) }}</p>"}, "html"),
        ({"subject": "Hi", "html": "<p>{{ 1/0 }}</p>"}, "html"),
        ({"subject": "Hi", "html": "<p>{{ name + 1 }}</p>"}, "html"),
        ({"subject": "Hi\u0000", "html": "<p>x</p>"}, "subject"),
        ({"subject": "Hi", "html": "<p>x</p>", "categories": ["a\u0000"]}, "categories"),
        ({"subject": "x" * 400, "html": "<p>x</p>"}, "subject"),
    ]:
        response = admin.post("/api/campaigns", json=body)
        assert response.status_code == 422, (body, response.text)
        assert field in (response.json().get("field") or response.json()["detail"]), body
    assert admin.get(f"/api/campaigns/{2**70}").status_code == 422
    campaign_id = create(admin)
    far = admin.post(f"/api/campaigns/{campaign_id}/schedule", json={"at": "9999-12-31T23:59:59-14:00"})
    assert far.status_code == 422
    assert admin.post(f"/api/campaigns/{campaign_id}/schedule", json={"at": "soon"}).status_code == 422


def test_test_send(admin: TestClient, smtp: SmtpSink) -> None:
    """A test goes to the given addresses only, marked [Test]; a bad address is refused before sending."""
    make_readers(3)
    campaign_id = create(admin, subject="Hello {{ name or 'friend' }}")
    response = admin.post(f"/api/campaigns/{campaign_id}/test", json={"emails": ["editor@example.org"]})
    assert response.status_code == 200
    assert response.json()[0]["sent"] is True
    [mail] = smtp.wait_for(1)
    assert mail.recipients == ["editor@example.org"]
    assert mail.message["Subject"] == "[Test] Hello friend"
    bad = admin.post(f"/api/campaigns/{campaign_id}/test", json={"emails": ["not an address"]})
    assert (bad.status_code, bad.json()["field"]) == (422, "email")
    assert admin.get(f"/api/campaigns/{campaign_id}").json()["status"] == "draft"
    assert deliveries(campaign_id) == {}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_dkim_signature_verifies(admin: TestClient, smtp: SmtpSink, env: Callable[..., None], tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With DKIM settings every mail carries a signature over From, Subject and the list headers."""
    import dkim
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "dkim.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.TraditionalOpenSSL,
                                                          serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    import base64

    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    env(dkim_domain="news.example.org", dkim_selector="mail", dkim_private_key=str(tmp_path / "dkim.pem"))
    make_readers(2)
    campaign_id = create(admin)
    admin.post(f"/api/campaigns/{campaign_id}/send")
    wait_until(admin, campaign_id)
    for mail in smtp.wait_for(2):
        signature = re.search(rb"DKIM-Signature:.*?(?=\r\n\S)", mail.data, re.S)
        assert signature is not None
        signed = signature.group(0).replace(b"\r\n", b"").replace(b" ", b"").lower()
        for header in (b"from", b"subject", b"list-unsubscribe", b"list-unsubscribe-post"):
            assert header in signed.split(b"h=")[1].split(b";")[0].split(b":")
        assert dkim.verify(mail.data, dnsfunc=lambda name, timeout=5: record)


def test_error_after_the_hand_over_leaves_unknown(admin: TestClient, env: Callable[..., None],
                                                  tmp_path: Path) -> None:
    """A transport that fails after the hand-over said "go" may have sent the mail: the delivery ends
    `unknown` with its Message-ID, and is not retried."""
    blocked = tmp_path / "outbox-file"
    blocked.write_text("a file where the outbox directory should be")
    env(smtp_url="", outbox_dir=str(blocked), pause_failure_rate="1")
    make_readers(2)
    campaign_id = create(admin)
    admin.post(f"/api/campaigns/{campaign_id}/send")
    done = wait_until(admin, campaign_id, timeout=20)
    assert done["counts"]["unknown"] == 2
    for row in deliveries(campaign_id).values():
        assert row.attempts == 1
        assert row.message_id == addresses.message_id(campaign_id, row.id)
        assert "NotADirectoryError" in (row.smtp_text or "")


def _claimed(readers: int, worker: str) -> tuple[int, list[int]]:
    """A sending campaign whose deliveries are all claimed by `worker`; returns its id and the delivery ids."""
    make_readers(readers)
    with session_scope() as session:
        campaign_id = campaigns.create(session, subject="Petition", html="<p>Sign it.</p>").id
    with session_scope() as session:
        campaigns.start(session, campaign_id)
        claims = store.claim_deliveries(session, campaign_id, worker, readers)
    return campaign_id, [claim.delivery_id for claim in claims]


def _hand_over(worker: str, campaign_id: int, delivery_ids: list[int]) -> None:
    """Mark deliveries handed over through the recorder, as the loop does just before DATA."""
    recorder = Recorder(worker)

    async def hand_over() -> list[str]:
        return [await recorder.handover(delivery_id, addresses.message_id(campaign_id, delivery_id))
                for delivery_id in delivery_ids]

    try:
        assert asyncio.run(hand_over()) == ["go"] * len(delivery_ids)
    finally:
        recorder.close()


def _states(campaign_id: int) -> dict[int, tuple[str, str | None]]:
    return {row.id: (row.state.value, row.message_id) for row in deliveries(campaign_id).values()}


@pytest.mark.parametrize("resend_unknown", [False, True])
def test_a_stopping_loop_hands_back_by_the_unknown_policy(env: Callable[..., None], resend_unknown: bool) -> None:
    """A loop that stops hands back untried claims as pending, and handed-over ones, with their Message-ID,
    as `unknown`, or as pending when MAILER_RESEND_UNKNOWN=true."""
    campaign_id, (first, second, untried) = _claimed(3, "loop-1")
    _hand_over("loop-1", campaign_id, [first, second])
    with session_scope() as session:
        store.release_claims(session, "loop-1", resend_unknown=resend_unknown)
    gone = "pending" if resend_unknown else "unknown"
    assert _states(campaign_id) == {
        first: (gone, addresses.message_id(campaign_id, first)),
        second: (gone, addresses.message_id(campaign_id, second)),
        untried: ("pending", None),
    }


def test_sweep_skips_claims_of_a_campaign_cancelled_after_its_worker_died(env: Callable[..., None]) -> None:
    """Claims that a dead worker held on a campaign cancelled meanwhile are never pending again: the
    tick makes untried ones skipped and the handed-over one `unknown`, with its Message-ID."""
    campaign_id, (handed, *untried) = _claimed(3, "dead-worker")
    _hand_over("dead-worker", campaign_id, [handed])
    with session_scope() as session:
        campaigns.cancel(session, campaign_id)
        session.execute(update(Delivery).where(Delivery.campaign_id == campaign_id)
                        .values(claimed_at=utcnow() - timedelta(hours=1)))
    assert campaigns.tick()["swept"] == 3
    assert _states(campaign_id) == {
        handed: ("unknown", addresses.message_id(campaign_id, handed)),
        **{delivery_id: ("skipped", None) for delivery_id in untried},
    }
    with session_scope() as session:
        assert campaigns.progress(session, campaign_id).status == "cancelled"
