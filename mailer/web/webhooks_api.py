"""Provider webhooks at /webhooks/{provider}: verify, store each event, queue its processing.

Every answer is JSON with a sentence. A provider retries on 5xx, so a database failure answers 503;
a bad signature answers 401 or 403 and stores nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from mailer import inbound, webhooks
from mailer.config import get_settings
from mailer.errors import Rejected

log = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", include_in_schema=False)


def _answer(status: int, detail: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Basic realm="mailer webhooks"'} if status == 401 else None
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


async def _body(request: Request) -> bytes:
    body = await request.body()
    if len(body) > get_settings().inbound_max_bytes:
        raise Rejected(413, "The request is larger than MAILER_INBOUND_MAX_BYTES.")
    return body


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Rejected(400, "The request body is not JSON.") from None


def _store(channel: str, items: list[tuple[str, bytes]]) -> int:
    stored = 0
    for ref, raw in items:
        if inbound.receive(channel=channel, raw=raw, source_ref=ref, subject="") is not None:
            stored += 1
    return stored


def _handle(provider: str, body: bytes, *, authorization: str | None, token: str | None,
            signature: str | None, timestamp: str | None) -> JSONResponse:
    """Verify and store, in a worker thread: fetching an SNS certificate and writing rows both block."""
    try:
        if provider == "sendgrid":
            webhooks.verify_sendgrid(signature=signature, timestamp=timestamp, body=body)
            items = webhooks.split_sendgrid(_json(body))
        elif provider == "postmark":
            webhooks.check_postmark(authorization=authorization, token=token)
            items = webhooks.split_postmark(_json(body))
        else:
            message = _json(body)
            if not isinstance(message, dict):
                raise Rejected(400, "The request body is not an SNS message.")
            webhooks.verify_sns(message)
            if message.get("Type") == "SubscriptionConfirmation":
                webhooks.confirm_sns_subscription(message)
                log.info("confirmed the SNS subscription to %s", message.get("TopicArn"))
                return _answer(200, "Subscription confirmed.")
            if message.get("Type") != "Notification":
                return _answer(200, "Nothing to do.")
            items = webhooks.split_ses(message)
    except Rejected as rejected:
        log.warning("webhook %s refused: %s", provider, rejected.message)
        return _answer(rejected.status, rejected.message)
    try:
        stored = _store(provider, items)
    except Exception:
        log.exception("webhook %s: could not store its events", provider)
        return _answer(503, "The events could not be stored just now; please retry.")
    return _answer(200, f"{stored} event{'s' if stored != 1 else ''} stored.", stored=stored,
                   received=len(items))


@router.post("/{provider}")
async def webhook(
    provider: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_webhook_token: Annotated[str | None, Header()] = None,
    token: Annotated[str | None, Query(max_length=500)] = None,
    x_twilio_email_event_webhook_signature: Annotated[str | None, Header()] = None,
    x_twilio_email_event_webhook_timestamp: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    if provider not in webhooks.PROVIDERS:
        return _answer(404, f"There is no webhook for {provider[:40]!r}; use one of {', '.join(webhooks.PROVIDERS)}.")
    try:
        body = await _body(request)
    except Rejected as rejected:
        return _answer(rejected.status, rejected.message)
    return await run_in_threadpool(_handle, provider, body, authorization=authorization,
                                   token=x_webhook_token or token, signature=x_twilio_email_event_webhook_signature,
                                   timestamp=x_twilio_email_event_webhook_timestamp)
