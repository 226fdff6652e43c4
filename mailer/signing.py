"""Optional DKIM signing with dkimpy (MAILER_DKIM_DOMAIN, MAILER_DKIM_SELECTOR, MAILER_DKIM_PRIVATE_KEY)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import dkim

from mailer.config import Settings

# The signature covers what a receiver shows and what one-click unsubscribe relies on.
SIGNED_HEADERS = [b"From", b"To", b"Subject", b"Date", b"Message-ID", b"List-Unsubscribe",
                  b"List-Unsubscribe-Post", b"List-Id", b"MIME-Version", b"Content-Type"]


@lru_cache(maxsize=2)
def _key(path: Path) -> bytes:
    return path.read_bytes()


def sign(message: bytes, settings: Settings) -> bytes:
    """The message with a DKIM-Signature header in front, or unchanged when DKIM is not configured."""
    if not settings.dkim_enabled or settings.dkim_private_key is None:
        return message
    signature = dkim.sign(
        message,
        settings.dkim_selector.encode(),
        settings.dkim_domain.encode(),
        _key(settings.dkim_private_key),
        include_headers=SIGNED_HEADERS,
        linesep=b"\r\n",
    )
    return bytes(signature) + message
