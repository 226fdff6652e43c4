"""Signed, purpose-bound tokens for the links in mails and the forms on public pages.

A token is an itsdangerous signature (HMAC-SHA1 via a derived key, checked in constant time) over a
small payload. The purpose is the salt, so a token made for one purpose never verifies as another.
Confirm tokens carry a nonce that the subscriber row keeps until confirmation, so they work once.
"""

from __future__ import annotations

import enum
import secrets
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeSerializer, URLSafeTimedSerializer

from mailer.config import get_settings
from mailer.errors import BadToken, ExpiredToken


class Purpose(enum.StrEnum):
    confirm = "confirm"
    unsubscribe = "unsubscribe"
    preferences = "preferences"
    csrf = "csrf"


# Links that never expire carry no time, so a reader's unsubscribe link is the same in every mail.
TIMELESS = {Purpose.unsubscribe, Purpose.preferences}


def _serializer(purpose: Purpose) -> URLSafeSerializer | URLSafeTimedSerializer:
    if purpose in TIMELESS:
        return URLSafeSerializer(get_settings().signing_key(), salt=f"mailer.{purpose.value}")
    return URLSafeTimedSerializer(get_settings().signing_key(), salt=f"mailer.{purpose.value}")


def make(purpose: Purpose, subscriber_id: int, *extra: Any) -> str:
    return _serializer(purpose).dumps([subscriber_id, *extra])


def read(purpose: Purpose, token: str, *, max_age: float | None = None) -> list[Any]:
    """Return the payload `[subscriber_id, *extra]`, or raise BadToken / ExpiredToken."""
    serializer = _serializer(purpose)
    try:
        if isinstance(serializer, URLSafeTimedSerializer):
            payload = serializer.loads(token, max_age=None if max_age is None else max(1, round(max_age)))
        else:
            payload = serializer.loads(token)
    except SignatureExpired as expired:
        payload = serializer.load_payload(expired.payload) if expired.payload is not None else None
        if isinstance(payload, list) and payload and isinstance(payload[0], int):
            raise ExpiredToken(payload[0]) from None
        raise BadToken("This link is not valid.") from None
    except (BadSignature, UnicodeError, ValueError):
        raise BadToken("This link is not valid.") from None
    if not isinstance(payload, list) or not payload or not isinstance(payload[0], int):
        raise BadToken("This link is not valid.")
    return payload


def make_nonce() -> str:
    return secrets.token_hex(6)


def confirm_token(subscriber_id: int, nonce: str) -> str:
    return make(Purpose.confirm, subscriber_id, nonce)


def unsubscribe_token(subscriber_id: int) -> str:
    return make(Purpose.unsubscribe, subscriber_id)


def preferences_token(subscriber_id: int) -> str:
    return make(Purpose.preferences, subscriber_id)


def csrf_token(subscriber_id: int) -> str:
    return make(Purpose.csrf, subscriber_id)


def check_csrf(token: str, subscriber_id: int) -> None:
    # A form older than a day is stale; the page can be reloaded from the link in any mail.
    payload = read(Purpose.csrf, token, max_age=24 * 3600)
    if payload[0] != subscriber_id:
        raise BadToken("This form does not belong to this subscription; reload the page and try again.")


def urls(subscriber_id: int) -> dict[str, str]:
    """The reader's own links, as they appear in every mail."""
    base = get_settings().base_url
    return {
        "unsubscribe_url": f"{base}/unsubscribe/{unsubscribe_token(subscriber_id)}",
        "preferences_url": f"{base}/preferences/{preferences_token(subscriber_id)}",
    }
