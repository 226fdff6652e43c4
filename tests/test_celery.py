"""The queued path: with MAILER_BROKER_URL set, a real `celery -A worker worker` sends the mails."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from mailer.models import Status
from mailer.web.app import create_app
from tests.conftest import SmtpSink, base_env, subscriber_row
from tests.mails import confirm_link, header_unsubscribe_link

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("MAILER_TEST_REDIS", "redis://127.0.0.1:6379/15")


@pytest.fixture
def worker(backend: str, smtp: SmtpSink, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Start a worker; the test calls the yielded function to stop it and read its log."""
    redis.Redis.from_url(BROKER).flushdb()
    env = {**os.environ, **base_env(backend, smtp.port, tmp_path / "outbox"), "MAILER_BROKER_URL": BROKER}
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "worker", "--pool=solo", "--loglevel=INFO",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )

    def stop() -> str:
        if process.poll() is None:
            process.terminate()
        return process.communicate(timeout=30)[0]

    yield stop
    stop()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_confirmation_and_welcome_go_through_a_real_celery_worker(
    env: Callable[..., None], smtp: SmtpSink, worker: Callable[[], str]
) -> None:
    """Sign-up and confirmation queue tasks on Redis; the worker process sends both mails over SMTP."""
    env(broker_url=BROKER)
    with TestClient(create_app(), base_url="https://news.example.org") as client:
        assert client.post("/subscribe", data={"email": "queued@example.org"}).status_code == 200
        [confirmation] = smtp.wait_for(1, timeout=60)
        assert client.post(confirm_link(confirmation)).status_code == 200
        welcome = smtp.wait_for(2, timeout=30)[1]
        assert welcome.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        client.post(header_unsubscribe_link(welcome))
    assert subscriber_row("queued@example.org").status is Status.unsubscribed
    log = worker()
    assert log.count("Task mailer.send_notice[") >= 4, log  # received and succeeded, twice
    assert "Traceback" not in log, log


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_an_unsubscribe_mail_is_processed_by_a_real_celery_worker(
    env: Callable[..., None], smtp: SmtpSink, worker: Callable[[], str]
) -> None:
    """The SMTP listener stores the mail and queues `process_inbound` with its id; the worker unsubscribes."""
    import re
    import smtplib
    import time

    from mailer.inbound_smtp import controller
    from tests.conftest import free_port, make_readers
    from tests.inbound_helpers import sample

    env(broker_url=BROKER)
    [reader_id] = make_readers(1, prefix="queued")
    from mailer import addresses

    mailto = addresses.unsubscribe_mailto(reader_id)
    assert re.fullmatch(r"unsubscribe\+u\d+-[a-z2-7]{16}@news\.example\.org", mailto)
    listener = controller("127.0.0.1", free_port())
    listener.start()
    try:
        with smtplib.SMTP("127.0.0.1", listener.port, timeout=10) as client:
            client.sendmail("queued0@example.org", [mailto],
                            sample("unsubscribe_request", to=mailto, rcpt="queued0@example.org"))
    finally:
        listener.stop()
    deadline = time.monotonic() + 60
    while subscriber_row("queued0@example.org").status is not Status.unsubscribed:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, worker()
        time.sleep(0.1)
    log = worker()
    assert "Task mailer.process_inbound[" in log, log
    assert "Traceback" not in log, log
