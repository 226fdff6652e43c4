"""CORS for the one cross-origin endpoint: the site's own pages may POST a sign-up as JSON from script.

Only `/subscribe` answers cross-origin, only for the origins in `MAILER_SIGNUP_ORIGINS`, and never
with credentials: double opt-in protects the sign-up, and no cookie is involved. Plain HTML forms
posted from the site need none of this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response

from mailer.config import get_settings

PATH = "/subscribe"


def _allowed(origin: str | None) -> str | None:
    if not origin:
        return None
    wanted = get_settings().signup_origins
    if "*" in wanted:
        return "*"
    return origin if origin.rstrip("/") in wanted else None


async def signup_cors(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    if request.url.path != PATH:
        return await call_next(request)
    allowed = _allowed(request.headers.get("origin"))
    if request.method == "OPTIONS" and request.headers.get("access-control-request-method"):
        if allowed is None:
            return Response(status_code=403, content="This origin may not post sign-ups from script.")
        return Response(status_code=204, headers={
            "Access-Control-Allow-Origin": allowed, "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": "Content-Type", "Access-Control-Max-Age": "86400", "Vary": "Origin"})
    response = await call_next(request)
    if allowed is not None:
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Vary"] = "Origin"
    return response
