"""The FastAPI application: public pages, the admin API, /healthz, and readable errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from mailer import __version__, queue
from mailer.config import get_settings
from mailer.db import engine
from mailer.errors import Conflict, InvalidInput, LoginRefused, MailerError, NotFound, RateLimited
from mailer.web import (
    admin,
    admin_api,
    admin_auth,
    admin_campaigns,
    api,
    campaigns_api,
    cors,
    digests_api,
    inbound_api,
    public,
    webhooks_api,
)


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _validation_sentence(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item.get("loc", ()) if p not in {"body", "query", "path"})
        parts.append(f"{where or 'request'}: {item.get('msg', 'is not valid')}")
    return "; ".join(parts) + "."


def create_app(*, background: bool = False) -> FastAPI:
    """The app. With `background`, and no broker, it also runs the periodic tick and campaign loops itself."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        ticker = queue.Ticker().start() if background and not get_settings().broker_url else None
        if ticker is not None:
            # Campaigns that were sending when the server stopped go on at once.
            queue.dispatch("tick")
        yield
        if ticker is not None:
            ticker.stop()

    app = FastAPI(title="mailer", version=__version__, docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.middleware("http")(cors.signup_cors)
    app.middleware("http")(admin_auth.console_headers)
    app.include_router(public.router)
    app.include_router(api.router)
    app.include_router(campaigns_api.router)
    app.include_router(digests_api.router)
    app.include_router(admin_api.router)
    app.include_router(admin_auth.router)
    app.include_router(admin_campaigns.router)
    app.include_router(admin.router)

    @app.exception_handler(admin_auth.NotSignedIn)
    async def _sign_in(request: Request, error: admin_auth.NotSignedIn) -> Response:
        from urllib.parse import quote

        return RedirectResponse(f"/admin/login?next={quote(error.path)}", status_code=303)

    @app.exception_handler(admin_auth.BadCsrf)
    async def _bad_csrf(request: Request, error: admin_auth.BadCsrf) -> Response:
        return public.message(request, "This form has expired",
                              ["The page was open too long, or came from somewhere else. Go back, reload it and "
                               "try again."], 400)

    app.include_router(inbound_api.router)
    app.include_router(webhooks_api.router)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        with engine().connect() as connection:
            connection.execute(text("SELECT 1"))
        return {"status": "ok"}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> Response:
        if request.url.path.startswith("/admin"):
            # A console page with a malformed id or field: a page with the sentence, not JSON.
            return public.message(request, "Something is not right", [_validation_sentence(error)], 422)
        return JSONResponse({"detail": _validation_sentence(error)}, status_code=422)

    @app.exception_handler(MailerError)
    async def _mailer_error(request: Request, error: MailerError) -> Response:
        status = 400
        if isinstance(error, NotFound):
            status = 404
        elif isinstance(error, Conflict):
            status = 409
        elif isinstance(error, LoginRefused):
            status = 401
        elif isinstance(error, RateLimited):
            status = 429
        detail = str(error)
        if isinstance(error, InvalidInput):
            status, detail = 422, error.message
        if _is_api(request):
            body: dict[str, str] = {"detail": detail}
            if isinstance(error, InvalidInput):
                body["field"] = error.field
            return JSONResponse(body, status_code=status)
        return public.message(request, "Something is not right", [detail], status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        path = request.url.path
        machine = path.startswith("/webhooks/") or path in {"/healthz", "/docs", "/openapi.json"}
        if _is_api(request) or machine:
            return JSONResponse({"detail": error.detail}, status_code=error.status_code,
                                headers=getattr(error, "headers", None))
        heading = "Page not found" if error.status_code == 404 else "Something is not right"
        return public.message(request, heading, [str(error.detail)], error.status_code)

    return app
