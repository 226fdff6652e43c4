"""Addresses that name what they are about: each delivery's return path and each reader's mailto unsubscribe,
and the Message-ID of each campaign mail.

    bounces+d123-k3x9…@news.example.org       the return path (SMTP MAIL FROM) of delivery 123 (VERP)
    bounces+n45-…@news.example.org            the return path of transactional notice 45
    unsubscribe+u7-…@news.example.org         the List-Unsubscribe mailto of subscriber 7
    <c9.d123.k3x9…@news.example.org>          the Message-ID of delivery 123 of campaign 9

A bounce is sent to the return path, so it names its delivery even when the bouncing server quotes
nothing of the original. The token after the kind and number is an HMAC (tokens.address_signature),
so nobody can make an address that unsubscribes or bounces someone else. Tokens are lower-case base32:
some servers change the case of local parts, and a case-sensitive token would then fail to verify.

A Message-ID carries the same kind of signature over its ids: the ids alone are sequential, and a
report quoting a guessed one must not act on the reader it names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from mailer import tokens
from mailer.config import get_settings

KINDS = {"d": "delivery", "n": "notice", "u": "subscriber"}
_TOKEN = re.compile(r"([dnu])(\d{1,18})-([a-z2-7]{16})")
_MESSAGE_ID = re.compile(r"<c(\d{1,18})\.d(\d{1,18})\.([a-z2-7]{16})@([^<>@\s]+)>", re.IGNORECASE)


@dataclass(frozen=True)
class Tagged:
    """What a tagged address names: ('delivery' | 'notice' | 'subscriber', id)."""

    kind: str
    id: int


def _token(kind: str, number: int) -> str:
    return f"{kind}{number}-{tokens.address_signature(f'{kind}{number}')}"


def _with_tag(base: str, tag: str) -> str:
    local, _, domain = base.rpartition("@")
    return f"{local}{get_settings().address_delimiter}{tag}@{domain}"


def return_path(delivery_id: int) -> str:
    """The envelope sender of one campaign delivery."""
    return _with_tag(get_settings().return_path_base, _token("d", delivery_id))


def notice_return_path(notice_id: int) -> str:
    """The envelope sender of one transactional mail (confirmation, welcome)."""
    return _with_tag(get_settings().return_path_base, _token("n", notice_id))


def unsubscribe_mailto(subscriber_id: int) -> str:
    """The address in a reader's List-Unsubscribe mailto: a mail to it unsubscribes that reader."""
    return _with_tag(get_settings().unsubscribe_address, _token("u", subscriber_id))


def message_id(campaign_id: int, delivery_id: int) -> str:
    """The Message-ID of one campaign delivery; the same on every attempt, so a receiver can drop a repeat.
    Built per mail on the sending path: one HMAC with a cached key."""
    ids = f"c{campaign_id}.d{delivery_id}"
    return f"<{ids}.{tokens.address_signature(ids)}@{get_settings().list_domain}>"


def read_message_id(value: str) -> tuple[int, int] | None:
    """(campaign id, delivery id) from one of our Message-IDs found in `value`, only if its signature verifies."""
    domain = get_settings().list_domain.lower()
    for found in _MESSAGE_ID.finditer(value or ""):
        campaign_id, delivery_id, signature = int(found.group(1)), int(found.group(2)), found.group(3)
        if found.group(4).lower() == domain and tokens.check_address_signature(f"c{campaign_id}.d{delivery_id}",
                                                                               signature):
            return campaign_id, delivery_id
    return None


def read(address: str) -> tuple[str, Tagged | None] | None:
    """Which of our inbound addresses this is: ("bounces" | "unsubscribe", what its tag names, if valid).

    None when the address is not one of ours. A tag that fails its signature check reads as no tag."""
    settings = get_settings()
    local, _, domain = address.strip().strip("<>").rpartition("@")
    local, domain = local.lower(), domain.lower()
    for role, base in (("bounces", settings.return_path_base), ("unsubscribe", settings.unsubscribe_address)):
        base_local, _, base_domain = base.lower().rpartition("@")
        if domain != base_domain:
            continue
        if local == base_local:
            return role, None
        prefix = base_local + settings.address_delimiter
        if local.startswith(prefix):
            return role, _verify(local[len(prefix):], role)
    return None


def _verify(tag: str, role: str) -> Tagged | None:
    found = _TOKEN.fullmatch(tag)
    if found is None:
        return None
    kind, number, signature = found.groups()
    if (role == "unsubscribe") != (kind == "u"):
        return None
    if not tokens.check_address_signature(f"{kind}{number}", signature):
        return None
    return Tagged(KINDS[kind], int(number))


def find_tagged(addresses: list[str]) -> list[tuple[str, Tagged | None]]:
    """Our addresses among header values or envelope recipients, in the order given."""
    found = []
    for _name, address in getaddresses(addresses):
        ours = read(address) if address else None
        if ours is not None:
            found.append(ours)
    return found
