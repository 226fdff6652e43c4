"""Signed, purpose-bound tokens for the links in mails and the forms on public pages.

Two kinds, both HMAC-signed with a key derived from MAILER_SECRET_KEY and the purpose, and both
checked in constant time, so a token made for one purpose never verifies as another:

* Timed tokens (confirm, csrf, login) are itsdangerous signatures over a small JSON payload with a time.
  Confirm tokens carry a nonce that the subscriber row keeps until confirmation, so they work once.
  The admin sign-in form's token is bound to a pre-session cookie instead of a subscriber.
* Link tokens (unsubscribe, preferences) never expire and go into every mail, so they are made on
  the sending hot path: `<id>.<HMAC-SHA256 truncated to 128 bits>`, base64url, a few microseconds
  each (itsdangerous takes about 40). The same reader always gets the same link.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import secrets
from functools import lru_cache
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from mailer.config import get_settings
from mailer.errors import BadToken, ExpiredToken


class Purpose(enum.StrEnum):
    confirm = "confirm"
    unsubscribe = "unsubscribe"
    preferences = "preferences"
    csrf = "csrf"
    login = "login"


# Links that never expire carry no time, so a reader's unsubscribe link is the same in every mail.
LINKS = {Purpose.unsubscribe, Purpose.preferences}
SIGNATURE_BYTES = 16


@lru_cache(maxsize=16)
def _link_key(secret: str, purpose: Purpose) -> bytes:
    return hmac.new(secret.encode(), f"mailer.link.{purpose.value}".encode(), hashlib.sha256).digest()


def _link_signature(purpose: Purpose, payload: bytes) -> bytes:
    key = _link_key(get_settings().signing_key(), purpose)
    return hmac.new(key, payload, hashlib.sha256).digest()[:SIGNATURE_BYTES]


def _make_link(purpose: Purpose, subscriber_id: int) -> str:
    payload = str(subscriber_id).encode()
    return f"{subscriber_id}.{base64.urlsafe_b64encode(_link_signature(purpose, payload)).decode().rstrip('=')}"


def _read_link(purpose: Purpose, token: str) -> int:
    number, _, signature = token.partition(".")
    if not number.isdigit() or len(number) > 18 or len(signature) != 22:
        raise BadToken("This link is not valid.")
    try:
        given = base64.urlsafe_b64decode(signature + "==")
    except ValueError:
        raise BadToken("This link is not valid.") from None
    if not hmac.compare_digest(given, _link_signature(purpose, number.encode())):
        raise BadToken("This link is not valid.")
    return int(number)


def _serializer(purpose: Purpose) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(get_settings().signing_key(), salt=f"mailer.{purpose.value}")


def make(purpose: Purpose, subscriber_id: int, *extra: Any) -> str:
    if purpose in LINKS:
        return _make_link(purpose, subscriber_id)
    return _serializer(purpose).dumps([subscriber_id, *extra])


def read(purpose: Purpose, token: str, *, max_age: float | None = None) -> list[Any]:
    """Return the payload `[subscriber_id, *extra]`, or raise BadToken / ExpiredToken."""
    if purpose in LINKS:
        return [_read_link(purpose, token)]
    serializer = _serializer(purpose)
    try:
        payload = serializer.loads(token, max_age=None if max_age is None else max(1, round(max_age)))
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


_ADDRESS_KEY = "mailer.address"
ADDRESS_SIGNATURE_BYTES = 10


@lru_cache(maxsize=4)
def _address_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _ADDRESS_KEY.encode(), hashlib.sha256).digest()


def address_signature(payload: str) -> str:
    """A signature for a tagged mail address (addresses.py): 80 bits as 16 lower-case base32 letters."""
    digest = hmac.new(_address_key(get_settings().signing_key()), payload.encode(), hashlib.sha256).digest()
    return base64.b32encode(digest[:ADDRESS_SIGNATURE_BYTES]).decode().lower()


def check_address_signature(payload: str, signature: str) -> bool:
    return hmac.compare_digest(address_signature(payload), signature.lower())


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


def _login_binding(nonce: str) -> str:
    # The page carries a digest of the cookie, not the cookie itself.
    return hashlib.sha256(nonce.encode()).hexdigest()[:32]


def login_form_token(nonce: str) -> str:
    """The admin sign-in form's CSRF token, bound to the browser's pre-session cookie `nonce`."""
    return _serializer(Purpose.login).dumps(_login_binding(nonce))


def check_login_form_token(token: str, nonce: str, *, max_age: float) -> None:
    """Raise BadToken unless `token` came from our sign-in form, for this cookie, within `max_age` seconds."""
    try:
        bound = _serializer(Purpose.login).loads(token, max_age=max(1, round(max_age)))
    except (BadSignature, UnicodeError, ValueError):
        raise BadToken("This sign-in form has expired or did not come from this site.") from None
    if not nonce or not isinstance(bound, str) or not hmac.compare_digest(bound, _login_binding(nonce)):
        raise BadToken("This sign-in form has expired or did not come from this site.")


def urls(subscriber_id: int) -> dict[str, str]:
    """The reader's own links, as they appear in every mail."""
    from mailer.addresses import unsubscribe_mailto

    base = get_settings().base_url
    return {
        "unsubscribe_url": f"{base}/unsubscribe/{unsubscribe_token(subscriber_id)}",
        "preferences_url": f"{base}/preferences/{preferences_token(subscriber_id)}",
        "unsubscribe_mailto": unsubscribe_mailto(subscriber_id),
    }
