"""Admin console pages: dashboard, subscribers, CSV import and export, suppression list, dev inbox.

Server-rendered; every change is a POST with the session's CSRF token, answered with a redirect
(Post/Redirect/Get) to a page that says what happened. Errors in what an admin typed come back as a
note on the same page, never as a traceback.
"""

from __future__ import annotations

import email
import email.policy
import mailbox
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import select

from mailer import admins, console, exports, imports, inbound, store, subscriptions, suppressions
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidInput, MailerError, NotFound
from mailer.models import AdminAction, Frequency, ImportJob, InboundKind, InboundMessage, Status
from mailer.subscriptions import Choices, Origin
from mailer.web import uploads
from mailer.web.admin_auth import back, check_csrf, not_found, page, signed_in
from mailer.web.clients import client_ip
from mailer.web.ids import BigId, BigMark, RowId, RowMark

router = APIRouter(prefix="/admin", include_in_schema=False)
Who = Annotated[admins.SignedIn, Depends(signed_in)]
PAGE = 50


def origin(request: Request, who: admins.SignedIn) -> Origin:
    return Origin(channel=f"admin:{who.email}"[:40], ip=client_ip(request),
                  user_agent=request.headers.get("user-agent"))


def attempt(change: Callable[[], str], done: str, failed: str) -> Response:
    """Run a change; on a deliberate error go back to `failed` with its sentence, else to `done`."""
    try:
        note = change()
    except MailerError as error:
        return back(failed, getattr(error, "message", None) or str(error))
    return back(done, note)


@router.get("")
def dashboard(request: Request, who: Who) -> Response:
    with session_scope() as session:
        stats = console.stats(session)
    peak = max([n for _, n in stats.growth] + [1])
    return page(request, "admin/dashboard.html", {"stats": stats, "peak": peak}, who=who)


@router.get("/subscribers")
def subscribers(request: Request, who: Who, q: str = "", status: str = "", after: RowMark = 0) -> Response:
    wanted = Status(status) if status in Status.__members__ else None
    with session_scope() as session:
        found = store.find_subscribers(session, query=q[:200], status=wanted, after_id=max(after, 0),
                                       limit=PAGE)
        rows = [{"id": s.id, "email": s.email, "name": s.name, "status": s.status.value,
                 "frequency": s.frequency.value, "categories": [c.name for c in s.categories],
                 "created_at": s.created_at} for s in found]
    return page(request, "admin/subscribers.html", {
        "rows": rows, "q": q, "status": status, "statuses": list(Status.__members__),
        "next_after": rows[-1]["id"] if len(rows) == PAGE else None}, who=who)


@router.get("/subscribers/export")
def export(who: Who, status: str = "") -> StreamingResponse:
    wanted = Status(status) if status in Status.__members__ else None
    return StreamingResponse(exports.csv_lines(status=wanted), media_type="text/csv; charset=utf-8",
                             headers={"Content-Disposition": 'attachment; filename="subscribers.csv"'})


@router.get("/subscribers/{subscriber_id}")
def subscriber(request: Request, who: Who, subscriber_id: RowId) -> Response:
    with session_scope() as session:
        try:
            view = console.subscriber_view(session, subscriber_id)
        except NotFound as missing:
            return not_found(request, who, str(missing))
        chosen = {c.slug for c in view.subscriber.categories}
        categories = [(c.slug, c.name, c.slug in chosen) for c in store.categories(session)]
        return page(request, "admin/subscriber.html", {
            "s": view.subscriber, "view": view, "categories": categories,
            "frequencies": list(Frequency.__members__)}, who=who)


