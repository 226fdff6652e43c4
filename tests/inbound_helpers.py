"""Helpers for inbound tests: realistic samples with our addresses filled in, and sent deliveries to bounce."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update

from mailer import addresses, campaigns, inbound, render, tokens
from mailer.db import session_scope
from mailer.models import Delivery, DeliveryState, InboundMessage, Subscriber, utcnow
from tests.conftest import make_readers

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str, **values: str) -> bytes:
    """tests/samples/<name>.eml with @@KEY@@ placeholders filled in, as CRLF bytes as they come off the wire."""
    text = (SAMPLES / f"{name}.eml").read_text()
    defaults = {"RETURN_PATH": "bounces@news.example.org", "MESSAGE_ID": "<unrelated.1@example.net>",
                "LIST_UNSUBSCRIBE": "<https://example.net/unsubscribe>", "RCPT": "someone@example.net"}
    merged = {**defaults, **{key.upper(): value for key, value in values.items()}}
    merged.setdefault("TO", merged["RETURN_PATH"])
    merged.setdefault("ORIGINAL_RETURN_PATH", merged["RETURN_PATH"])
    for key, value in merged.items():
        text = text.replace(f"@@{key}@@", value)
    assert "@@" not in text, f"{name}: a placeholder is left"
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


@dataclass(frozen=True)
class Sent:
    """A delivery that went out, and what its mail carried."""

    delivery_id: int
    campaign_id: int
    subscriber_id: int
    email: str

    @property
    def return_path(self) -> str:
        return addresses.return_path(self.delivery_id)

    @property
    def message_id(self) -> str:
        return addresses.message_id(self.campaign_id, self.delivery_id)

    @property
    def list_unsubscribe(self) -> str:
        links = tokens.urls(self.subscriber_id)
        return render.list_unsubscribe(links["unsubscribe_url"], links["unsubscribe_mailto"])

    def values(self) -> dict[str, str]:
        return {"return_path": self.return_path, "message_id": self.message_id,
                "list_unsubscribe": self.list_unsubscribe, "rcpt": self.email}


def sent_campaign(count: int, *, prefix: str = "reader", status: str = "sending") -> list[Sent]:
    """A campaign to `count` new readers whose deliveries are all recorded as sent (no SMTP involved)."""
    make_readers(count, prefix=prefix)
    with session_scope() as session:
        campaign = campaigns.create(session, subject="Petition: talks, not tanks", html="<p>Diplomacy first.</p>")
        campaign_id = campaign.id
        campaigns.start(session, campaign_id)
        session.execute(update(Delivery).where(Delivery.campaign_id == campaign_id).values(
            state=DeliveryState.sent, sent_at=utcnow(), attempts=1))
        if status == "finished":
            campaigns.finish_if_done(session, campaign_id)
        rows = session.execute(select(Delivery.id, Delivery.subscriber_id, Subscriber.email)
                               .join(Subscriber, Subscriber.id == Delivery.subscriber_id)
                               .where(Delivery.campaign_id == campaign_id).order_by(Delivery.id)).all()
    return [Sent(delivery_id, campaign_id, subscriber_id, email) for delivery_id, subscriber_id, email in rows]


def take_in(raw: bytes, *, channel: str = "smtp", rcpt_to: list[str] | None = None) -> InboundMessage:
    """Receive a message as a listener would and process it as its task would; returns the row."""
    inbound_id = inbound.receive(channel=channel, raw=raw, rcpt_to=rcpt_to, dispatch=False)
    assert inbound_id is not None
    inbound.process(inbound_id)
    return row(inbound_id)


def row(inbound_id: int) -> InboundMessage:
    with session_scope() as session:
        found = session.get(InboundMessage, inbound_id)
        assert found is not None
        session.expunge(found)
        return found
