"""Admin console pages for campaigns: write, preview as a reader, test, send or schedule, watch, pause,
resume, cancel, and read the delivery log. Digest runs are listed here too."""

from __future__ import annotations

import html
from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select

from mailer import admins, campaigns, console, store
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidInput, MailerError, NotFound
from mailer.models import Delivery, DeliveryState, utcnow
from mailer.subscriptions import normalize_email
from mailer.web.admin import attempt, sandboxed
from mailer.web.admin_auth import back, check_csrf, not_found, page, signed_in
from mailer.web.ids import BigMark, RowId, RowMark

router = APIRouter(prefix="/admin/campaigns", include_in_schema=False)
Who = Annotated[admins.SignedIn, Depends(signed_in)]
PAGE = 100


RATE_WINDOW = 60.0


def live(campaign_id: int) -> dict[str, object]:
    """Counts by state, the rate over the last minute, and the time left at that rate."""
    now = utcnow()
    with session_scope() as session:
        progress = campaigns.progress(session, campaign_id)
        since = now - timedelta(seconds=RATE_WINDOW)
        recent = session.scalar(select(func.count()).select_from(Delivery).where(
            Delivery.campaign_id == campaign_id, Delivery.sent_at >= since)) or 0
    # A campaign that began sending ten seconds ago has sent for ten seconds, not sixty: dividing by
    # the whole window would show a tenth of the real rate and ten times the time left. The floor of
    # one second keeps the first moments from dividing by (almost) zero.
    window = RATE_WINDOW
    if progress.started_at is not None:
        window = min(RATE_WINDOW, max((now - progress.started_at).total_seconds(), 1.0))
    rate = recent / window
    left = sum(progress.counts.get(k, 0) for k in ("pending", "sending", "deferred"))
    return {"status": progress.status, "status_reason": progress.status_reason, "counts": progress.counts,
            "total": progress.total, "done": progress.done, "rate": round(rate, 1),
            "eta_seconds": round(left / rate) if rate > 0 and left else None}


@router.get("")
def campaign_list(request: Request, who: Who, before: RowMark = 0) -> Response:
    with session_scope() as session:
        lines = console.recent_campaigns(session, limit=PAGE, before_id=before or None)
    return page(request, "admin/campaigns.html", {
        "lines": lines, "next_before": lines[-1].id if len(lines) == PAGE else None}, who=who)


def _form_page(request: Request, who: admins.SignedIn, form: dict[str, Any], *, action: str, heading: str,
               error: str = "", status_code: int = 200) -> Response:
    with session_scope() as session:
        categories = [(c.slug, c.name) for c in store.categories(session)]
    return page(request, "admin/campaign_new.html", {
        "categories": categories, "form": form, "error": error, "action": action, "heading": heading},
        who=who, status_code=status_code)


@router.get("/new")
def new_form(request: Request, who: Who) -> Response:
    return _form_page(request, who, {"format": "markdown"}, action="/admin/campaigns/new",
                      heading="Write a campaign")


@router.get("/{campaign_id}/edit")
def edit_form(request: Request, who: Who, campaign_id: RowId) -> Response:
    try:
        with session_scope() as session:
            c = campaigns.get(session, campaign_id)
            form = {"subject": c.subject, "format": "markdown" if c.markdown else "html",
                    "body": c.markdown or c.html, "text": c.text, "categories": list(c.categories)}
    except NotFound as missing:
        return not_found(request, who, str(missing))
    return _form_page(request, who, form, action=f"/admin/campaigns/{campaign_id}/edit",
                      heading="Edit the campaign")


@router.post("/new")
async def create(request: Request, who: Who) -> Response:
    return await _save(request, who, None)


@router.post("/{campaign_id}/edit")
async def save_edit(request: Request, who: Who, campaign_id: RowId) -> Response:
    return await _save(request, who, campaign_id)


async def _save(request: Request, who: admins.SignedIn, campaign_id: int | None) -> Response:
    form = await request.form()
    check_csrf(who, str(form.get("csrf_token") or ""))
    fields = {k: str(form.get(k) or "") for k in ("subject", "body", "text", "format")}
    chosen = [str(v) for v in form.getlist("categories")]
    markdown = fields["body"] if fields["format"] == "markdown" else None
    values: dict[str, Any] = {"subject": fields["subject"], "html": "" if markdown else fields["body"],
                              "text": fields["text"], "categories": chosen, "markdown": markdown}
    try:
        with session_scope() as session:
            if campaign_id is None:
                campaign_id = campaigns.create(session, **values).id
                note = "Draft saved. Preview it, send a test, then send or schedule."
            else:
                campaigns.edit(session, campaign_id, **values)
                admins.record(session, actor=who.email, action="campaign-edit", target=f"campaign {campaign_id}")
                note = "Saved."
    except MailerError as error:
        message = error.message if isinstance(error, InvalidInput) else str(error)
        if isinstance(error, InvalidInput) and error.field == "html":
            message = f"Body: {message}"
        action = "/admin/campaigns/new" if campaign_id is None else f"/admin/campaigns/{campaign_id}/edit"
        return _form_page(request, who, {**fields, "categories": chosen}, action=action,
                          heading="Write a campaign" if campaign_id is None else "Edit the campaign",
                          error=message, status_code=422)
    return back(f"/admin/campaigns/{campaign_id}", note)


