"""The admin JSON API under /api, behind `Authorization: Bearer $MAILER_ADMIN_TOKEN`."""

from __future__ import annotations

import hmac
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError

from mailer import queue, store, subscriptions
from mailer.categories import slugify
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import InvalidInput
from mailer.models import Category, Frequency, Status, Subscriber
from mailer.subscriptions import Choices, Origin
from mailer.web.clients import client_ip


def require_admin(authorization: Annotated[str | None, Header()] = None) -> None:
    expected = get_settings().admin_token
    if not expected:
        raise HTTPException(401, "The admin API is closed: set MAILER_ADMIN_TOKEN to open it.")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise HTTPException(401, "Send the admin token as 'Authorization: Bearer <token>'.",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter(prefix="/api", dependencies=[Depends(require_admin)])


class CategoryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    slug: str
    name: str
    description: str


class CategoryIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=200)
    slug: str | None = Field(default=None, max_length=120, pattern=r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
    description: str = Field(default="", max_length=2000)


class SubscriberOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    email: str
    name: str
    status: Status
    frequency: Frequency
    categories: list[str]
    created_at: datetime
    confirmed_at: datetime | None
    unsubscribed_at: datetime | None

    @classmethod
    def of(cls, subscriber: Subscriber) -> SubscriberOut:
        return cls(
            id=subscriber.id, email=subscriber.email, name=subscriber.name, status=subscriber.status,
            frequency=subscriber.frequency, categories=[c.slug for c in subscriber.categories],
            created_at=subscriber.created_at, confirmed_at=subscriber.confirmed_at,
            unsubscribed_at=subscriber.unsubscribed_at,
        )


class SubscriberIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(max_length=320)
    name: str = Field(default="", max_length=200)
    categories: list[str] = []
    frequency: Frequency = Frequency.daily
    confirmed: bool = False
    source: str = Field(default="admin-api", min_length=1, max_length=200,
                        description="Where the consent was given, e.g. 'event sign-up sheet 2025-08-15'.")
    send_welcome: bool = False
    timezone: str | None = Field(default=None, max_length=64,
                                 description="For the digest hour, e.g. Europe/London; default the site's.")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"{value!r} is not a time zone such as Europe/London") from None
        return value or None


@router.get("/categories")
def list_categories() -> list[CategoryOut]:
    with session_scope() as session:
        return [CategoryOut.model_validate(c) for c in store.categories(session)]


@router.post("/categories", status_code=201)
def add_category(body: CategoryIn) -> CategoryOut:
    slug = body.slug or slugify(body.name)
    if not slug:
        raise InvalidInput("name", "The name needs at least one letter or digit.")
    try:
        with session_scope() as session:
            if store.category_by_slug(session, slug):
                raise HTTPException(409, f"A category with the slug '{slug}' already exists.")
            category = Category(slug=slug, name=body.name.strip(), description=body.description,
                                position=store.next_category_position(session))
            session.add(category)
            session.flush()
            return CategoryOut.model_validate(category)
    except IntegrityError:
        raise HTTPException(409, f"A category with the slug '{slug}' already exists.") from None


@router.get("/subscribers")
def list_subscribers(
    q: Annotated[str, Query(max_length=200, description="Part of the address or the name.")] = "",
    email: Annotated[str | None, Query(max_length=320, description="Part of the address.")] = None,
    status: Status | None = None,
    after: Annotated[int, Query(ge=0, le=2**31 - 1, description="Return subscribers with an id above this one.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[SubscriberOut]:
    with session_scope() as session:
        found = store.find_subscribers(session, query=q, email=email, status=status, after_id=after, limit=limit)
        return [SubscriberOut.of(s) for s in found]


@router.post("/subscribers", status_code=201)
def add_subscriber(body: SubscriberIn, request: Request) -> SubscriberOut:
    origin = Origin(channel="admin-api", ip=client_ip(request), user_agent=request.headers.get("user-agent"))
    for attempt in range(2):
        try:
            with session_scope() as session:
                subscriber, notice, _created = subscriptions.add_by_admin(
                    session, email=body.email,
                    choices=Choices(name=body.name, categories=tuple(body.categories), frequency=body.frequency),
                    confirmed=body.confirmed, source=body.source, welcome=body.send_welcome, origin=origin,
                )
                subscriber.timezone = body.timezone
                out = SubscriberOut.of(subscriber)
                notice_id = notice.id if notice else None
            break
        except IntegrityError:
            # Two adds of one new address raced; the second finds the row the first made.
            if attempt:
                raise HTTPException(409, "This address was added at the same moment; try again.") from None
    if notice_id is not None:
        queue.dispatch("send_notice", notice_id)
    return out
