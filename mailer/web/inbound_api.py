"""Admin API for what came back: GET /api/inbound (newest first) and GET /api/inbound/{id} with the raw message."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from sqlalchemy import select

from mailer import inbound
from mailer.db import session_scope
from mailer.models import InboundKind, InboundMessage
from mailer.web.api import require_admin

router = APIRouter(prefix="/api/inbound", dependencies=[Depends(require_admin)], tags=["inbound"])


@router.get("")
def list_inbound(
    kind: Annotated[InboundKind | None, Query(description="e.g. unclassified: what a person should read.")] = None,
    before: Annotated[int, Query(ge=0, le=2**63 - 1, description="Return rows with an id below this one.")] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[dict[str, Any]]:
    query = select(InboundMessage).order_by(InboundMessage.id.desc()).limit(limit)
    if kind is not None:
        query = query.where(InboundMessage.kind == kind)
    if before:
        query = query.where(InboundMessage.id < before)
    with session_scope() as session:
        return [inbound.as_dict(row) for row in session.scalars(query)]


@router.get("/{inbound_id}")
def get_inbound(inbound_id: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> dict[str, Any]:
    with session_scope() as session:
        row = session.get(InboundMessage, inbound_id)
        if row is None:
            raise HTTPException(404, f"There is no inbound message {inbound_id}.")
        return inbound.as_dict(row, raw=True)
