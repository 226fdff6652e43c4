"""Every SMTP failure mode ends in its documented delivery state (README, "Delivery states")."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailer import campaigns
from mailer.db import session_scope
from mailer.models import DeliveryState, Notice, NoticeKind, NoticeState, Status, Suppression
from tests import faultsmtp
from tests.campaign_helpers import create, deliveries, wait_until
from tests.conftest import make_readers, sign_up, subscriber_row
from tests.faultsmtp import FaultySmtp, start_faulty


@pytest.fixture(autouse=True, params=["one-by-one", "pipelining"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every case runs against a server without PIPELINING (each command waits for its reply) and one
    with it (MAIL FROM, RCPT TO and DATA in one write, the hand-over check beside them)."""
    monkeypatch.setattr(faultsmtp, "PIPELINING", request.param == "pipelining")
    return bool(faultsmtp.PIPELINING)


def suppression_reasons() -> dict[str, str]:
    """The suppression list, address to reason."""
    with session_scope() as session:
        return {row.email or "": row.reason for row in session.scalars(select(Suppression))}


@pytest.fixture
def faulty(env: Callable[..., None]) -> Iterator[FaultySmtp]:
    rules = {
        "reader0@example.org": ["ok"],
        "reader1@example.org": ["550"],
        "reader2@example.org": ["550-policy"],
        "reader3@example.org": ["451"],
        "reader4@example.org": ["452", "452"],
        "reader5@example.org": ["421"],
        "reader6@example.org": ["554-data"],
        "reader7@example.org": ["drop"],
        "reader8@example.org": ["hang"],
        "reader9@example.org": ["421", "421"],
        "reader10@example.org": ["drop-rcpt"],
        "reader11@example.org": ["421-data"],
    }
    handler, controller = start_faulty(rules=rules, hang_seconds=5)
    env(smtp_url=f"smtp://127.0.0.1:{handler.port}", smtp_timeout="1", retry_base_seconds="0.3",
        pause_failure_rate="1", smtp_connections="3", batch_size="4")
    yield handler
    controller.stop()


def test_each_failure_mode_ends_in_its_state(admin: TestClient, faulty: FaultySmtp) -> None:
    """250 sent; 5xx failed (5.1.1 also suppressed); 4xx retried; a drop before DATA retried at once on a
    fresh connection; drop and hang after DATA unknown."""
    make_readers(12)
    campaign_id = create(admin)
    admin.post(f"/api/campaigns/{campaign_id}/send")
    done = wait_until(admin, campaign_id)
    rows = deliveries(campaign_id)
    state = {email.split("@")[0]: row.state.value for email, row in rows.items()}
    assert state == {
        "reader0": "sent",
        "reader1": "failed",
        "reader2": "failed",
        "reader3": "sent",      # 451, then accepted on the retry
        "reader4": "sent",      # 452 twice, then accepted
        "reader5": "sent",      # 421: a fresh connection at once, accepted there
        "reader6": "failed",    # 554 after the final dot
        "reader7": "unknown",   # the server took it and hung up before answering
        "reader8": "unknown",   # the server took it and never answered
        "reader9": "sent",      # 421 twice: deferred, then accepted
        "reader10": "sent",     # dropped at RCPT, before DATA: tried again at once on a fresh connection
        "reader11": "sent",     # 421 after the final dot: the server did not take it; deferred, then accepted
    }
    assert done["counts"]["sent"] == 7
    assert rows["reader1@example.org"].smtp_code == 550
    assert "5.1.1" in (rows["reader1@example.org"].smtp_text or "")
    assert rows["reader4@example.org"].attempts == 3
    assert rows["reader10@example.org"].attempts == 1  # The fresh connection is part of the same attempt.
    assert rows["reader11@example.org"].attempts == 2
    # A bad mailbox is suppressed and its reader marked bounced; a policy refusal is not about the address.
    assert subscriber_row("reader1@example.org").status is Status.bounced
    assert subscriber_row("reader2@example.org").status is Status.confirmed
    assert suppression_reasons() == {"reader1@example.org": "hard-bounce"}
    # The same policy as bounces that come back later: the 5.1.1 is a hard bounce; the 5.7.1 is a block,
    # which says nothing about the address and counts nothing against the reader.
    assert subscriber_row("reader2@example.org").bounce_score == 0
    assert subscriber_row("reader1@example.org").bounce_score == 0
    # Exactly what the server took: one copy each, none for refusals, and no resend of the unknowns.
    for number, copies in enumerate([1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1, 1]):
        assert faulty.count(f"reader{number}@example.org") == copies, number
    # A 421 is never followed by more commands on the same session: the client opened a new one.
    assert faulty.after_421 == []
    assert faulty.connections >= 4


