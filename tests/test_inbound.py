"""Bounces, complaints and mailto unsubscribes: reading real-world samples, and the policy they feed."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from mailer import bounces, reports
from mailer.db import session_scope
from mailer.models import (
    Campaign,
    CampaignStatus,
    InboundKind,
    InboundMessage,
    Status,
    Subscriber,
    Suppression,
    utcnow,
)
from tests.conftest import subscriber_row
from tests.inbound_helpers import sample, sent_campaign, take_in


@pytest.mark.parametrize(("name", "kind", "action", "status"), [
    ("postfix_user_unknown", "dsn", "failed", "5.1.1"),
    ("postfix_delayed", "dsn", "delayed", "4.4.1"),
    ("postfix_delivered", "dsn", "relayed", "2.0.0"),
    ("gmail_user_unknown", "dsn", "failed", "5.1.1"),
    ("gmail_mailbox_full", "dsn", "failed", "5.2.2"),
    ("outlook_recipient_not_found", "dsn", "failed", "5.1.10"),
    ("exim_failed", "bounce", "failed", "5.1.1"),
    ("qmail_failed", "bounce", "failed", "5.1.1"),
    ("yahoo_arf", "complaint", "complained", ""),
    ("outlook_jmrp_arf", "complaint", "complained", ""),
])
def test_samples_are_read_as_what_they_are(name: str, kind: str, action: str, status: str) -> None:
    """Each MTA's report gives its kind, the failed recipient, the action and the enhanced status code."""
    report = reports.parse(sample(name, rcpt="dana@example.org"))
    assert report.kind == kind
    assert [(r.address, r.action, r.status) for r in report.recipients] == [("dana@example.org", action, status)]


def test_mail_that_is_no_report_is_read_as_other() -> None:
    """A vacation reply and a person's reply are neither bounces nor complaints."""
    assert reports.parse(sample("vacation_reply")).kind == "other"
    assert reports.parse(sample("vacation_reply")).auto_submitted == "auto-replied"
    assert reports.parse(sample("human_reply")).kind == "other"


@pytest.mark.parametrize(("status", "severity"), [
    ("5.1.1", "hard"), ("5.1.10", "hard"), ("5.2.1", "hard"),
    ("5.2.2", "soft"), ("4.4.1", "soft"), ("5.4.4", "soft"), ("", "soft"),
    ("5.7.1", "block"), ("5.7.26", "block"), ("4.7.0", "block"), ("5.6.0", "block"), ("5.3.4", "block"),
])
def test_enhanced_status_codes_class_bounces(status: str, severity: str) -> None:
    """Only codes that say the address is bad are hard; policy and content refusals are blocks, the rest soft."""
    assert bounces.classify(status).value == severity


def _suppressed(email: str) -> str | None:
    from mailer.subscriptions import hash_email

    with session_scope() as session:
        return session.scalar(select(Suppression.reason).where(Suppression.email_hash == hash_email(email)))


@pytest.mark.parametrize("name", ["postfix_user_unknown", "gmail_user_unknown", "outlook_recipient_not_found",
                                  "exim_failed", "qmail_failed"])
def test_a_hard_bounce_to_the_return_path_bounces_and_suppresses_its_reader(env: Callable[..., None],
                                                                            name: str) -> None:
    """A hard bounce sent to a delivery's own return path bounces that delivery's reader, and no one else."""
    first, second = sent_campaign(2)
    row = take_in(sample(name, **first.values()), rcpt_to=[first.return_path])
    assert (row.kind, row.severity, row.delivery_id, row.campaign_id) == \
        (InboundKind.bounce, "hard", first.delivery_id, first.campaign_id)
    assert subscriber_row(first.email).status is Status.bounced
    assert _suppressed(first.email) == "hard-bounce"
    assert subscriber_row(second.email).status is Status.confirmed


def test_a_return_path_with_a_forged_token_names_nobody(env: Callable[..., None]) -> None:
    """A bounce to bounces+d<id>-<wrong signature> is kept for a person and bounces nobody."""
    [sent] = sent_campaign(1)
    forged = sent.return_path.replace(sent.return_path.split("-")[-1].split("@")[0], "a" * 16)
    values = {**sent.values(), "return_path": forged, "message_id": "<x@example.net>",
              "list_unsubscribe": "<https://example.net/u>"}
    row = take_in(sample("postfix_user_unknown", **values), rcpt_to=[forged])
    assert row.kind is InboundKind.unclassified
    assert "names none of our deliveries" in row.detail
    assert subscriber_row(sent.email).status is Status.confirmed


