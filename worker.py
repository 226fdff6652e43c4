"""The Celery app: `celery -A worker worker` runs mailer's tasks on MAILER_BROKER_URL."""

from mailer.celery_app import app
from mailer.logs import configure

configure()

__all__ = ["app"]
