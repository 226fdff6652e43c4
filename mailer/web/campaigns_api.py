"""Admin API for campaigns: create, send, schedule, pause, resume, cancel, test, progress."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from mailer import campaigns, console
from mailer.campaigns import Progress
from mailer.db import session_scope
from mailer.models import Campaign, DeliveryState
from mailer.subscriptions import normalize_email
from mailer.web.api import require_admin
from mailer.web.ids import BIG_MAX, ROW_MAX

CampaignId = Annotated[int, Path(ge=1, le=ROW_MAX, description="The campaign's id.")]

router = APIRouter(prefix="/api/campaigns", dependencies=[Depends(require_admin)], tags=["campaigns"])


class CampaignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(min_length=1, max_length=300, description="A Jinja template; sees name, email, links.")
    html: str = Field(default="", description="A Jinja template, placed inside templates/email/broadcast/.")
    markdown: str | None = Field(default=None, description="Instead of html: Markdown, made into the HTML.")
    text: str = Field(default="", description="Optional; made from the HTML when empty.")
    categories: list[str] = Field(default=[], description="Category slugs; empty means everyone confirmed.")


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    at: datetime


class TestIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    emails: Annotated[list[str], Field(min_length=1, max_length=20)]


class TestResult(BaseModel):
    email: str
    sent: bool
    reply: str


def _out(campaign_id: int) -> Progress:
    with session_scope() as session:
        return campaigns.progress(session, campaign_id)


@router.post("", status_code=201)
def create(body: CampaignIn) -> Progress:
    with session_scope() as session:
        campaign = campaigns.create(session, subject=body.subject, html=body.html, text=body.text,
                                    categories=body.categories, markdown=body.markdown)
        campaign_id = campaign.id
    return _out(campaign_id)


@router.patch("/{campaign_id}")
def edit(campaign_id: CampaignId, body: CampaignIn) -> Progress:
    """Change a draft or a scheduled campaign (409 once it is sending)."""
    with session_scope() as session:
        campaigns.edit(session, campaign_id, subject=body.subject, html=body.html, text=body.text,
                       categories=body.categories, markdown=body.markdown)
    return _out(campaign_id)


@router.get("")
def list_campaigns(limit: int = 50) -> list[Progress]:
    with session_scope() as session:
        ids = session.scalars(select(Campaign.id).order_by(Campaign.id.desc()).limit(max(1, min(limit, 500)))).all()
    return [_out(campaign_id) for campaign_id in ids]


@router.get("/{campaign_id}")
def get(campaign_id: CampaignId) -> Progress:
    return _out(campaign_id)


@router.get("/{campaign_id}/preview")
def preview(campaign_id: CampaignId, subscriber_id: Annotated[int | None, Query(ge=1)] = None,
            email: str | None = None) -> console.Preview:
    """The campaign as one subscriber's mail would carry it (a sample reader when none is given)."""
    with session_scope() as session:
        return console.preview(session, campaign_id, subscriber_id=subscriber_id, email_address=email)


@router.get("/{campaign_id}/deliveries")
def deliveries(campaign_id: CampaignId, q: str = "", state: DeliveryState | None = None,
               after: Annotated[int, Query(ge=0, le=BIG_MAX)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[console.DeliveryLine]:
    """The delivery log, searchable by address or SMTP reply; walk it with `after` = the last id."""
    with session_scope() as session:
        return console.delivery_log(session, campaign_id, query=q, state=state, after_id=after, limit=limit)


@router.post("/{campaign_id}/send", status_code=202)
def send(campaign_id: CampaignId) -> Progress:
    with session_scope() as session:
        started = campaigns.start(session, campaign_id)
    if started:
        campaigns.kick(campaign_id)
    return _out(campaign_id)


@router.post("/{campaign_id}/schedule")
def schedule(campaign_id: CampaignId, body: ScheduleIn) -> Progress:
    with session_scope() as session:
        campaigns.schedule(session, campaign_id, body.at)
    return _out(campaign_id)


@router.post("/{campaign_id}/pause")
def pause(campaign_id: CampaignId) -> Progress:
    with session_scope() as session:
        campaigns.pause(session, campaign_id)
    return _out(campaign_id)


@router.post("/{campaign_id}/resume")
def resume(campaign_id: CampaignId) -> Progress:
    with session_scope() as session:
        resumed = campaigns.resume(session, campaign_id)
    if resumed:
        campaigns.kick(campaign_id)
    return _out(campaign_id)


@router.post("/{campaign_id}/cancel")
def cancel(campaign_id: CampaignId) -> Progress:
    with session_scope() as session:
        campaigns.cancel(session, campaign_id)
    return _out(campaign_id)


@router.post("/{campaign_id}/test")
async def test(campaign_id: CampaignId, body: TestIn, response: Response) -> list[TestResult]:
    emails = [normalize_email(email)[0] for email in body.emails]
    results = await campaigns.send_test(campaign_id, emails)
    if not all(result.ok for result in results.values()):
        response.status_code = 502
    return [TestResult(email=email, sent=result.ok, reply=f"{result.code} {result.text}".strip())
            for email, result in results.items()]