def test_without_a_return_path_our_message_id_and_the_address_must_agree(env: Callable[..., None]) -> None:
    """A bounce to the plain bounce address is matched by our signed Message-ID only when the address agrees."""
    first, second = sent_campaign(2)
    # The quoted original names first's delivery but the report is about second's address: not trusted.
    mismatched = {"rcpt": second.email, "message_id": first.message_id, "list_unsubscribe": "<https://x.test/u>"}
    row = take_in(sample("outlook_recipient_not_found", **mismatched))
    assert row.kind is InboundKind.unclassified
    assert subscriber_row(first.email).status is Status.confirmed
    assert subscriber_row(second.email).status is Status.confirmed
    matched = {**mismatched, "rcpt": first.email}
    row = take_in(sample("outlook_recipient_not_found", **matched))
    assert (row.kind, row.delivery_id) == (InboundKind.bounce, first.delivery_id)
    assert subscriber_row(first.email).status is Status.bounced


def test_a_message_id_names_its_delivery_only_with_its_own_signature(env: Callable[..., None]) -> None:
    """Our Message-ID reads back as (campaign, delivery), whatever its case; moved to other ids, with a return
    path's signature, or on another domain, it names nothing."""
    from mailer import addresses

    signed = addresses.message_id(3, 41)
    assert re.fullmatch(r"<c3\.d41\.[a-z2-7]{16}@news\.example\.org>", signed)
    assert addresses.read_message_id(f"In-Reply-To: {signed.upper()}") == (3, 41)
    signature = signed.split(".")[2].split("@")[0]
    verp_signature = addresses.return_path(41).split("-")[-1].split("@")[0]
    for forged in (f"<c3.d42.{signature}@news.example.org>", f"<c4.d41.{signature}@news.example.org>",
                   f"<c3.d41.{verp_signature}@news.example.org>", signed.replace("news.example.org", "example.net")):
        assert addresses.read_message_id(forged) is None, forged


@pytest.mark.parametrize("name", ["postfix_user_unknown", "yahoo_arf"])
@pytest.mark.parametrize("signature", ["unsigned", "badly signed"])
def test_a_forged_report_quoting_a_guessed_message_id_changes_nothing(env: Callable[..., None], name: str,
                                                                      signature: str) -> None:
    """Campaign and delivery ids are sequential: a bounce or complaint sent to the plain bounce address that
    quotes <c{campaign}.d{delivery}…@our domain> without our signature, or with a wrong one, plus the
    reader's own address, suppresses nobody and is kept for a person."""
    first, second = sent_campaign(2)
    ids = f"c{first.campaign_id}.d{first.delivery_id}"
    forged_id = f"<{ids}@news.example.org>" if signature == "unsigned" else f"<{ids}.{'a' * 16}@news.example.org>"
    assert forged_id != first.message_id
    forged = {"rcpt": first.email, "message_id": forged_id, "list_unsubscribe": "<https://example.net/u>"}
    row = take_in(sample(name, **forged), rcpt_to=["bounces@news.example.org"])
    assert (row.kind, row.subscriber_id, row.delivery_id) == (InboundKind.unclassified, None, None)
    assert "names none of our" in row.detail
    for sent in (first, second):
        reader = subscriber_row(sent.email)
        assert reader is not None
        assert (reader.status, reader.bounce_score) == (Status.confirmed, 0)
        assert _suppressed(sent.email) is None
    # The same report quoting the Message-ID the mail really carried is acted on.
    row = take_in(sample(name, **{**forged, "message_id": first.message_id}), rcpt_to=["bounces@news.example.org"])
    assert (row.kind, row.delivery_id) == (InboundKind.bounce if name.startswith("postfix") else InboundKind.complaint,
                                           first.delivery_id)


def test_a_success_report_is_ours_to_dismiss_only_when_it_names_our_delivery(env: Callable[..., None]) -> None:
    """A "delivered" or "relayed" DSN for one of our deliveries needs nothing (ignored); the same report about
    someone else's mail names none of our readers, so it is unclassified: kept and listed for an admin."""
    [sent] = sent_campaign(1)
    ours = take_in(sample("postfix_delivered", **sent.values()), rcpt_to=[sent.return_path])
    assert (ours.kind, ours.delivery_id) == (InboundKind.ignored, sent.delivery_id)
    unrelated = take_in(sample("postfix_delivered", rcpt="editor@example.net"),
                        rcpt_to=["bounces@news.example.org"])
    assert (unrelated.kind, unrelated.subscriber_id) == (InboundKind.unclassified, None)
    assert "A delivery report with no failure for editor@example.net that names none of our deliveries" \
        in unrelated.detail
    reader = subscriber_row(sent.email)
    assert reader is not None
    assert (reader.status, reader.bounce_score) == (Status.confirmed, 0)


