"""Readable logs for the CLI, the web server and workers."""

from __future__ import annotations

import logging

from mailer.config import get_settings


def configure() -> None:
    logging.basicConfig(
        level=get_settings().log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
