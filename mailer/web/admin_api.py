"""Admin JSON API for what the console does with subscribers: view, edit, unsubscribe, suppress, erase,
CSV import and export, the suppression list and the dashboard's statistics. Bearer token, as /api."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mailer import admins, console, exports, imports, subscriptions, suppressions
from mailer.db import session_scope
from mailer.errors import InvalidInput
from mailer.models import Frequency, Status
from mailer.subscriptions import Choices, Origin
from mailer.web import uploads
from mailer.web.api import SubscriberOut, require_admin
from mailer.web.clients import client_ip
from mailer.web.ids import ROW_MAX, RowId

router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)], tags=["subscribers"])
SubscriberId = Annotated[int, Path(ge=1, le=ROW_MAX, description="The subscriber's id.")]
API_ACTOR = "admin-api"


def _origin(request: Request) -> Origin:
    return Origin(channel="admin-api", ip=client_ip(request), user_agent=request.headers.get("user-agent"))


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=500, description="Why; kept in the audit trail.")


class SubscriberEdit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=200)
    categories: list[str] | None = None
    frequency: Frequency | None = None
    timezone: str | None = Field(default=None, max_length=64)


@router.get("/stats")
def stats() -> dict[str, Any]:
    with session_scope() as session:
        found = console.stats(session)
    return {"by_status": found.by_status, "suppressed": found.suppressed,
            "by_category": [{"slug": s, "name": n, "confirmed": c} for s, n, c in found.by_category],
            "growth": [{"day": d.isoformat(), "confirmed": c} for d, c in found.growth],
            "campaigns": [asdict(c) for c in found.campaigns]}


@router.get("/subscribers/export", response_class=StreamingResponse,
            responses={200: {"content": {"text/csv": {}}}})
def export(status: Status | None = None) -> StreamingResponse:
    """Every subscriber (or those with one status) as CSV, in the columns an import takes."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M")
    return StreamingResponse(exports.csv_lines(status=status), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": f'attachment; filename="subscribers-{stamp}.csv"'})


@router.get("/subscribers/{subscriber_id}")
def subscriber(subscriber_id: SubscriberId) -> dict[str, Any]:
    with session_scope() as session:
        view = console.subscriber_view(session, subscriber_id)
        return {**SubscriberOut.of(view.subscriber).model_dump(), "timezone": view.subscriber.timezone,
                "erased": view.subscriber.erased_at is not None, "suppressed": view.suppressed,
                "consent": [asdict(c) for c in view.consent], "deliveries": [asdict(d) for d in view.deliveries]}


@router.patch("/subscribers/{subscriber_id}")
def edit(subscriber_id: SubscriberId, body: SubscriberEdit, request: Request) -> SubscriberOut:
    with session_scope() as session:
        found = console.subscriber_view(session, subscriber_id).subscriber
        choices = Choices(
            name=found.name if body.name is None else body.name,
            categories=tuple(c.slug for c in found.categories) if body.categories is None else tuple(body.categories),
            frequency=body.frequency or found.frequency)
        timezone = found.timezone if body.timezone is None else body.timezone
        subscriptions.update_by_admin(session, subscriber=found, choices=choices, timezone=timezone,
                                      origin=_origin(request))
        session.flush()
        return SubscriberOut.of(found)


@router.post("/subscribers/{subscriber_id}/unsubscribe")
def unsubscribe(subscriber_id: SubscriberId, body: Reason, request: Request) -> SubscriberOut:
    with session_scope() as session:
        found = subscriptions.unsubscribe(session, subscriber_id=subscriber_id, origin=_origin(request))
        admins.record(session, actor=API_ACTOR, action="unsubscribe", target=found.email, reason=body.reason)
        return SubscriberOut.of(found)


@router.post("/subscribers/{subscriber_id}/suppress")
def suppress(subscriber_id: SubscriberId, body: Reason, request: Request) -> dict[str, Any]:
    with session_scope() as session:
        found = console.subscriber_view(session, subscriber_id).subscriber
        if found.erased_at is not None:
            raise InvalidInput("subscriber", "This subscriber was erased; the address is already suppressed.")
        subscriptions.suppress(session, subscriber=found, reason=body.reason, origin=_origin(request))
        admins.record(session, actor=API_ACTOR, action="suppress", target=found.email, reason=body.reason)
    return {"id": subscriber_id, "suppressed": True}


@router.post("/subscribers/{subscriber_id}/erase")
def erase(subscriber_id: SubscriberId, body: Reason, request: Request) -> dict[str, Any]:
    """Erase the person's data (GDPR art. 17); a hashed suppression entry keeps imports from bringing them back."""
    with session_scope() as session:
        subscriptions.erase(session, subscriber_id=subscriber_id, reason=body.reason, origin=_origin(request))
        admins.record(session, actor=API_ACTOR, action="erase", target=f"subscriber {subscriber_id}",
                      reason=body.reason)
    return {"id": subscriber_id, "erased": True}


@router.post("/imports", status_code=202, openapi_extra=uploads.OPENAPI_BODY)
async def start_import(
    request: Request,
    dry_run: Annotated[bool, Query(description="Check every row and report; change nothing.")] = False,
    default_status: Annotated[Status, Query(description="For rows with no status: confirmed or pending.")]
    = Status.confirmed,
    send_confirmation: Annotated[bool, Query(description="Mail a confirmation link to rows that are pending.")]
    = False,
) -> dict[str, Any]:
    """Upload a CSV (multipart field `file`; columns email, name, categories, frequency, status).
    Poll GET /api/imports/{id}. The token is checked before the upload is read (mailer.web.uploads)."""
    filename, data, _form = await uploads.read_csv(request)
    content = imports.decode(data)
    with session_scope() as session:
        job = imports.create_job(session, content=content, filename=filename, actor=API_ACTOR,
                                 dry_run=dry_run, default_status=default_status,
                                 send_confirmation=send_confirmation)
        job_id = job.id
    imports.start(job_id)
    with session_scope() as session:
        return asdict(imports.report(session, job_id))


@router.get("/imports/{job_id}")
def import_report(job_id: RowId) -> dict[str, Any]:
    with session_scope() as session:
        return asdict(imports.report(session, job_id))


@router.post("/imports/{job_id}/run", status_code=202)
def run_import(job_id: RowId) -> dict[str, Any]:
    """Import for real the file a finished dry run checked."""
    with session_scope() as session:
        imports.promote(session, job_id)
    imports.start(job_id)
    with session_scope() as session:
        return asdict(imports.report(session, job_id))


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(max_length=320)
    reason: str = Field(min_length=1, max_length=500)


@router.get("/suppressions", tags=["suppressions"])
def list_suppressions(q: str = "", before: Annotated[int | None, Query(ge=1, le=ROW_MAX)] = None,
                      limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    with session_scope() as session:
        return [asdict(e) for e in suppressions.entries(session, query=q, before_id=before, limit=limit)]


@router.post("/suppressions", status_code=201, tags=["suppressions"])
def add_suppression(body: SuppressionIn) -> dict[str, Any]:
    with session_scope() as session:
        suppressions.add(session, email=body.email, reason=body.reason, actor=API_ACTOR)
    return {"email": body.email.strip(), "suppressed": True}


@router.post("/suppressions/{entry_id}/remove", tags=["suppressions"])
def remove_suppression(entry_id: RowId, body: Reason) -> dict[str, Any]:
    with session_scope() as session:
        suppressions.remove(session, entry_id=entry_id, reason=body.reason, actor=API_ACTOR)
    return {"id": entry_id, "removed": True}