def test_a_delay_warning_counts_nothing(env: Callable[..., None]) -> None:
    """Postfix's 'still being retried' warning is understood, and neither bounces nor scores the reader."""
    [sent] = sent_campaign(1)
    row = take_in(sample("postfix_delayed", **sent.values()))
    assert (row.kind, row.status_code) == (InboundKind.delay, "4.4.1")
    reader = subscriber_row(sent.email)
    assert reader is not None
    assert reader.status is Status.confirmed
    assert reader.bounce_score == 0


def _backdate_last_bounce(email: str, days: float) -> None:
    with session_scope() as session:
        reader = session.scalars(select(Subscriber).where(Subscriber.email_key == email)).one()
        assert reader.last_bounce_at is not None
        session.execute(update(Subscriber).where(Subscriber.id == reader.id)
                        .values(last_bounce_at=reader.last_bounce_at - timedelta(days=days)))


def test_soft_bounces_add_up_once_a_day_to_five_within_seven_days(env: Callable[..., None]) -> None:
    """Mailbox-full bounces score one a day; the fifth day within a week bounces and suppresses the reader."""
    [sent] = sent_campaign(1)
    for day in range(1, 5):
        row = take_in(sample("gmail_mailbox_full", **sent.values()))
        assert (row.kind, row.severity) == (InboundKind.bounce, "soft")
        again = take_in(sample("gmail_mailbox_full", **sent.values()))
        assert "already counted today" in again.detail
        reader = subscriber_row(sent.email)
        assert reader is not None
        assert (reader.status, reader.bounce_score) == (Status.confirmed, day)
        _backdate_last_bounce(sent.email, 1)
    row = take_in(sample("gmail_mailbox_full", **sent.values()))
    assert "reached the threshold" in row.detail
    assert subscriber_row(sent.email).status is Status.bounced
    assert _suppressed(sent.email) == "soft-bounces"


def test_the_soft_bounce_score_starts_again_after_a_quiet_week(env: Callable[..., None]) -> None:
    """Four soft bounces, then eight days without one: the next bounce starts the score at one."""
    env(soft_bounce_threshold="5")
    [sent] = sent_campaign(1)
    for _ in range(4):
        take_in(sample("gmail_mailbox_full", **sent.values()))
        _backdate_last_bounce(sent.email, 1)
    _backdate_last_bounce(sent.email, 8)
    take_in(sample("gmail_mailbox_full", **sent.values()))
    reader = subscriber_row(sent.email)
    assert reader is not None
    assert (reader.status, reader.bounce_score) == (Status.confirmed, 1)


@pytest.mark.parametrize("name", ["yahoo_arf", "outlook_jmrp_arf"])
def test_a_complaint_suppresses_at_once_and_pauses_a_campaign_past_the_rate(env: Callable[..., None],
                                                                            name: str) -> None:
    """With MAILER_PAUSE_COMPLAINT_MIN_SENT at 100, one complaint in 100 sent mails (1% > 0.3%) marks the reader
    complained and pauses the campaign, saying why."""
    env(pause_complaint_min_sent="100")
    sent = sent_campaign(100)
    target = sent[42]
    # Outlook's JMRP goes to the address registered for it, not to the return path: the quoted original says whose.
    values = {**target.values(), "to": "abuse@news.example.org"}
    row = take_in(sample(name, **values), rcpt_to=["bounces@news.example.org"])
    assert (row.kind, row.subscriber_id, row.campaign_id) == \
        (InboundKind.complaint, target.subscriber_id, target.campaign_id)
    assert subscriber_row(target.email).status is Status.complained
    assert _suppressed(target.email) == "complaint"
    with session_scope() as session:
        campaign = session.get(Campaign, target.campaign_id)
        assert campaign is not None
        assert campaign.status is CampaignStatus.paused
        assert "1 spam complaint for 100 mails sent (1.00%; the limit is 0.30%)" in campaign.status_reason


