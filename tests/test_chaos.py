"""Chaos: real Celery workers on Redis are SIGKILLed and restarted mid-campaign; nothing is lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select

from mailer import campaigns, store, tokens
from mailer.db import session_scope
from mailer.models import Delivery, DeliveryState, Subscriber, utcnow
from mailer.subscriptions import hash_email
from mailer.web.app import create_app
from tests.campaign_helpers import create
from tests.conftest import ADMIN_TOKEN, SmtpSink, base_env, make_readers

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("MAILER_TEST_REDIS", "redis://127.0.0.1:6379/14")
SETTINGS = {"worker_timeout": "2", "heartbeat_seconds": "0.5", "batch_size": "40", "task_seconds": "3",
            "smtp_connections": "4", "smtp_rate": "700", "send_parallelism": "2"}


@pytest.fixture(params=["700", "0"], ids=["rate-limited", "unlimited"])
def settings(request: pytest.FixtureRequest) -> dict[str, str]:
    """With a rate limit each connection carries one mail at a time; without one, the next mail's envelope
    (and hand-over) rides behind the current mail, so two per connection may be handed over at a kill."""
    return {**SETTINGS, "smtp_rate": request.param}


@pytest.fixture
def workers(backend: str, smtp: SmtpSink, tmp_path: Path,
            settings: dict[str, str]) -> Iterator[Callable[[], subprocess.Popen[str]]]:
    """Start Celery worker processes on demand; all are stopped at the end."""
    redis.Redis.from_url(BROKER).flushdb()
    env = {**os.environ, **base_env(backend, smtp.port, tmp_path / "outbox"), "MAILER_BROKER_URL": BROKER,
           **{f"MAILER_{k.upper()}": v for k, v in settings.items()}}
    started: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool=solo", "--loglevel=WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def sent_count(campaign_id: int) -> int:
    with session_scope() as session:
        return store.delivery_counts(session, campaign_id)["sent"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_sigkilled_workers_lose_and_double_nothing(env: Callable[..., None], smtp: SmtpSink,
                                                   workers: Callable[[], subprocess.Popen[str]],
                                                   settings: dict[str, str]) -> None:
    """3,000 readers, two workers, three SIGKILLs with restarts, readers leaving mid-campaign: every eligible
    reader is in the sink exactly once (a mail the sweeper marks `unknown` at most once), and nobody who
    left is handed a mail after their change committed."""
    env(broker_url=BROKER, **settings)
    ids = make_readers(3000)
    running = [workers(), workers()]
    left: dict[int, datetime] = {}
    with TestClient(create_app(), base_url="https://news.example.org",
                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        campaign_id = create(admin)
        assert admin.post(f"/api/campaigns/{campaign_id}/send").status_code == 202
        deadline = time.monotonic() + 240
        kills = 0
        swept = 0
        last_tick = 0.0
        while True:
            progress = admin.get(f"/api/campaigns/{campaign_id}").json()
            if progress["status"] == "finished":
                break
            assert time.monotonic() < deadline, progress
            sent = progress["counts"]["sent"]
            if kills < 3 and sent > 400 * (kills + 1):
                victim = running.pop(kills % len(running))
                os.kill(victim.pid, signal.SIGKILL)
                victim.wait()
                with session_scope() as session:
                    swept += len(session.scalars(select(Delivery.id).where(
                        Delivery.state == DeliveryState.sending,
                        Delivery.claimed_by.contains(f":{victim.pid}:"))).all())
                running.append(workers())
                kills += 1
            if sent > 300 and len(left) < 30:
                # Readers near the end of the list leave while their mail is still to come.
                for subscriber_id in ids[-200 + len(left) * 5:][:1]:
                    if len(left) % 2:
                        admin.post(f"/unsubscribe/{tokens.unsubscribe_token(subscriber_id)}")
                    else:
                        with session_scope() as session:
                            email = session.get(Subscriber, subscriber_id).email_key  # type: ignore[union-attr]
                            store.add_suppression(session, email_hash=hash_email(email), email=email,
                                                  reason="complaint", detail="chaos test")
                    left[subscriber_id] = utcnow()
            if time.monotonic() - last_tick > 1:
                campaigns.tick()
                last_tick = time.monotonic()
            time.sleep(0.1)
    assert kills == 3
    assert swept > 0, "the kills left claims behind, which the sweeper had to hand back"

    with session_scope() as session:
        query = select(Delivery).where(Delivery.campaign_id == campaign_id)
        rows = {d.subscriber_id: d for d in session.scalars(query)}
        emails = dict(session.execute(select(Subscriber.id, Subscriber.email_key)).all())
    received = Counter(m.recipients[0] for m in smtp.messages)
    assert len(rows) == 3000
    unknown = [s for s, d in rows.items() if d.state is DeliveryState.unknown]
    in_flight = int(settings["smtp_connections"]) * (1 if float(settings["smtp_rate"]) else 2)
    assert len(unknown) <= 3 * in_flight, "at most the mails in flight at each kill"
    for subscriber_id, delivery in rows.items():
        copies = received[emails[subscriber_id]]
        if delivery.state is DeliveryState.sent:
            assert copies == 1, (emails[subscriber_id], copies)
        elif delivery.state is DeliveryState.unknown:
            assert copies <= 1
        else:
            assert delivery.state is DeliveryState.skipped, delivery.state
            assert subscriber_id in left
            assert copies == 0
    for subscriber_id, when in left.items():
        handed = rows[subscriber_id].handed_over_at
        assert handed is None or handed <= when, "a mail was handed over after the reader left"
    print(f"swept {swept} claims; unknown {len(unknown)}; left {len(left)}")
    assert sum(received.values()) == sum(1 for d in rows.values() if d.state is DeliveryState.sent) + sum(
        received[emails[s]] for s in unknown)
