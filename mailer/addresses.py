"""Addresses that name what they are about: each delivery's return path and each reader's mailto unsubscribe.

    bounces+d123-k3x9…@news.example.org       the return path (SMTP MAIL FROM) of delivery 123 (VERP)
    bounces+n45-…@news.example.org            the return path of transactional notice 45
    unsubscribe+u7-…@news.example.org         the List-Unsubscribe mailto of subscriber 7

A bounce is sent to the return path, so it names its delivery even when the bouncing server quotes
nothing of the original. The token after the kind and number is an HMAC (tokens.address_signature),
so nobody can make an address that unsubscribes or bounces someone else. Tokens are lower-case base32:
some servers change the case of local parts, and a case-sensitive token would then fail to verify.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses

from mailer import tokens
from mailer.config import get_settings

KINDS = {"d": "delivery", "n": "notice", "u": "subscriber"}
_TOKEN = re.compile(r"([dnu])(\d{1,18})-([a-z2-7]{16})")


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