def test_a_complaint_before_the_minimum_sent_suppresses_but_does_not_pause(env: Callable[..., None]) -> None:
    """Below MAILER_PAUSE_COMPLAINT_MIN_SENT (here 101) there is no rate yet: one complaint in the first 100
    mails (1%, past 0.3%) still marks the reader complained and suppressed, and the campaign keeps sending."""
    env(pause_complaint_min_sent="101")
    sent = sent_campaign(100)
    row = take_in(sample("yahoo_arf", **sent[7].values()))
    assert (row.kind, row.campaign_id) == (InboundKind.complaint, sent[7].campaign_id)
    assert subscriber_row(sent[7].email).status is Status.complained
    assert _suppressed(sent[7].email) == "complaint"
    with session_scope() as session:
        campaign = session.get(Campaign, sent[7].campaign_id)
        assert campaign is not None
        assert campaign.status is CampaignStatus.sending
        assert not campaign.status_reason


def test_the_complaint_minimum_defaults_to_a_thousand_sent_mails(env: Callable[..., None]) -> None:
    """By default (MAILER_PAUSE_COMPLAINT_MIN_SENT 1000) a complaint in a campaign's first mails pauses nothing."""
    from mailer.config import get_settings

    assert get_settings().pause_complaint_min_sent == 1000
    sent = sent_campaign(3)
    take_in(sample("yahoo_arf", **sent[0].values()))
    assert subscriber_row(sent[0].email).status is Status.complained
    with session_scope() as session:
        assert session.get(Campaign, sent[0].campaign_id).status is CampaignStatus.sending  # type: ignore[union-attr]


def test_complaints_under_the_rate_do_not_pause(env: Callable[..., None]) -> None:
    """Past the minimum, with the limit at 5%, one complaint in 100 mails leaves the campaign sending."""
    env(pause_complaint_rate="0.05", pause_complaint_min_sent="100")
    sent = sent_campaign(100)
    take_in(sample("yahoo_arf", **sent[0].values()))
    assert subscriber_row(sent[0].email).status is Status.complained
    with session_scope() as session:
        assert session.get(Campaign, sent[0].campaign_id).status is CampaignStatus.sending  # type: ignore[union-attr]


def test_a_complaint_that_names_no_one_we_signed_for_is_kept(env: Callable[..., None]) -> None:
    """A forged complaint that only names a reader's address (no token, no matching Message-ID) changes nothing."""
    [sent] = sent_campaign(1)
    forged = {"rcpt": sent.email, "return_path": "bounces@news.example.org", "message_id": "<x@example.net>",
              "list_unsubscribe": "<https://example.net/u>"}
    row = take_in(sample("yahoo_arf", **forged))
    assert row.kind is InboundKind.unclassified
    assert subscriber_row(sent.email).status is Status.confirmed


def test_the_mailto_unsubscribes_its_reader_and_only_with_a_valid_token(env: Callable[..., None]) -> None:
    """A mail to unsubscribe+<token> unsubscribes that reader; the plain address or a bad token is kept."""
    first, second = sent_campaign(2)
    mailto = first.list_unsubscribe.split("mailto:")[1].split("?")[0]
    row = take_in(sample("unsubscribe_request", to=mailto, rcpt=first.email), rcpt_to=[mailto])
    assert (row.kind, row.subscriber_id) == (InboundKind.unsubscribe, first.subscriber_id)
    assert subscriber_row(first.email).status is Status.unsubscribed
    plain = take_in(sample("unsubscribe_request", to="unsubscribe@news.example.org", rcpt=second.email),
                    rcpt_to=["unsubscribe@news.example.org"])
    assert plain.kind is InboundKind.unclassified
    assert "without a valid token" in plain.detail
    bad = mailto.replace(mailto.split("-")[-1].split("@")[0], "b" * 16)
    take_in(sample("unsubscribe_request", to=bad, rcpt=second.email), rcpt_to=[bad])
    assert subscriber_row(second.email).status is Status.confirmed


def test_replies_and_auto_replies_are_kept_for_a_person(env: Callable[..., None]) -> None:
    """A reader's reply and an out-of-office sent to the return path are unclassified, and change nothing."""
    [sent] = sent_campaign(1)
    for name in ("human_reply", "vacation_reply"):
        row = take_in(sample(name, **sent.values()), rcpt_to=[sent.return_path])
        assert row.kind is InboundKind.unclassified
    assert "automatic reply" in row.detail
    assert subscriber_row(sent.email).status is Status.confirmed


