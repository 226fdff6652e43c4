"""Transports: SMTP with aiosmtplib, and a Maildir outbox for machines without a mail server.

A transport answers every message with a `Result` whose `outcome` says whether the mail was taken,
failed for good (a 5xx: never retry) or failed for now (4xx, timeouts, dropped connections: retry).
"""

from __future__ import annotations

import asyncio
import enum
import mailbox
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib

from mailer.config import Settings


class Outcome(enum.StrEnum):
    sent = "sent"
    permanent = "permanent"
    temporary = "temporary"


@dataclass(frozen=True)
class Envelope:
    sender: str
    recipient: str
    data: bytes


@dataclass(frozen=True)
class Result:
    outcome: Outcome
    code: int = 250
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.sent


class Transport(Protocol):
    async def send(self, envelope: Envelope) -> Result: ...

    async def close(self) -> None: ...


class OutboxTransport:
    """Writes each mail into a Maildir that any mail reader can open."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def send(self, envelope: Envelope) -> Result:
        def write() -> None:
            box = mailbox.Maildir(self.directory, create=True)
            box.add(b"Return-Path: <" + envelope.sender.encode() + b">\r\n" + envelope.data)

        await asyncio.to_thread(write)
        return Result(Outcome.sent, 250, "stored in outbox")

    async def close(self) -> None:
        return None


def _classify(code: int, text: str) -> Result:
    outcome = Outcome.permanent if 500 <= code < 600 else Outcome.temporary
    return Result(outcome, code, text)


class SmtpTransport:
    """One kept-open SMTP connection; reconnects after a drop or a 421, never reusing a broken session."""

    def __init__(self, url: str, *, timeout: float) -> None:
        parts = urlsplit(url)
        self.hostname = parts.hostname or "localhost"
        self.implicit_tls = parts.scheme == "smtps"
        self.port = parts.port or (465 if self.implicit_tls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        self.timeout = timeout
        self._client: aiosmtplib.SMTP | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
            return self._client
        client = aiosmtplib.SMTP(
            hostname=self.hostname,
            port=self.port,
            use_tls=self.implicit_tls,
            # None means: upgrade with STARTTLS when the server offers it.
            start_tls=None if not self.implicit_tls else False,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
        )
        await client.connect()
        self._client = client
        return client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def send(self, envelope: Envelope) -> Result:
        try:
            client = await self._connect()
            errors, reply = await client.sendmail(envelope.sender, [envelope.recipient], envelope.data)
        except aiosmtplib.SMTPRecipientsRefused as refused:
            await self._reset()
            code, text = refused.recipients[0].code, refused.recipients[0].message
            return _classify(code, text)
        except aiosmtplib.SMTPResponseException as error:
            if error.code == 421:
                await self._drop()
            else:
                await self._reset()
            return _classify(error.code, error.message)
        except (aiosmtplib.SMTPException, OSError) as error:
            await self._drop()
            return Result(Outcome.temporary, 0, f"{type(error).__name__}: {error}")
        if errors:
            code, text = next(iter(errors.values()))
            return _classify(code, text)
        return Result(Outcome.sent, 250, reply)

    async def _reset(self) -> None:
        # After a refusal the session must be clean before the next MAIL FROM ("503 sender already specified").
        if self._client is None:
            return
        try:
            await self._client.rset()
        except (aiosmtplib.SMTPException, OSError):
            await self._drop()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def transport_for(settings: Settings) -> Transport:
    if settings.smtp_url:
        return SmtpTransport(settings.smtp_url.split(",")[0].strip(), timeout=settings.smtp_timeout)
    return OutboxTransport(settings.outbox_dir)
