"""Shared fixtures: a migrated SQLite file and PostgreSQL database per run, a real SMTP server.

Every database test runs once on SQLite and once on PostgreSQL (the `backend` fixture). Tables
are emptied between tests; the schema comes from the real Alembic migrations.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, sync_playwright
from sqlalchemy import delete, select

from mailer import queue
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.migrate import upgrade
from mailer.models import (
    Admin,
    AdminAction,
    AdminSession,
    Article,
    Campaign,
    Category,
    ConsentEvent,
    Delivery,
    DigestContent,
    DigestCursor,
    Feed,
    ImportJob,
    InboundMessage,
    Notice,
    Subscriber,
    Suppression,
    WorkerBeat,
    article_categories,
    subscriber_categories,
)
from mailer.web import clients
from mailer.web.app import create_app

PG_ADMIN_URL = os.environ.get("MAILER_TEST_PG", "postgresql://127.0.0.1:5432/test")
ADMIN_TOKEN = "test-admin-token-0123456789"
STARTER_SLUGS = 7


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- A real SMTP server --------------------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        parsed = message_from_bytes(self.data, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed

    def part(self, subtype: str) -> str:
        body = self.message.get_body(preferencelist=(subtype,))
        assert body is not None, f"no text/{subtype} part"
        return str(body.get_content())


def advertise_pipelining(responses: list[str]) -> list[str]:
    """aiosmtpd reads commands one line at a time, so pipelined ones work, but it does not say so in EHLO."""
    return [*responses[:-1], "250-PIPELINING", responses[-1]]


@dataclass
class SmtpSink:
    """An aiosmtpd server on a free port that keeps every message it accepts. It offers PIPELINING,
    as real servers do, so the tests send the way production does."""

    port: int = 0
    messages: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        return advertise_pipelining(responses)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()

    def to(self, address: str) -> list[Received]:
        with self.lock:
            return [m for m in self.messages if address.lower() in (r.lower() for r in m.recipients)]

    def wait_for(self, count: int, timeout: float = 20.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"expected {count} mails, got {len(self.messages)}")


@pytest.fixture(scope="session")
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    sink.port = controller.port
    yield sink
    controller.stop()


# --- Databases -----------------------------------------------------------------------------------


def create_pg_database() -> tuple[str, Callable[[], None]]:
    """A fresh PostgreSQL database for this run; returns its URL and a function that drops it."""
    name = f"mailer_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}", drop


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated database URL; every test that uses it runs on both SQLite and PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'mailer.db'}"
        upgrade(url)
        yield url
        return
    url, drop = create_pg_database()
    try:
        upgrade(url)
        yield url
    finally:
        from mailer.db import engine_for

        engine_for(url).dispose()
        drop()


def base_env(database_url: str, smtp_port: int, outbox: Path) -> dict[str, str]:
    return {
        "MAILER_DATABASE_URL": database_url,
        "MAILER_SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",
        "MAILER_SMTP_TIMEOUT": "5",
        "MAILER_OUTBOX_DIR": str(outbox),
        "MAILER_SECRET_KEY": "test-secret-key-0123456789abcdef",
        "MAILER_ADMIN_TOKEN": ADMIN_TOKEN,
        "MAILER_BASE_URL": "https://news.example.org",
        "MAILER_FROM": "Truth and Resistance <newsletter@news.example.org>",
        "MAILER_SIGNUP_RATE_LIMIT": "1000/minute",
        "MAILER_BROKER_URL": "",
        # Tests start digest runs themselves; the tick must not start one because of the hour.
        "MAILER_SCHEDULE_DIGESTS": "false",
        # Tests add articles and run digests within the same second.
        "MAILER_DIGEST_GRACE_SECONDS": "0",
    }


def empty_tables() -> None:
    with session_scope() as session:
        for table in (AdminAction.__table__, ImportJob.__table__, AdminSession.__table__, Admin.__table__,
                      InboundMessage.__table__, Feed.__table__, DigestCursor.__table__, article_categories,
                      Article.__table__, Delivery.__table__, DigestContent.__table__, Campaign.__table__,
                      Suppression.__table__, WorkerBeat.__table__, subscriber_categories, Notice.__table__,
                      ConsentEvent.__table__, Subscriber.__table__):
            session.execute(delete(table))
        session.execute(delete(Category).where(Category.id > STARTER_SLUGS))


@pytest.fixture
def env(
    backend: str, smtp: SmtpSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., None]]:
    """Set mailer's environment for this test; call the returned function to change settings."""

    def apply(**overrides: str) -> None:
        for key, value in overrides.items():
            monkeypatch.setenv(f"MAILER_{key.upper()}", value)
        get_settings.cache_clear()
        clients._limiter.cache_clear()

    for key, value in base_env(backend, smtp.port, tmp_path / "outbox").items():
        monkeypatch.setenv(key, value)
    apply()
    empty_tables()
    smtp.clear()
    yield apply
    queue.drain()
    get_settings.cache_clear()


