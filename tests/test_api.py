"""The admin JSON API: bearer token, subscribers and categories."""

from __future__ import annotations

from collections.abc import Callable

from fastapi.testclient import TestClient

from mailer.models import Status
from tests.conftest import SmtpSink, consent_actions, subscriber_row


def test_api_needs_the_bearer_token(client: TestClient, env: Callable[..., None]) -> None:
    """Without the token, or with a wrong one, every call gets 401 with a sentence; with none set the API is closed."""
    assert client.get("/api/subscribers").status_code == 401
    wrong = client.get("/api/categories", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert "Authorization: Bearer" in wrong.json()["detail"]
    env(admin_token="")
    closed = client.get("/api/categories", headers={"Authorization": "Bearer "})
    assert closed.status_code == 401
    assert "closed" in closed.json()["detail"]


def test_categories_are_seeded_listed_and_added(admin: TestClient) -> None:
    """The starter categories come from the site; an admin adds one, and a duplicate slug is refused."""
    names = [c["name"] for c in admin.get("/api/categories").json()]
    assert names[:3] == ["Foreign Policy & International Relations", "U.S.–Russia Relations", "U.S.–NATO Relations"]
    created = admin.post("/api/categories", json={"name": "U.S.–China Relations", "description": "Trade and Taiwan."})
    assert created.status_code == 201
    assert created.json()["slug"] == "us-china-relations"
    assert admin.get("/api/categories").json()[-1]["slug"] == "us-china-relations"
    duplicate = admin.post("/api/categories", json={"name": "US-China relations"})
    assert duplicate.status_code == 409
    assert "already exists" in duplicate.json()["detail"]
    bad = admin.post("/api/categories", json={"name": "", "colour": "red"})
    assert bad.status_code == 422
    assert "name" in bad.json()["detail"]


def test_admin_adds_confirmed_subscriber_without_mail(admin: TestClient, smtp: SmtpSink) -> None:
    """Someone added as confirmed gets no mail, and the consent source is recorded."""
    response = admin.post("/api/subscribers", json={
        "email": "Imported@Example.org", "name": "Imp", "categories": ["peace-and-diplomacy"],
        "confirmed": True, "source": "petition sheet, Falmouth, 2025-08-15"})
    assert response.status_code == 201
    body = response.json()
    assert (body["status"], body["categories"], body["email"]) == ("confirmed", ["peace-and-diplomacy"],
                                                                   "Imported@example.org")
    from mailer import queue

    queue.drain()
    assert smtp.messages == []
    assert consent_actions("imported@example.org") == ["admin-add"]
    listed = admin.get("/api/subscribers", params={"email": "imported", "status": "confirmed"}).json()
    assert [s["email"] for s in listed] == ["Imported@example.org"]
    assert admin.get("/api/subscribers", params={"status": "pending"}).json() == []


def test_admin_can_ask_for_the_welcome_mail_or_a_confirmation(admin: TestClient, smtp: SmtpSink) -> None:
    """send_welcome sends the welcome; an unconfirmed add sends a confirmation mail instead."""
    admin.post("/api/subscribers", json={"email": "w@example.org", "confirmed": True, "send_welcome": True})
    admin.post("/api/subscribers", json={"email": "c@example.org"})
    from mailer import queue

    queue.drain()
    smtp.wait_for(2)
    assert smtp.to("w@example.org")[0].message["Subject"].startswith("Welcome")
    assert smtp.to("c@example.org")[0].message["Subject"].startswith("Please confirm")
    assert subscriber_row("c@example.org").status is Status.pending


def test_admin_cannot_resubscribe_someone_who_left(admin: TestClient) -> None:
    """An unsubscribed reader's decision stands; the API says why with a 422."""
    admin.post("/api/subscribers", json={"email": "left@example.org", "confirmed": True})
    from mailer import tokens

    admin.post(f"/unsubscribe/{tokens.unsubscribe_token(subscriber_row('left@example.org').id)}")
    again = admin.post("/api/subscribers", json={"email": "left@example.org", "confirmed": True})
    assert again.status_code == 422
    assert "unsubscribed" in again.json()["detail"]
    assert subscriber_row("left@example.org").status is Status.unsubscribed


def test_api_rejects_bad_input_with_sentences(admin: TestClient) -> None:
    """Bad emails, frequencies, categories and query values get 422 with the field named."""
    assert admin.post("/api/subscribers", json={"email": "nope"}).json()["field"] == "email"
    frequency = admin.post("/api/subscribers", json={"email": "a@example.org", "frequency": "hourly"})
    assert frequency.status_code == 422
    assert frequency.json()["detail"].startswith("frequency:")
    assert admin.post("/api/subscribers", json={"email": "a@example.org", "categories": ["x"]}).status_code == 422
    assert admin.get("/api/subscribers", params={"status": "sleeping"}).status_code == 422
    assert admin.get("/api/subscribers", params={"limit": "0"}).status_code == 422
    assert subscriber_row("a@example.org") is None


def test_healthz(client: TestClient) -> None:
    """The health check reaches the database."""
    assert client.get("/healthz").json() == {"status": "ok"}


def test_openapi_documents_the_api(client: TestClient) -> None:
    """The OpenAPI schema builds, and lists the campaign routes with their response fields."""
    schema = client.get("/openapi.json").json()
    assert "/api/campaigns/{campaign_id}/send" in schema["paths"]
    assert "counts" in schema["components"]["schemas"]["Progress"]["properties"]
    assert client.get("/docs").status_code == 200


def test_subscriber_search_matches_the_console(admin: TestClient) -> None:
    """`GET /api/subscribers` searches names too with `q=`, keeps `email=` to the address, and leaves erased
    readers out, as the console's search does."""
    for email, name in (("ada@example.org", "Ada Lovelace"), ("grace@example.org", "Grace Hopper"),
                        ("erin@example.org", "Erin Lovelace")):
        assert admin.post("/api/subscribers", json={"email": email, "name": name, "confirmed": True}
                          ).status_code == 201
    erin = subscriber_row("erin@example.org")
    assert erin is not None
    assert admin.post(f"/api/subscribers/{erin.id}/erase", json={"reason": "asked by mail"}).status_code == 200

    def emails(**params: str) -> list[str]:
        response = admin.get("/api/subscribers", params=params)
        assert response.status_code == 200, response.text
        return [s["email"] for s in response.json()]

    assert emails(q="LOVELACE") == ["ada@example.org"]
    assert emails(q="grace@") == ["grace@example.org"]
    assert emails(email="lovelace") == [], "email= looks at the address only"
    assert emails(email="example.org") == ["ada@example.org", "grace@example.org"]
    assert emails() == ["ada@example.org", "grace@example.org"], "an erased row is nobody to list"
    assert emails(q="erased") == []
    assert admin.get("/api/subscribers", params={"q": "x" * 201}).status_code == 422
