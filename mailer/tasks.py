"""Thin Celery tasks: ids in, one call into mailer, retry policy in the decorator."""

from __future__ import annotations

from mailer import notices
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
