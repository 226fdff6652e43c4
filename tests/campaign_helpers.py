"""Helpers for campaign tests: create, send and wait, in-process or through workers."""

from __future__ import annotations

import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from mailer import campaigns, queue
from mailer.db import session_scope
from mailer.models import Delivery, Subscriber

PETITION = ("<h1>Sign our petition</h1><p>Dear {{ name or 'reader' }}, diplomacy first: "
            "<a href='https://truthandresistance.example/petition'>sign the petition</a>.</p>")


def create(admin: TestClient, **fields: Any) -> int:
    body = {"subject": "Petition: talks, not tanks", "html": PETITION, **fields}
    response = admin.post("/api/campaigns", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def wait_until(admin: TestClient, campaign_id: int, *, statuses: tuple[str, ...] = ("finished",),
               timeout: float = 60.0, tick: bool = True) -> dict[str, Any]:
    """Poll the campaign; run the periodic tick as beat would, so retries and sweeps happen."""
    deadline = time.monotonic() + timeout
    last_tick = 0.0
    while True:
        body: dict[str, Any] = admin.get(f"/api/campaigns/{campaign_id}").json()
        if body["status"] in statuses:
            queue.drain()
            return admin.get(f"/api/campaigns/{campaign_id}").json()  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"campaign stuck: {body}"
        if tick and time.monotonic() - last_tick > 0.3:
            campaigns.tick()
            last_tick = time.monotonic()
        time.sleep(0.05)


def deliveries(campaign_id: int) -> dict[str, Delivery]:
    """Deliveries by reader email."""
    with session_scope() as session:
        rows = session.execute(
            select(Subscriber.email_key, Delivery).join(Delivery, Delivery.subscriber_id == Subscriber.id)
            .where(Delivery.campaign_id == campaign_id)
        ).all()
        session.expunge_all()
    return {email: delivery for email, delivery in rows}
