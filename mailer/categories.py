"""Category names and slugs: "U.S.–Russia Relations" and "US-Russia relations" are one category."""

from __future__ import annotations

import re
import unicodedata

_DASHES = dict.fromkeys(map(ord, "‐‑‒–—―−"), "-")


def slugify(name: str) -> str:
    """A stable slug: accents dropped, '&' read as 'and', dots in abbreviations removed, dashes joined."""
    text = unicodedata.normalize("NFKD", name.translate(_DASHES)).encode("ascii", "ignore").decode()
    text = text.lower().replace("&", " and ")
    text = re.sub(r"(?<=\w)\.(?=\w)|\.(?=\s|-|$)", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")