def test_processing_twice_acts_once(env: Callable[..., None]) -> None:
    """Running the task again on a processed message changes nothing."""
    from mailer import inbound

    [sent] = sent_campaign(1)
    row = take_in(sample("gmail_mailbox_full", **sent.values()))
    assert inbound.process(row.id) == "already-processed"
    reader = subscriber_row(sent.email)
    assert reader is not None
    assert reader.bounce_score == 1


def test_admins_read_what_came_back_through_the_api(admin: TestClient) -> None:
    """GET /api/inbound lists rows newest first (filterable by kind); GET /api/inbound/{id} shows the raw mail."""
    [sent] = sent_campaign(1)
    bounce = take_in(sample("postfix_user_unknown", **sent.values()))
    reply = take_in(sample("human_reply", **sent.values()))
    listed = admin.get("/api/inbound").json()
    assert [item["id"] for item in listed] == [reply.id, bounce.id]
    assert listed[1]["kind"] == "bounce"
    assert listed[1]["severity"] == "hard"
    assert listed[1]["status_code"] == "5.1.1"
    assert "raw" not in listed[0]
    assert [item["id"] for item in admin.get("/api/inbound?kind=unclassified").json()] == [reply.id]
    assert [item["id"] for item in admin.get(f"/api/inbound?before={reply.id}&limit=5").json()] == [bounce.id]
    one = admin.get(f"/api/inbound/{reply.id}").json()
    assert "Could you send me the full text" in one["raw"]
    assert one["subject"] == "Re: Petition: talks, not tanks"
    missing = admin.get("/api/inbound/999999")
    assert missing.status_code == 404
    assert "no inbound message 999999" in missing.json()["detail"]
    assert admin.get("/api/inbound?kind=nonsense").status_code == 422
    admin.headers.pop("Authorization")
    assert admin.get("/api/inbound").status_code == 401


def test_a_non_standard_bounce_must_come_from_a_mail_system(env: Callable[..., None]) -> None:
    """Exim's plain-text bounce is acted on from Mailer-Daemon with a null sender; the same text sent by a
    person (a forwarded bounce, say) is kept for a person and bounces nobody."""
    [sent] = sent_campaign(1)
    raw = sample("exim_failed", **sent.values())
    forwarded = raw.replace(b"Return-path: <>", b"Return-path: <dana@example.org>", 1).replace(
        b"From: Mail Delivery System <Mailer-Daemon@relay.example.net>", b"From: Dana <dana@example.org>", 1)
    row = take_in(forwarded, channel="imap")
    assert row.kind is InboundKind.unclassified
    assert subscriber_row(sent.email).status is Status.confirmed
    row = take_in(raw, channel="imap")
    assert (row.kind, row.severity) == (InboundKind.bounce, "hard")
    assert subscriber_row(sent.email).status is Status.bounced


def test_a_message_that_breaks_processing_is_kept_not_lost(env: Callable[..., None]) -> None:
    """If reading a stored event fails (here: a corrupt webhook row), the row becomes unclassified with the
    error, instead of staying pending or vanishing."""
    from mailer import inbound

    inbound_id = inbound.receive(channel="ses", raw=b"{not json", source_ref="ses:broken", subject="",
                                 dispatch=False)
    assert inbound_id is not None
    assert inbound.process(inbound_id) == "unclassified"
    with session_scope() as session:
        row = session.get(InboundMessage, inbound_id)
        assert row is not None
        assert row.detail.startswith("Processing failed (JSONDecodeError")


def test_the_tick_requeues_messages_whose_task_was_lost(env: Callable[..., None]) -> None:
    """A stored message still pending after two minutes (its task was lost) is processed after the next tick."""
    from mailer import campaigns, inbound, queue

    [sent] = sent_campaign(1)
    inbound_id = inbound.receive(channel="smtp", raw=sample("gmail_user_unknown", **sent.values()), dispatch=False)
    campaigns.tick()
    queue.drain()
    assert subscriber_row(sent.email).status is Status.confirmed  # Too recent: its own task may still come.
    with session_scope() as session:
        session.execute(update(InboundMessage).where(InboundMessage.id == inbound_id)
                        .values(received_at=utcnow() - timedelta(minutes=3)))
    campaigns.tick()
    queue.drain()
    assert subscriber_row(sent.email).status is Status.bounced
