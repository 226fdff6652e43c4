"""Helpers to find links in received mails."""

from __future__ import annotations

import re

from tests.conftest import Received, link_path


def confirm_link(mail: Received) -> str:
    found = re.search(r"https://news\.example\.org/confirm/[\w.\-]+", mail.part("plain"))
    assert found, mail.part("plain")
    return link_path(found.group(0))


def header_unsubscribe_link(mail: Received) -> str:
    found = re.search(r"<(https://[^>]+)>", str(mail.message["List-Unsubscribe"]))
    assert found
    return link_path(found.group(1))


def body_link(mail: Received, kind: str, subtype: str = "plain") -> str:
    found = re.search(rf"https://news\.example\.org/{kind}/[\w.\-]+", mail.part(subtype))
    assert found
    return link_path(found.group(0))