@router.post("/subscribers/{subscriber_id}")
async def subscriber_change(request: Request, who: Who, subscriber_id: RowId) -> Response:
    form = await request.form()
    check_csrf(who, str(form.get("csrf_token") or ""))
    action = str(form.get("action") or "")
    reason = " ".join(str(form.get("reason") or "").split())
    here = f"/admin/subscribers/{subscriber_id}"

    def change() -> str:
        with session_scope() as session:
            if action == "edit":
                found = console.subscriber_view(session, subscriber_id).subscriber
                frequency = str(form.get("frequency") or "daily")
                if frequency not in Frequency.__members__:
                    raise InvalidInput("frequency", "Pick daily or weekly.")
                choices = Choices(name=str(form.get("name") or ""),
                                  categories=tuple(str(v) for v in form.getlist("categories")),
                                  frequency=Frequency(frequency))
                subscriptions.update_by_admin(session, subscriber=found, choices=choices,
                                              timezone=str(form.get("timezone") or "") or None,
                                              origin=origin(request, who))
                return "Saved."
            if not reason:
                raise InvalidInput("reason", "Say why, in a few words; the reason is kept in the audit trail.")
            if action == "unsubscribe":
                found = subscriptions.unsubscribe(session, subscriber_id=subscriber_id, origin=origin(request, who))
                admins.record(session, actor=who.email, action="unsubscribe", target=found.email, reason=reason)
                return "Unsubscribed."
            if action == "suppress":
                found = console.subscriber_view(session, subscriber_id).subscriber
                subscriptions.suppress(session, subscriber=found, reason=reason, origin=origin(request, who))
                admins.record(session, actor=who.email, action="suppress", target=found.email, reason=reason)
                return "Suppressed: this address gets no more mail."
            if action == "erase":
                subscriptions.erase(session, subscriber_id=subscriber_id, reason=reason, origin=origin(request, who))
                admins.record(session, actor=who.email, action="erase", target=f"subscriber {subscriber_id}",
                              reason=reason)
                return "Erased: the personal data is gone; a hashed entry keeps the address suppressed."
            return "Nothing to do."

    return attempt(change, here, here)


@router.get("/import")
def import_form(request: Request, who: Who) -> Response:
    with session_scope() as session:
        jobs = session.scalars(select(ImportJob).order_by(ImportJob.id.desc()).limit(10)).all()
        recent = [imports.report(session, job.id) for job in jobs]
    return page(request, "admin/import.html", {"recent": recent}, who=who)


@router.post("/import")
async def import_upload(request: Request, who: Who) -> Response:
    # The session is checked (Who) before the body is read: see mailer.web.uploads.
    try:
        filename, data, form = await uploads.read_csv(request)
        check_csrf(who, str(form.get("csrf_token") or ""))
        status = Status.pending if form.get("default_status") == "pending" else Status.confirmed
        with session_scope() as session:
            job = imports.create_job(session, content=imports.decode(data), filename=filename, actor=who.email,
                                     dry_run=form.get("dry_run") == "true", default_status=status,
                                     send_confirmation=form.get("send_confirmation") == "true")
            job_id = job.id
    except MailerError as error:
        return back("/admin/import", getattr(error, "message", None) or str(error))
    imports.start(job_id)
    return back(f"/admin/import/{job_id}")


@router.get("/import/{job_id}")
def import_job(request: Request, who: Who, job_id: RowId) -> Response:
    with session_scope() as session:
        try:
            report = imports.report(session, job_id)
        except NotFound as missing:
            return not_found(request, who, str(missing))
    return page(request, "admin/import_job.html", {"job": report}, who=who)


@router.get("/import/{job_id}/progress")
def import_progress(who: Who, job_id: RowId) -> JSONResponse:
    with session_scope() as session:
        report = imports.report(session, job_id)
    return JSONResponse({"state": report.state, "processed": report.processed, "total": report.total,
                         "counts": report.counts})


@router.post("/import/{job_id}/run")
def import_run(who: Who, job_id: RowId, csrf_token: str = Form("")) -> Response:
    check_csrf(who, csrf_token)

    def change() -> str:
        with session_scope() as session:
            imports.promote(session, job_id)
        imports.start(job_id)
        return "Importing."

    return attempt(change, f"/admin/import/{job_id}", f"/admin/import/{job_id}")


@router.get("/suppressions")
def suppression_list(request: Request, who: Who, q: str = "", before: RowMark = 0) -> Response:
    with session_scope() as session:
        rows = suppressions.entries(session, query=q[:320], before_id=before or None, limit=PAGE)
        trail = session.scalars(select(AdminAction).where(AdminAction.action.in_(["suppress", "unsuppress"]))
                                .order_by(AdminAction.id.desc()).limit(10)).all()
        recent = [(a.at, a.actor, a.action, a.target, a.reason) for a in trail]
    return page(request, "admin/suppressions.html", {
        "rows": rows, "q": q, "recent": recent, "next_before": rows[-1].id if len(rows) == PAGE else None}, who=who)


@router.post("/suppressions")
def suppression_add(who: Who, email_address: str = Form("", alias="email"), reason: str = Form(""),
                    csrf_token: str = Form("")) -> Response:
    check_csrf(who, csrf_token)

    def change() -> str:
        with session_scope() as session:
            suppressions.add(session, email=email_address, reason=reason, actor=who.email)
        return f"{email_address.strip()} is suppressed."

    return attempt(change, "/admin/suppressions", "/admin/suppressions")