def test_a_full_mailbox_at_send_time_is_one_soft_bounce(admin: TestClient, env: Callable[..., None]) -> None:
    """A 552 5.2.2 (mailbox full) to a campaign mail fails that delivery and adds one point to the reader's
    soft-bounce score; the reader stays confirmed and the address is not suppressed."""
    handler, controller = start_faulty(rules={"reader0@example.org": ["552"]})
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", pause_failure_rate="1")
        make_readers(2)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        wait_until(admin, campaign_id)
        rows = deliveries(campaign_id)
        assert (rows["reader0@example.org"].state.value, rows["reader0@example.org"].smtp_code) == ("failed", 552)
        assert rows["reader1@example.org"].state.value == "sent"
        full = subscriber_row("reader0@example.org")
        assert full is not None
        assert (full.status, full.bounce_score, full.last_bounce_at is not None) == (Status.confirmed, 1, True)
        assert suppression_reasons() == {}
        assert subscriber_row("reader1@example.org").bounce_score == 0  # type: ignore[union-attr]
        assert handler.count("reader0@example.org") == 0
    finally:
        controller.stop()


def test_a_bad_mailbox_reply_to_a_confirmation_mail_bounces_the_address(client: TestClient,
                                                                        env: Callable[..., None]) -> None:
    """A 550 5.1.1 to the confirmation mail of a sign-up fails that notice, marks the sign-up bounced and
    suppresses the address (a hard bounce), as the same reply to a campaign mail would."""
    handler, controller = start_faulty(rules={"typo@example.org": ["550"]})
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}")
        sign_up(client, "typo@example.org")
        with session_scope() as session:
            notice = session.scalars(select(Notice)).one()
            assert (notice.kind, notice.state) == (NoticeKind.confirm, NoticeState.failed)
            assert "550 5.1.1" in (notice.error or "")
        assert subscriber_row("typo@example.org").status is Status.bounced  # type: ignore[union-attr]
        assert suppression_reasons() == {"typo@example.org": "hard-bounce"}
        assert handler.count("typo@example.org") == 0
    finally:
        controller.stop()


def test_temporary_failures_fail_after_the_deadline(admin: TestClient, env: Callable[..., None]) -> None:
    """A 4xx that keeps coming is retried with backoff until the deadline, then the delivery fails."""
    handler, controller = start_faulty(rules={"reader0@example.org": ["451"] * 100})
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", retry_base_seconds="0.2",
            retry_deadline_hours=str(1.5 / 3600), pause_failure_rate="1")
        make_readers(1)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        wait_until(admin, campaign_id, timeout=30)
        row = deliveries(campaign_id)["reader0@example.org"]
        assert row.state.value == "failed"
        assert row.smtp_code == 451
        assert 2 <= row.attempts <= 8
    finally:
        controller.stop()


def test_unknown_is_resent_when_configured(admin: TestClient, env: Callable[..., None]) -> None:
    """With MAILER_RESEND_UNKNOWN=true a drop after DATA is retried, accepting the risk of a copy."""
    handler, controller = start_faulty(rules={"reader0@example.org": ["drop", "ok"]})
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", retry_base_seconds="0.2", resend_unknown="true",
            pause_failure_rate="1")
        make_readers(1)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        wait_until(admin, campaign_id)
        assert deliveries(campaign_id)["reader0@example.org"].state.value == "sent"
        assert handler.count("reader0@example.org") == 2
    finally:
        controller.stop()


def test_campaign_pauses_itself_when_too_many_fail(admin: TestClient, env: Callable[..., None]) -> None:
    """Past the failure threshold the campaign pauses and says why; what is left stays pending."""
    handler, controller = start_faulty(seed=7, rates={"550-policy": 1.0})
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", pause_failure_rate="0.5", pause_failure_window="40",
            batch_size="10")
        make_readers(200)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        paused = wait_until(admin, campaign_id, statuses=("paused",))
        assert paused["status_reason"].startswith("Paused automatically: 100% of the last")
        assert "550 5.7.1" in paused["status_reason"]
        assert paused["counts"]["pending"] > 100
    finally:
        controller.stop()


def test_refused_sender_pauses_and_blames_nobody(admin: TestClient, env: Callable[..., None]) -> None:
    """A 553 to MAIL FROM is the sender's problem: the campaign pauses with the reason, no reader is
    failed, suppressed or marked bounced, and resuming after the fix sends to everyone."""
    handler, controller = start_faulty(sender_reply="553 5.1.8 Sender address rejected: domain not found")
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", batch_size="10")
        make_readers(30)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        paused = wait_until(admin, campaign_id, statuses=("paused",))
        assert "refused the sender bounces@news.example.org (553 5.1.8" in paused["status_reason"]
        assert paused["counts"]["failed"] == 0
        for email, row in deliveries(campaign_id).items():
            assert row.state.value in {"pending", "deferred"}, (email, row.state)
            assert subscriber_row(email).status is Status.confirmed
        handler.sender_reply = ""
        env(retry_base_seconds="0.2")
        admin.post(f"/api/campaigns/{campaign_id}/resume")
        done = wait_until(admin, campaign_id)
        assert done["counts"]["sent"] == 30
    finally:
        controller.stop()


