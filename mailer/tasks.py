"""Thin Celery tasks: ids in, one call into mailer, retry policy in the decorator.

Tasks are acknowledged late and rejected (re-queued) when their worker dies, so a task that kills
its worker every time (a poison message) would come back for ever. `bounded` counts each task's
starts in Redis and drops it after MAX_STARTS, with an error in the log; the database still holds
the work, and the periodic tick queues it afresh.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from mailer import campaigns, delivery, imap, imports, inbound, notices
from mailer.celery_app import app
from mailer.config import get_settings

log = logging.getLogger(__name__)

MAX_STARTS = 3
F = TypeVar("F", bound=Callable[..., Any])


def _starts(task_id: str) -> int:
    broker = get_settings().broker_url
    if not task_id or not broker.startswith(("redis://", "rediss://")):
        return 1
    import redis

    client = redis.Redis.from_url(broker)
    key = f"mailer:task-starts:{task_id}"
    count = int(client.incr(key))
    client.expire(key, 86_400)
    return count


def bounded(function: F) -> F:
    @functools.wraps(function)
    def wrapper(self: Any, *args: Any) -> Any:
        # A deliberate retry is a new attempt with its own count; only re-deliveries of one attempt add up.
        starts = _starts(f"{self.request.id}:{self.request.retries or 0}" if self.request.id else "")
        if starts > MAX_STARTS:
            log.error("dropping task %s%s: started %d times, its worker died each time", self.name, args, starts)
            return "dropped"
        return function(self, *args)

    return wrapper  # type: ignore[return-value]


@app.task(  # type: ignore[untyped-decorator]
    bind=True,
    name="mailer.send_notice",
    autoretry_for=(notices.TemporaryFailure,),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=8,
)
@bounded
def send_notice(self: Any, notice_id: int) -> str:
    return notices.send_notice(notice_id)


@app.task(bind=True, name="mailer.run_campaign")  # type: ignore[untyped-decorator]
@bounded
def run_campaign(self: Any, campaign_id: int) -> str:
    # No retry here: the tick restarts a campaign whose loop stopped, and claims make reruns safe.
    return delivery.run_campaign(campaign_id)


@app.task(name="mailer.tick", ignore_result=True)  # type: ignore[untyped-decorator]
def tick() -> dict[str, int]:
    return campaigns.tick()


@app.task(bind=True, name="mailer.import_subscribers")  # type: ignore[untyped-decorator]
@bounded
def import_subscribers(self: Any, job_id: int) -> None:
    # Chunks commit with their mark, so a rerun goes on after the last committed chunk.
    imports.run(job_id)


@app.task(bind=True, name="mailer.process_inbound")  # type: ignore[untyped-decorator]
@bounded
def process_inbound(self: Any, inbound_id: int) -> str:
    # No retry: a row that fails is kept as unclassified; one whose task was lost is re-queued by the tick.
    return inbound.process(inbound_id)


@app.task(bind=True, name="mailer.poll_mailbox", ignore_result=True)  # type: ignore[untyped-decorator]
@bounded
def poll_mailbox(self: Any) -> dict[str, int]:
    return imap.poll_task()
