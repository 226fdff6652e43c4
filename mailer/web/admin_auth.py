"""Admin console sign-in: the session cookie, CSRF checks on every form, and the page helper.

The cookie is HttpOnly and SameSite=Lax, Secure when the site is on https. Every POST of the console
carries the session's CSRF token in a hidden field, compared in constant time; a POST without it is
refused before anything changes. The sign-in form comes before any session, so its token is signed
and bound to a short-lived pre-session cookie instead (signed double submit): another site cannot
sign a browser in to an account of its choosing (login CSRF).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from itsdangerous import BadSignature, URLSafeTimedSerializer

from mailer import TEMPLATES_DIR, admins, tokens
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import BadToken, LoginRefused
from mailer.web.clients import allow_login, client_ip, login_blocked, record_login_failure

COOKIE = "mailer_admin"
LOGIN_COOKIE = "mailer_login"
# Long enough to type a password, short enough that a form left open for a day must be reloaded.
LOGIN_FORM_SECONDS = 3600
templates = Jinja2Templates(directory=TEMPLATES_DIR / "web")
router = APIRouter(prefix="/admin", include_in_schema=False)


class NotSignedIn(Exception):
    """Raised by `signed_in`; the app answers with a redirect to the sign-in page."""

    def __init__(self, path: str) -> None:
        self.path = path


class BadCsrf(Exception):
    """A console form came without this session's CSRF token."""


def signed_in(request: Request) -> admins.SignedIn:
    with session_scope() as session:
        who = admins.signed_in(session, request.cookies.get(COOKIE))
    if who is None:
        raise NotSignedIn(request.url.path)
    return who


def check_csrf(who: admins.SignedIn, given: str | None) -> None:
    if not admins.csrf_matches(who.csrf, given):
        raise BadCsrf


def _notes() -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(get_settings().signing_key(), salt="mailer.admin-note")


def _note(request: Request) -> str:
    """The note a redirect carried, if we signed it: a link cannot put its own words in the console."""
    try:
        return str(_notes().loads(request.query_params.get("note", ""), max_age=300))
    except BadSignature:
        return ""


def page(request: Request, name: str, context: dict[str, Any], *, who: admins.SignedIn | None,
         status_code: int = 200) -> Response:
    settings = get_settings()
    return templates.TemplateResponse(request, name, {
        "site_name": settings.site_name, "base_url": settings.base_url, "who": who,
        "csrf": who.csrf if who else "", "nav": request.url.path, "note": _note(request), **context},
        status_code=status_code)


def not_found(request: Request, who: admins.SignedIn, sentence: str) -> Response:
    """A console page for something that is not there (a 404 with the sentence that says what)."""
    return page(request, "admin/message.html", {"heading": "Not found", "text": sentence}, who=who, status_code=404)


def back(path: str, note: str = "") -> RedirectResponse:
    """After a change: 303 to a page (Post/Redirect/Get), with a one-line note shown there."""
    from urllib.parse import quote

    if not note:
        return RedirectResponse(path, status_code=303)
    return RedirectResponse(f"{path}{'&' if '?' in path else '?'}note={quote(_notes().dumps(note))}",
                            status_code=303)


async def console_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Console pages show personal data: never cached, never framed by another site."""
    response = await call_next(request)
    if request.url.path.startswith("/admin"):
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault("X-Frame-Options", "SAMEORIGIN")
        response.headers.setdefault("Content-Security-Policy", "frame-ancestors 'self'")
        response.headers.setdefault("Referrer-Policy", "same-origin")
    return response


def _safe_next(target: str) -> str:
    # Only paths inside the console: an open redirect would let a link send an admin anywhere.
    return target if target.startswith("/admin") and not target.startswith("//") and "\\" not in target \
        else "/admin"


def _secure() -> bool:
    return get_settings().base_url.startswith("https://")


def _login_page(request: Request, *, target: str, error: str = "", email: str = "",
                status_code: int = 200) -> Response:
    """The sign-in form, with a CSRF token bound to the browser's pre-session cookie (set or renewed here)."""
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not 16 <= len(nonce) <= 64 or not nonce.replace("-", "").replace("_", "").isalnum():
        nonce = secrets.token_urlsafe(18)
    response = page(request, "admin/login.html", {"next": target, "error": error, "email": email[:320],
                                                  "csrf": tokens.login_form_token(nonce)},
                    who=None, status_code=status_code)
    # Renewed with every form shown, so the cookie outlives the token the form carries.
    response.set_cookie(LOGIN_COOKIE, nonce, max_age=LOGIN_FORM_SECONDS, httponly=True, samesite="lax",
                        secure=_secure(), path="/admin")
    return response


@router.get("/login")
def login_form(request: Request, next: str = "/admin") -> Response:
    return _login_page(request, target=_safe_next(next))


@router.post("/login")
def login(request: Request, email: str = Form(""), password: str = Form(""),
          next: str = Form("/admin"), csrf_token: str = Form("")) -> Response:
    target = _safe_next(next)
    try:
        tokens.check_login_form_token(csrf_token, request.cookies.get(LOGIN_COOKIE, ""),
                                      max_age=LOGIN_FORM_SECONDS)
    except BadToken:
        # Checked before anything else and counted nowhere: without our own form no password is looked at,
        # so a forged POST can neither sign anyone in nor lock an account out.
        return _login_page(request, target=target, email=email, status_code=400,
                           error="This sign-in form has expired or did not come from this site. "
                                 "Please sign in again.")
    ip = client_ip(request)
    if not allow_login(ip):
        return _login_page(request, target=target, status_code=429,
                           error="Too many sign-in attempts from your address; wait a minute and try again.")
    try:
        if login_blocked(email, ip):
            admins.check_password_timing(password)
            raise LoginRefused(admins.REFUSED)
        with session_scope() as session:
            admin = admins.authenticate(session, email=email, password=password)
            token = admins.open_session(session, admin)
    except LoginRefused as refused:
        record_login_failure(email, ip)
        return _login_page(request, target=target, error=str(refused), email=email, status_code=401)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, token, max_age=admins.SESSION_HOURS * 3600, httponly=True, samesite="lax",
                        secure=_secure(), path="/admin")
    # The pre-session cookie has done its work; the next sign-in gets a new one.
    response.delete_cookie(LOGIN_COOKIE, path="/admin")
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("")) -> Response:
    who = signed_in(request)
    check_csrf(who, csrf_token)
    with session_scope() as session:
        admins.close_session(session, request.cookies.get(COOKIE))
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(COOKIE, path="/admin")
    return response
