"""Markdown for campaign bodies, with the Jinja tags in it left exactly as written."""

from __future__ import annotations

import re
import secrets
from functools import lru_cache

from markdown_it import MarkdownIt

JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    # Admins may mix HTML into their Markdown; the campaign is a sandboxed Jinja template either way.
    return MarkdownIt("commonmark", {"html": True, "typographer": False}).enable("table").enable("strikethrough")


def to_html(markdown: str) -> str:
    """Markdown to HTML. Jinja tags are swapped for plain words first, so a link like
    [leave]({{ unsubscribe_url }}) is not percent-encoded into something Jinja no longer sees."""
    tags: dict[str, str] = {}
    salt = secrets.token_hex(4)

    def hide(match: re.Match[str]) -> str:
        word = f"jinjatag{salt}x{len(tags)}x"
        tags[word] = match.group(0)
        return word

    html: str = _parser().render(JINJA.sub(hide, markdown))
    for word, tag in tags.items():
        html = html.replace(word, tag)
    return html
