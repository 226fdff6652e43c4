"""Public pages: sign-up, confirmation, preferences and unsubscribe.

GET and HEAD only ever show a page; every change is a POST. Mail scanners follow links with GET
and HEAD, so a link opened by a machine changes nothing.
"""

from __future__ import annotations

import re
from typing import Any
from zoneinfo import available_timezones

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy.exc import IntegrityError

from mailer import TEMPLATES_DIR, queue, store, subscriptions, tokens
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import BadToken, ExpiredToken, InvalidInput, NotFound, UsedToken
from mailer.models import Frequency, Status
from mailer.subscriptions import Choices, Origin
from mailer.web.clients import allow_signup, client_ip

router = APIRouter()
templates = Jinja2Templates(directory=TEMPLATES_DIR / "web")
GET_HEAD = ["GET", "HEAD"]
FIELDS = ("email", "name", "frequency", "website", "csrf_token", "timezone")
# Offered on the preference form; any IANA name typed in is accepted too.
ZONES = sorted(z for z in available_timezones() if "/" in z and not z.startswith(("Etc/", "SystemV/")))
MAX_CATEGORIES = 200
SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,119}")

SIGNUP_DONE = (
    "Check your inbox",
    [
        "If this address can subscribe, we have sent it a link to confirm. "
        "Open the mail and press the button on the page it leads to.",
        "Nothing arrived after a few minutes? Look in your spam folder.",
    ],
)


def origin(request: Request, channel: str) -> Origin:
    return Origin(channel=channel, ip=client_ip(request), user_agent=request.headers.get("user-agent"))


def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
    settings = get_settings()
    return templates.TemplateResponse(
        request, name, {"site_name": settings.site_name, "base_url": settings.base_url, **context},
        status_code=status_code,
    )


def message(request: Request, heading: str, paragraphs: list[str], status_code: int = 200, *,
            action: str | None = None, action_label: str = "") -> Response:
    return page(request, "message.html", {"heading": heading, "paragraphs": paragraphs, "action": action,
                                          "action_label": action_label}, status_code)


def wants_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"


