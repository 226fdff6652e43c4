"""Sending limits: messages per second, per recipient domain, and connections, in one process and
across the deployment through a real Redis."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
from fastapi.testclient import TestClient

from mailer.config import Settings
from mailer.throttle import Leases, RedisBucket
from tests.campaign_helpers import create, wait_until
from tests.conftest import SmtpSink, make_readers

REDIS = "redis://127.0.0.1:6379/14"


def test_a_campaign_keeps_to_the_server_and_domain_rates(admin: TestClient, smtp: SmtpSink,
                                                        env: Callable[..., None]) -> None:
    """At MAILER_DOMAIN_RATE=5, twelve mails to one domain take at least 1.4 s (5 at once, then 5 a second)."""
    env(domain_rate="5")
    make_readers(12)
    started = time.monotonic()
    campaign_id = create(admin)
    assert admin.post(f"/api/campaigns/{campaign_id}/send").status_code == 202
    done = wait_until(admin, campaign_id)
    elapsed = time.monotonic() - started
    assert done["counts"]["sent"] == 12
    assert len(smtp.wait_for(12)) == 12
    assert elapsed >= 1.3, f"twelve mails at 5/s took only {elapsed:.2f} s"


def _take(key: str, rate: float, count: int, ready: Any, times: Any) -> None:
    client = redis.Redis.from_url(REDIS)
    bucket = RedisBucket(client, key, rate)

    async def run() -> None:
        for _ in range(count):
            await bucket.take()

    # Both processes start taking together, so their start-up time is not counted as waiting.
    ready.wait(timeout=30)
    started = time.time()
    asyncio.run(run())
    times.put((started, time.time()))


def test_the_rate_holds_across_worker_processes() -> None:
    """Two processes sharing a 10/s bucket in Redis take 30 tokens in at least 1.8 s, not 0.5 s each."""
    key = f"mailer:test:{uuid.uuid4().hex}"
    context = multiprocessing.get_context("spawn")
    ready, times = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_take, args=(key, 10.0, 15, ready, times)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    spans = [times.get(timeout=5) for _ in processes]
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    # Ten tokens are there at once; twenty more come at ten a second. Unshared, each process would be
    # done in half a second.
    assert elapsed >= 1.8, f"30 tokens at 10/s shared took {elapsed:.2f} s"


def test_connections_are_capped_across_the_deployment() -> None:
    """MAILER_SMTP_MAX_CONNECTIONS=4: loops get what is left, given-back leases are free again, dead ones run out."""
    settings = Settings(broker_url=REDIS, smtp_url=f"smtp://127.0.0.1:{uuid.uuid4().int % 60000 + 1}",
                        smtp_max_connections=4, secret_key="test-secret-key-0123456789abcdef")
    leases = Leases(settings)
    assert leases.take(3, "worker-a") == 3
    assert leases.take(3, "worker-b") == 1
    assert leases.take(2, "worker-c") == 0
    leases.give_back("worker-a", 3)
    assert leases.take(3, "worker-c") == 3
    # A worker killed without giving back: its leases end by themselves; a live one renews its own.
    leases.seconds = 0.4
    leases.give_back("worker-b", 1)
    leases.give_back("worker-c", 3)
    assert leases.take(2, "worker-d") == 2
    assert leases.take(2, "worker-live") == 2
    time.sleep(0.25)
    leases.renew("worker-live", 2)
    time.sleep(0.25)
    assert leases.take(4, "worker-e") == 2, "the dead worker's leases ended, the renewed ones hold"
    unlimited = Leases(Settings(broker_url="", smtp_max_connections=4, secret_key="test-secret-key-0123456789abcdef"))
    assert unlimited.take(6, "worker-f") == 6


def test_a_redis_failure_at_the_start_of_a_send_loop_gives_everything_back(admin: TestClient,
                                                                          env: Callable[..., None]) -> None:
    """When the leases cannot be taken (Redis down), the process's connection slots and the claim token are
    given back, so the next loop of this process can send."""
    import pytest

    from mailer import campaigns, delivery
    from mailer.db import session_scope
    from mailer.models import WorkerBeat
    from mailer.throttle import connections

    make_readers(1)
    campaign_id = create(admin)
    env(broker_url="redis://127.0.0.1:9/0", smtp_max_connections="2")
    with session_scope() as session:
        campaigns.start(session, campaign_id)
    before = connections.used
    with pytest.raises(redis.ConnectionError):
        delivery.run_campaign(campaign_id)
    assert connections.used == before
    with session_scope() as session:
        assert session.query(WorkerBeat).count() == 0