def test_failover_to_the_next_server(admin: TestClient, env: Callable[..., None]) -> None:
    """With several servers in MAILER_SMTP_URL, a server that refuses connections is skipped."""
    from tests.conftest import free_port

    handler, controller = start_faulty()
    try:
        dead = free_port()
        env(smtp_url=f"smtp://127.0.0.1:{dead},smtp://127.0.0.1:{handler.port}", smtp_timeout="2")
        make_readers(12)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        done = wait_until(admin, campaign_id)
        assert done["counts"]["sent"] == 12
        assert sum(handler.count(f"reader{i}@example.org") for i in range(12)) == 12
    finally:
        controller.stop()


def test_421_to_mail_from_reconnects_and_blames_nobody(admin: TestClient, env: Callable[..., None]) -> None:
    """A 421 to MAIL FROM is the server closing the session, not a refused sender: the client reconnects,
    defers what was refused twice, and the campaign finishes with one copy each, never paused."""
    closing = "421 4.3.2 Service shutting down"
    handler, controller = start_faulty(sender_replies=[closing] * 3)
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", retry_base_seconds="0.2", smtp_connections="2",
            batch_size="5", pause_failure_rate="1")
        make_readers(10)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        done = wait_until(admin, campaign_id)
        assert (done["status"], done["status_reason"]) == ("finished", "")
        assert done["counts"]["sent"] == 10
        rows = deliveries(campaign_id)
        # Three 421s on three sessions: at least one mail met two of them in a row and was deferred.
        assert max(row.attempts for row in rows.values()) == 2
        for number in range(10):
            assert handler.count(f"reader{number}@example.org") == 1, number
        assert handler.after_421 == []
        assert handler.connections >= 4
    finally:
        controller.stop()


def test_backoff_doubles_with_each_retry(admin: TestClient, env: Callable[..., None]) -> None:
    """Each 4xx defers the delivery twice as long as the one before (MAILER_RETRY_BASE_SECONDS × 2^(n−1)),
    as the delivery row's next_attempt_at shows after each attempt."""
    handler, controller = start_faulty(rules={"reader0@example.org": ["451", "451", "451"]})
    base = 0.3
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", retry_base_seconds=str(base), pause_failure_rate="1")
        make_readers(1)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        delays: dict[int, float] = {}
        deadline, last_tick = time.monotonic() + 30, 0.0
        while True:
            row = deliveries(campaign_id)["reader0@example.org"]
            if row.state is DeliveryState.sent:
                break
            if row.state is DeliveryState.deferred and row.next_attempt_at and row.claimed_at:
                delays[row.attempts] = (row.next_attempt_at - row.claimed_at).total_seconds()
            assert time.monotonic() < deadline, f"still {row.state} after {row.attempts} attempts"
            if time.monotonic() - last_tick > 0.1:
                campaigns.tick()
                last_tick = time.monotonic()
            time.sleep(0.02)
        assert sorted(delays) == [1, 2, 3]
        for attempts, delay in delays.items():
            # The delay runs from the answer, a moment after the claim: never shorter, barely longer.
            expected = base * 2 ** (attempts - 1)
            assert expected <= delay < expected + 0.25, (attempts, delay)
        assert handler.count("reader0@example.org") == 1
    finally:
        controller.stop()


# The seeded mix's first answers and the state each must end in (README, "Delivery states").
MIX = {"421": 0.05, "451": 0.05, "452": 0.05, "550": 0.05, "drop": 0.03, "hang": 0.02}
EXPECTED = {"ok": "sent", "421": "sent", "451": "sent", "452": "sent", "550": "failed", "drop": "unknown",
            "hang": "unknown"}


def test_seeded_mix_ends_every_delivery_in_its_state(admin: TestClient, env: Callable[..., None]) -> None:
    """A campaign of 300 readers against a seeded mix of 421, 451, 452, 550, drops and hangs ends with
    each delivery in the state its first answer calls for, and no reader with two accepted copies."""
    readers = 300
    handler, controller = start_faulty(seed=20261125, rates=MIX, hang_seconds=2)
    try:
        env(smtp_url=f"smtp://127.0.0.1:{handler.port}", smtp_timeout="1", retry_base_seconds="0.2",
            pause_failure_rate="1", smtp_connections="4", batch_size="50")
        make_readers(readers)
        addresses = [f"reader{number}@example.org" for number in range(readers)]
        first = {address: handler.mode(address, 0) for address in addresses}
        # The seed draws every mode, so each one is exercised.
        assert set(first.values()) == set(EXPECTED)
        campaign_id = create(admin)
        admin.post(f"/api/campaigns/{campaign_id}/send")
        done = wait_until(admin, campaign_id, timeout=120)
        rows = deliveries(campaign_id)
        assert {a: rows[a].state.value for a in addresses} == {a: EXPECTED[first[a]] for a in addresses}
        for address in addresses:
            # The server kept what it took: sent mails, and the ones dropped or hung after the message.
            assert handler.count(address) == (0 if first[address] == "550" else 1), (address, first[address])
        assert done["counts"]["sent"] == sum(1 for mode in first.values() if EXPECTED[mode] == "sent")
        assert set(suppression_reasons()) == {a for a in addresses if first[a] == "550"}
        assert handler.after_421 == []
    finally:
        controller.stop()
