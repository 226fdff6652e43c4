"""The Celery app: `celery -A worker worker` runs mailer's tasks on MAILER_BROKER_URL."""

import sys

from pydantic import ValidationError

from mailer.config import describe_error, get_settings

try:
    get_settings()
except ValidationError as error:
    # One sentence naming the variable, as every mailer command gives, not an import traceback.
    print(f"Configuration error: {describe_error(error)}", file=sys.stderr)
    sys.exit(2)

# The settings are checked before the app that reads them is imported.
from mailer.celery_app import app
from mailer.logs import configure

configure()

__all__ = ["app"]
