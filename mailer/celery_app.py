"""The Celery application, configured from mailer's settings. `worker.py` exposes it to `celery -A worker`."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from mailer.config import BROKER_VISIBILITY_TIMEOUT, get_settings


def make_app(broker_url: str | None = None) -> Celery:
    app = Celery("mailer", broker=broker_url or get_settings().broker_url or "memory://", include=["mailer.tasks"])
    app.conf.update(
        # A task is acknowledged only after it ran, so a worker killed mid-task leaves it for another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redis re-delivers unacknowledged tasks after this many seconds; MAILER_TASK_SECONDS is held to a third.
        broker_transport_options={"visibility_timeout": BROKER_VISIBILITY_TIMEOUT},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # A worker killed mid-task is told apart from a failing task, and the task goes back at most a few times.
        task_acks_on_failure_or_timeout=True,
        beat_schedule={"mailer-tick": {"task": "mailer.tick", "schedule": get_settings().tick_seconds}},
    )
    return app


@lru_cache(maxsize=4)
def client_for(broker_url: str) -> Celery:
    """An app that sends tasks by name to a broker; the web process never needs the task code loaded."""
    return make_app(broker_url)


app = make_app()