async def read_choices(request: Request) -> dict[str, Any]:
    """The sign-up or preference fields from a form or a JSON body, as plain values."""
    if wants_json(request):
        try:
            body = await request.json()
        except (ValueError, RecursionError):
            raise InvalidInput("body", "The request body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise InvalidInput("body", "The request body must be a JSON object.")
        categories = body.get("categories") or []
        if isinstance(categories, str) or not isinstance(categories, list):
            raise InvalidInput("categories", "Categories must be a list of category slugs.")
        fields: dict[str, Any] = {key: body.get(key) for key in FIELDS}
        fields["categories"] = categories
    else:
        form = await request.form()
        fields = {key: form.get(key) for key in FIELDS}
        fields["categories"] = form.getlist("categories")
    for key, value in fields.items():
        if key != "categories" and value is not None and not isinstance(value, str):
            raise InvalidInput(key, f"The {key} must be text.")
    listed: list[Any] = fields["categories"]
    if len(listed) > MAX_CATEGORIES or not all(isinstance(c, str) and SLUG.fullmatch(c) for c in listed):
        raise InvalidInput("categories", "Categories must be a list of category slugs.")
    return fields


def to_choices(fields: dict[str, Any]) -> Choices:
    frequency = fields.get("frequency") or "daily"
    if frequency not in {f.value for f in Frequency}:
        raise InvalidInput("frequency", "Please choose a daily or weekly digest.")
    return Choices(
        name=subscriptions.clean_name(fields.get("name")),
        categories=tuple(fields.get("categories") or ()),
        frequency=Frequency(frequency),
    )


def form_page(request: Request, fields: dict[str, Any], *, error: str = "", error_field: str = "",
              status_code: int = 200) -> Response:
    with session_scope() as session:
        categories = list(store.categories(session))
    values = {"email": "", "name": "", "categories": [], "frequency": "daily", **{
        k: v for k, v in fields.items() if v is not None}}
    return page(request, "subscribe.html", {"categories": categories, "values": values, "error": error,
                                            "error_field": error_field}, status_code)


@router.api_route("/subscribe", methods=GET_HEAD, include_in_schema=False)
def subscribe_form(request: Request) -> Response:
    return form_page(request, {})


@router.post("/subscribe")
async def subscribe(request: Request) -> Response:
    as_json = wants_json(request)
    if not allow_signup(client_ip(request)):
        text = "Too many sign-ups from your network. Please wait a minute and try again."
        if as_json:
            return JSONResponse({"detail": text}, status_code=429, headers={"Retry-After": "60"})
        return message(request, "Please slow down", [text], 429)
    fields: dict[str, Any] = {}
    try:
        fields = await read_choices(request)
        if fields.get("website"):
            # A bot filled the hidden field: answer as if it worked, store nothing.
            return _signup_done(request, as_json)
        choices = to_choices(fields)
        notice_id = _subscribe(request, fields.get("email") or "", choices)
    except InvalidInput as error:
        if as_json:
            return JSONResponse({"detail": error.message, "field": error.field}, status_code=422)
        return form_page(request, fields, error=error.message, error_field=error.field, status_code=422)
    if notice_id is not None:
        queue.dispatch("send_notice", notice_id)
    return _signup_done(request, as_json)


def _subscribe(request: Request, email: str, choices: Choices) -> int | None:
    for attempt in range(2):
        try:
            with session_scope() as session:
                notice = subscriptions.subscribe(session, email=email, choices=choices,
                                                 origin=origin(request, "form"))
                return notice.id if notice else None
        except IntegrityError:
            # Two sign-ups of one new address raced; the second now finds the row the first made.
            if attempt:
                raise
    return None


def _signup_done(request: Request, as_json: bool) -> Response:
    heading, paragraphs = SIGNUP_DONE
    if as_json:
        return JSONResponse({"status": "ok", "message": " ".join(paragraphs)})
    return message(request, heading, paragraphs)


def token_error_page(request: Request, error: Exception) -> Response:
    if isinstance(error, NotFound):
        return message(request, "Not found", [str(error)], 404)
    return message(request, "This link is not valid",
                   ["The link may have been copied incompletely. Please use the link from your latest mail."], 400)


def _is_confirmed(subscriber_id: int) -> bool:
    with session_scope() as session:
        subscriber = store.subscriber(session, subscriber_id)
        return subscriber is not None and subscriber.status == Status.confirmed


def _already_confirmed(request: Request) -> Response:
    return message(request, "You are already subscribed", ["Your subscription is confirmed. Nothing more to do."])


def _confirm_problem(request: Request, token: str, error: Exception) -> Response:
    """The page for a confirm link that cannot confirm: expired, used, or broken."""
    # The reader's state comes before the link's age: an old link of a confirmed reader must not offer
    # a fresh mail, which would never come.
    if isinstance(error, ExpiredToken | UsedToken) and _is_confirmed(error.subscriber_id):
        return _already_confirmed(request)
    if isinstance(error, ExpiredToken):
        return message(request, "This link has expired",
                       ["Confirmation links work for a limited time. We can send you a fresh one."], 410,
                       action=f"{get_settings().base_url}/confirm/{token}/resend",
                       action_label="Send me a new link")
    if isinstance(error, UsedToken):
        return message(request, "This link is no longer valid",
                       ["It was already used or replaced by a newer one. Please sign up again."], 400)
    return token_error_page(request, error)


@router.api_route("/confirm/{token}", methods=GET_HEAD, include_in_schema=False)
def confirm_page(request: Request, token: str) -> Response:
    try:
        with session_scope() as session:
            subscriber = subscriptions.check_confirm_token(session, token)
            email = subscriber.email
            chosen = ", ".join(c.name for c in subscriber.categories) or "every category"
            what = f"You will get a {subscriber.frequency.value} digest of new articles in: {chosen}."
    except (BadToken, ExpiredToken, UsedToken, NotFound) as error:
        return _confirm_problem(request, token, error)
    return message(request, "Confirm your subscription",
                   [f"Press the button to confirm that {email} wants to receive our newsletter.", what,
                    "You can change this at any time from the link in every mail."],
                   action=f"{get_settings().base_url}/confirm/{token}", action_label="Confirm my subscription")


@router.post("/confirm/{token}")
def confirm(request: Request, token: str) -> Response:
    try:
        with session_scope() as session:
            subscriber, welcome = subscriptions.confirm(session, token=token, origin=origin(request, "confirm-page"))
            welcome_id = welcome.id if welcome else None
            preferences = tokens.urls(subscriber.id)["preferences_url"]
    except (BadToken, ExpiredToken, UsedToken, NotFound) as error:
        return _confirm_problem(request, token, error)
    if welcome_id is not None:
        queue.dispatch("send_notice", welcome_id)
    return message(request, "You are subscribed",
                   ["Thank you. Your first digest will arrive with the next batch of articles.",
                    f"You can change what you receive at any time: {preferences}"])


@router.post("/confirm/{token}/resend")
def resend(request: Request, token: str) -> Response:
    try:
        subscriber_id = tokens.read(tokens.Purpose.confirm, token)[0]
    except BadToken as error:
        return token_error_page(request, error)
    if _is_confirmed(subscriber_id):
        return _already_confirmed(request)
    with session_scope() as session:
        notice = subscriptions.resend_confirmation(session, subscriber_id=subscriber_id,
                                                   origin=origin(request, "confirm-page"))
        notice_id = notice.id if notice else None
    if notice_id is not None:
        queue.dispatch("send_notice", notice_id)
    heading, paragraphs = SIGNUP_DONE
    return message(request, heading, paragraphs)


def _subscriber_for(token: str, purpose: tokens.Purpose) -> int:
    return int(tokens.read(purpose, token)[0])


def _preferences_page(request: Request, token: str, *, saved: bool = False, error: str = "",
                      fields: dict[str, Any] | None = None, status_code: int = 200) -> Response:
    settings = get_settings()
    try:
        subscriber_id = _subscriber_for(token, tokens.Purpose.preferences)
    except BadToken as problem:
        return token_error_page(request, problem)
    with session_scope() as session:
        subscriber = store.subscriber(session, subscriber_id)
        if subscriber is None:
            return token_error_page(request, NotFound("This subscription no longer exists."))
        categories = list(store.categories(session))
        values = fields or {
            "name": subscriber.name,
            "categories": [c.slug for c in subscriber.categories],
            "frequency": subscriber.frequency.value,
            "timezone": subscriber.timezone or "",
        }
        context = {
            "email": subscriber.email,
            "status": subscriber.status.value,
            "categories": categories,
            "values": values,
            "saved": saved,
            "error": error,
            "csrf_token": tokens.csrf_token(subscriber.id),
            "action": f"{settings.base_url}/preferences/{token}",
            "unsubscribe_action": tokens.urls(subscriber.id)["unsubscribe_url"],
            "zones": ZONES,
            "site_zone": settings.timezone,
        }
    return page(request, "preferences.html", context, status_code)


@router.api_route("/preferences/{token}", methods=GET_HEAD, include_in_schema=False)
def preferences_page(request: Request, token: str) -> Response:
    return _preferences_page(request, token)


@router.post("/preferences/{token}")
async def preferences(request: Request, token: str) -> Response:
    try:
        subscriber_id = _subscriber_for(token, tokens.Purpose.preferences)
    except BadToken as problem:
        return token_error_page(request, problem)
    fields: dict[str, Any] = {}
    try:
        fields = await read_choices(request)
        tokens.check_csrf(fields.get("csrf_token") or "", subscriber_id)
        choices = to_choices(fields)
        with session_scope() as session:
            subscriber = store.subscriber(session, subscriber_id, for_update=True)
            if subscriber is None:
                return token_error_page(request, NotFound("This subscription no longer exists."))
            subscriptions.update_preferences(session, subscriber=subscriber, choices=choices,
                                             timezone=fields.get("timezone"),
                                             origin=origin(request, "preferences-page"))
    except BadToken:
        return _preferences_page(request, token, status_code=400,
                                 error="This form has expired or was not sent from our page. Please try again.")
    except InvalidInput as problem:
        return _preferences_page(request, token, error=problem.message, fields=fields, status_code=422)
    return _preferences_page(request, token, saved=True)


@router.api_route("/unsubscribe/{token}", methods=GET_HEAD, include_in_schema=False)
def unsubscribe_page(request: Request, token: str) -> Response:
    try:
        subscriber_id = _subscriber_for(token, tokens.Purpose.unsubscribe)
    except BadToken as problem:
        return token_error_page(request, problem)
    with session_scope() as session:
        subscriber = store.subscriber(session, subscriber_id)
        email = subscriber.email if subscriber else None
        status = subscriber.status if subscriber else None
    if email is None or status not in {Status.pending, Status.confirmed}:
        return message(request, "You are unsubscribed", ["This address gets no more mail from us."])
    return message(request, "Unsubscribe", [f"Press the button to stop all mail to {email}."],
                   action=f"{get_settings().base_url}/unsubscribe/{token}", action_label="Unsubscribe")


@router.post("/unsubscribe/{token}")
async def unsubscribe(request: Request, token: str) -> Response:
    """RFC 8058 one-click: no cookie, no CSRF token, no redirect; 200 even when already done."""
    try:
        subscriber_id = _subscriber_for(token, tokens.Purpose.unsubscribe)
    except BadToken as problem:
        return token_error_page(request, problem)
    body = (await request.body())[:200]
    channel = "one-click" if b"List-Unsubscribe=One-Click" in body else "unsubscribe-page"
    try:
        with session_scope() as session:
            subscriptions.unsubscribe(session, subscriber_id=subscriber_id, origin=origin(request, channel))
    except NotFound:
        pass  # An erased subscriber gets nothing anyway; the answer is the same.
    return message(request, "You are unsubscribed",
                   ["You will get no more mail from us. If this was a mistake, you can subscribe again at any time."])