@router.post("/suppressions/{entry_id}/remove")
def suppression_remove(who: Who, entry_id: RowId, reason: str = Form(""), csrf_token: str = Form("")) -> Response:
    check_csrf(who, csrf_token)

    def change() -> str:
        with session_scope() as session:
            entry = suppressions.remove(session, entry_id=entry_id, reason=reason, actor=who.email)
            return f"Removed {entry.email or 'the entry'} from the suppression list."

    return attempt(change, "/admin/suppressions", "/admin/suppressions")


def _outbox() -> mailbox.Maildir | None:
    settings = get_settings()
    if settings.smtp_url or not settings.outbox_dir.exists():
        return None
    return mailbox.Maildir(settings.outbox_dir, create=False)


def _parsed(box: mailbox.Maildir, key: str) -> email.message.EmailMessage:
    with box.get_file(key) as handle:
        message: email.message.EmailMessage = email.message_from_bytes(handle.read(), policy=email.policy.default)
    return message


@router.get("/outbox")
def outbox(request: Request, who: Who) -> Response:
    """The dev inbox: with no SMTP server, mail lands in the outbox Maildir; newest first."""
    box = _outbox()
    rows: list[dict[str, Any]] = []
    if box is not None:
        # Maildir names start with the delivery time: sorting them needs no message opened.
        keys = sorted(box.keys(), key=_maildir_time, reverse=True)[:200]
        for key in keys:
            message = _parsed(box, key)
            rows.append({"key": key, "to": message["To"], "subject": message["Subject"], "date": message["Date"]})
    return page(request, "admin/outbox.html", {"rows": rows, "smtp": bool(get_settings().smtp_url)}, who=who)


def _maildir_time(key: str) -> float:
    stamp = key.split(".", 1)[0]
    return float(stamp) if stamp.isdigit() else 0.0


def _outbox_message(key: str) -> email.message.EmailMessage:
    box = _outbox()
    if box is None or "/" in key or key.startswith(".") or key not in box:
        raise NotFound("That mail is not in the outbox.")
    return _parsed(box, key)


@router.get("/outbox/{key}")
def outbox_message(request: Request, who: Who, key: str) -> Response:
    try:
        message = _outbox_message(key)
    except NotFound as missing:
        return not_found(request, who, str(missing))
    text = message.get_body(("plain",))
    headers = [(name, str(value)) for name, value in message.items()
               if name.lower() in {"from", "to", "subject", "date", "list-unsubscribe", "list-unsubscribe-post",
                                   "list-id", "message-id"}]
    return page(request, "admin/outbox_message.html", {
        "key": key, "headers": headers, "text": text.get_content() if text else "",
        "html_src": f"/admin/outbox/{key}/html"}, who=who)


@router.get("/outbox/{key}/html")
def outbox_html(who: Who, key: str) -> Response:
    message = _outbox_message(key)
    html = message.get_body(("html",))
    return sandboxed(html.get_content() if html else "<p>This mail has no HTML part.</p>")


def sandboxed(html: str) -> Response:
    """A mail's HTML for an iframe: no scripts, no forms, nothing fetched but images and inline styles."""
    return Response(html, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": "sandbox; default-src 'none'; img-src * data:; style-src 'unsafe-inline'; "
                                   "frame-ancestors 'self'",
        "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@router.get("/inbound")
def inbound_list(request: Request, who: Who, kind: str = "", before: BigMark = 0) -> Response:
    """What came back: bounces, complaints, unsubscribes by mail, and the mail nobody could classify."""
    wanted = InboundKind(kind) if kind in InboundKind.__members__ else None
    query = select(InboundMessage).order_by(InboundMessage.id.desc()).limit(PAGE)
    if wanted is not None:
        query = query.where(InboundMessage.kind == wanted)
    if before > 0:
        query = query.where(InboundMessage.id < before)
    with session_scope() as session:
        rows = [inbound.as_dict(row) for row in session.scalars(query)]
    return page(request, "admin/inbound.html", {
        "rows": rows, "kind": kind, "kinds": list(InboundKind.__members__),
        "next_before": rows[-1]["id"] if len(rows) == PAGE else None}, who=who)


@router.get("/inbound/{inbound_id}")
def inbound_message(request: Request, who: Who, inbound_id: BigId) -> Response:
    with session_scope() as session:
        row = session.get(InboundMessage, inbound_id)
        if row is None:
            return not_found(request, who, f"There is no inbound message {inbound_id}.")
        item = inbound.as_dict(row, raw=True)
    return page(request, "admin/inbound_message.html", {"m": item}, who=who)