@pytest.fixture
def client(env: Callable[..., None]) -> Iterator[TestClient]:
    with TestClient(create_app(), base_url="https://news.example.org") as test_client:
        yield test_client


@pytest.fixture
def admin(client: TestClient) -> TestClient:
    client.headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    return client


# --- Helpers -------------------------------------------------------------------------------------


def subscriber_row(email: str) -> Subscriber | None:
    with session_scope() as session:
        return session.scalars(select(Subscriber).where(Subscriber.email_key == email.lower())).first()


def consent_actions(email: str) -> list[str]:
    with session_scope() as session:
        row = session.scalars(select(Subscriber).where(Subscriber.email_key == email.lower())).first()
        if row is None:
            return []
        events = session.scalars(
            select(ConsentEvent).where(ConsentEvent.subscriber_id == row.id).order_by(ConsentEvent.id)
        )
        return [e.action for e in events]


def sign_up(client: TestClient, email: str, **fields: Any) -> Any:
    data = {"email": email, "frequency": "daily", **fields}
    response = client.post("/subscribe", data=data)
    queue.drain()
    return response


def link_path(url: str) -> str:
    """The path of a link in a mail, for the test client."""
    assert url.startswith("https://news.example.org/"), url
    return url.removeprefix("https://news.example.org")


def backdate_notices(email: str, *, minutes: float) -> None:
    """Move an address's earlier mails into the past, as if time had passed (for the rate limits)."""
    from datetime import timedelta

    from sqlalchemy import update

    row = subscriber_row(email)
    assert row is not None
    with session_scope() as session:
        for notice in session.scalars(select(Notice).where(Notice.subscriber_id == row.id)):
            session.execute(update(Notice).where(Notice.id == notice.id)
                            .values(created_at=notice.created_at - timedelta(minutes=minutes)))


def make_readers(count: int, *, prefix: str = "reader", categories: tuple[str, ...] = (),
                 status: str = "confirmed") -> list[int]:
    """Insert readers quickly (one statement); returns their ids in order."""
    from sqlalchemy import insert

    from mailer.models import Category, utcnow
    from mailer.subscriptions import hash_email

    now = utcnow()
    rows = [{"email": f"{prefix}{i}@example.org", "email_key": f"{prefix}{i}@example.org",
             "email_hash": hash_email(f"{prefix}{i}@example.org"), "name": f"Reader {i}", "frequency": "daily",
             "status": status, "created_at": now, "updated_at": now, "confirmed_at": now} for i in range(count)]
    with session_scope() as session:
        session.execute(insert(Subscriber), rows)
        ids = list(session.scalars(select(Subscriber.id).where(Subscriber.email_key.like(f"{prefix}%@example.org"))
                                   .order_by(Subscriber.id)))
        if categories:
            wanted = list(session.scalars(select(Category.id).where(Category.slug.in_(categories))))
            session.execute(insert(subscriber_categories),
                            [{"subscriber_id": s, "category_id": c} for s in ids for c in wanted])
    return ids


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def server(env: Callable[..., None]) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env(base_url=base)
    server = uvicorn.Server(uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield base
    server.should_exit = True
    thread.join(timeout=10)
