"""Pure grouping: a reader, the new articles and what the reader already got → sections by category.

Nothing here reads the database, formats or sends. Each article appears once, under the first of
the reader's categories it belongs to (in the site's category order); sections keep that order;
articles are newest first; at most `per_category` are listed, the rest are counted for "and K more".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime

# Articles with no category go here, for readers who want everything.
UNCATEGORISED = 0


@dataclass(frozen=True)
class ArticleRef:
    id: int
    when: datetime  # published, or ingested when the feed gave no time: the order readers see
    category_ids: frozenset[int]
    ingested: datetime | None = None  # decides which digest an article belongs to


@dataclass(frozen=True)
class Section:
    category_id: int
    article_ids: tuple[int, ...]
    more: tuple[int, ...] = ()


def build(*, chosen: Sequence[int], category_order: Sequence[int], articles: Sequence[ArticleRef],
          received: Collection[int], per_category: int = 10) -> list[Section]:
    """The reader's digest. `chosen` empty means every category (and uncategorised articles too)."""
    wanted = list(chosen) if chosen else [*category_order, UNCATEGORISED]
    wanted_set = set(wanted)
    order = [c for c in category_order if c in wanted_set]
    # Sections follow the site's category order, whatever order the reader picked them in.
    grouped: dict[int, list[int]] = {c: [] for c in [*order, UNCATEGORISED] if c in wanted_set}
    for article in sorted(articles, key=lambda a: (a.when, a.id), reverse=True):
        if article.id in received:
            continue
        home = next((c for c in order if c in article.category_ids), None)
        if home is None and not article.category_ids and UNCATEGORISED in wanted_set:
            home = UNCATEGORISED
        if home is not None:
            grouped[home].append(article.id)
    return [Section(c, tuple(ids[:per_category]), tuple(ids[per_category:])) for c, ids in grouped.items() if ids]