@router.get("/{campaign_id}")
def detail(request: Request, who: Who, campaign_id: RowId, reader: str = "") -> Response:
    try:
        state = live(campaign_id)
        with session_scope() as session:
            line = console.campaign_line(session, campaigns.get(session, campaign_id))
            try:
                preview = console.preview(session, campaign_id, email_address=reader or None)
                preview_error = ""
            except InvalidInput as error:
                preview, preview_error = None, error.message
    except NotFound as missing:
        return not_found(request, who, str(missing))
    return page(request, "admin/campaign.html", {
        "c": line, "live": state, "preview": preview, "preview_error": preview_error, "reader": reader,
        "tz": get_settings().timezone}, who=who)


@router.get("/{campaign_id}/progress")
def progress(who: Who, campaign_id: RowId) -> JSONResponse:
    return JSONResponse(live(campaign_id))


@router.get("/{campaign_id}/preview")
def preview_html(who: Who, campaign_id: RowId, reader: str = "") -> Response:
    with session_scope() as session:
        try:
            found = console.preview(session, campaign_id, email_address=reader or None)
        except InvalidInput as error:
            return sandboxed(f"<p>{html.escape(error.message)}</p>")
    return sandboxed(found.html)


@router.post("/{campaign_id}/action")
def action(who: Who, campaign_id: RowId, csrf_token: str = Form(""), do: str = Form(""),
           at: str = Form("")) -> Response:
    check_csrf(who, csrf_token)
    here = f"/admin/campaigns/{campaign_id}"

    def change() -> str:
        with session_scope() as session:
            if do in {"send", "pause", "resume", "cancel", "schedule"}:
                admins.record(session, actor=who.email, action=f"campaign-{do}", target=f"campaign {campaign_id}",
                              reason=at if do == "schedule" else "")
            if do == "send":
                started = campaigns.start(session, campaign_id)
            elif do == "pause":
                campaigns.pause(session, campaign_id, reason=f"Paused by {who.email}.")
                return "Paused. Mail already handed to the server may still arrive."
            elif do == "resume":
                started = campaigns.resume(session, campaign_id)
            elif do == "cancel":
                campaigns.cancel(session, campaign_id)
                return "Cancelled. Nobody else will get this campaign."
            elif do == "schedule":
                campaigns.schedule(session, campaign_id, _local_time(at))
                return "Scheduled."
            else:
                return "Nothing to do."
        if started:
            campaigns.kick(campaign_id)
        return "Sending." if do == "send" else "Resumed."

    return attempt(change, here, here)


def _local_time(text: str) -> datetime:
    """A datetime-local field, read in the site's time zone."""
    from zoneinfo import ZoneInfo

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput("at", "Pick a date and time to send at.") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo(get_settings().timezone))
    return moment


@router.post("/{campaign_id}/test")
async def send_test(who: Who, campaign_id: RowId, csrf_token: str = Form(""), emails: str = Form("")) -> Response:
    check_csrf(who, csrf_token)
    here = f"/admin/campaigns/{campaign_id}"
    addresses = [part.strip() for part in emails.replace(";", ",").replace("\n", ",").split(",") if part.strip()]
    try:
        if not addresses or len(addresses) > 20:
            raise InvalidInput("emails", "Give one to twenty addresses, separated by commas.")
        wanted = [normalize_email(address)[0] for address in addresses]
        results = await campaigns.send_test(campaign_id, wanted)
    except MailerError as error:
        return back(here, getattr(error, "message", None) or str(error))
    notes = [f"{address}: {'sent' if r.ok else 'not sent'} ({r.code} {r.text})" for address, r in results.items()]
    return back(here, "Test: " + "; ".join(notes))


@router.get("/{campaign_id}/deliveries")
def deliveries(request: Request, who: Who, campaign_id: RowId, q: str = "", state: str = "",
               after: BigMark = 0) -> Response:
    wanted = DeliveryState(state) if state in DeliveryState.__members__ else None
    try:
        with session_scope() as session:
            rows = console.delivery_log(session, campaign_id, query=q[:200], state=wanted, after_id=max(after, 0),
                                        limit=PAGE)
            subject = campaigns.get(session, campaign_id).subject
    except NotFound as missing:
        return not_found(request, who, str(missing))
    return page(request, "admin/deliveries.html", {
        "rows": rows, "q": q, "state": state, "states": list(DeliveryState.__members__), "campaign_id": campaign_id,
        "subject": subject, "next_after": rows[-1].id if len(rows) == PAGE else None}, who=who)
