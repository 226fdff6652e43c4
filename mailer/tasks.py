"""Thin Celery tasks: ids in, one call into mailer, retry policy in the decorator."""

from __future__ import annotations

from mailer import campaigns, delivery, notices
from mailer.celery_app import app


@app.task(  # type: ignore[untyped-decorator]
    name="mailer.send_notice",
    autoretry_for=(notices.TemporaryFailure,),
    retry_backoff=True,
    retry_backoff_max=600,
    max_retries=8,
)
def send_notice(notice_id: int) -> str:
    return notices.send_notice(notice_id)


@app.task(name="mailer.run_campaign")  # type: ignore[untyped-decorator]
def run_campaign(campaign_id: int) -> str:
    # No retry here: the tick restarts a campaign whose loop stopped, and claims make reruns safe.
    return delivery.run_campaign(campaign_id)


@app.task(name="mailer.tick", ignore_result=True)  # type: ignore[untyped-decorator]
def tick() -> dict[str, int]:
    return campaigns.tick()
