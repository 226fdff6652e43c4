"""Id types for paths and queries, bounded by the columns they look up, so a huge number is a 422 or
404 with a sentence rather than an overflow deep in the database (PostgreSQL's integer is 32 bits)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query

ROW_MAX = 2**31 - 1  # Integer primary keys: subscribers, campaigns, categories, imports, suppressions.
BIG_MAX = 2**63 - 1  # BigInteger primary keys: deliveries, inbound messages.

RowId = Annotated[int, Path(ge=1, le=ROW_MAX)]
BigId = Annotated[int, Path(ge=1, le=BIG_MAX)]
# "Show rows after (or before) this id": 0 means from the start.
RowMark = Annotated[int, Query(ge=0, le=ROW_MAX)]
BigMark = Annotated[int, Query(ge=0, le=BIG_MAX)]
