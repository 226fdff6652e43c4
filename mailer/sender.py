"""Transports: SMTP with aiosmtplib, and a Maildir outbox for machines without a mail server.

Every message gets a `Result` whose `outcome` is explicit:

    sent        the server answered 250 to the final dot
    permanent   a 5xx reply: never retry
    temporary   a 4xx reply, or the connection failed before the message was handed over: retry later
    unknown     the connection failed after DATA began: the server may or may not have the message
    skipped     the caller's last check before DATA said no; nothing was handed over

A connection that saw a 421, a timeout or a drop is closed and never reused ("503 sender already
specified" is what reusing a broken session looks like).

When the server offers PIPELINING (RFC 2920), MAIL FROM, RCPT TO and DATA go out in one write while
the caller's hand-over check runs beside them; the message itself is written only once the server
answered 354 and the check said yes, so "handed over" still means "committed before any byte of the
message". Without PIPELINING each command waits for its reply, and the check runs after RCPT TO.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import mailbox
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiosmtplib
from aiosmtplib.protocol import MAX_RESPONSE_LENGTH, SMTPProtocol

from mailer.config import Settings

log = logging.getLogger(__name__)

# A server that refused a connection is left alone for this long before it is tried again.
SERVER_DOWN_SECONDS = 30.0


class Outcome(enum.StrEnum):
    sent = "sent"
    permanent = "permanent"
    temporary = "temporary"
    unknown = "unknown"
    skipped = "skipped"


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
    # The server refused our MAIL FROM: a problem of the sender or the server, never of this recipient.
    sender_refused: bool = False

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.sent

    @property
    def enhanced(self) -> str:
        """The RFC 3463 enhanced status code at the start of the reply text (e.g. '5.1.1'), or ''."""
        first = self.text.split(" ", 1)[0] if self.text else ""
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            return first
        return ""


BeforeData = Callable[[], Awaitable[bool]]

_SKIPPED = Result(Outcome.skipped, 0, "not sent: no longer eligible")


class Transport(Protocol):
    async def send(self, envelope: Envelope, before_data: BeforeData | None = None) -> Result: ...

    def announce(self, envelope: Envelope | None, before_data: BeforeData | None = None) -> None:
        """Name the message that `send` gets next on this transport (None: none), so its envelope may
        go out right behind the current message. Its `before_data` may then run before that `send`."""
        ...

    async def abandon(self) -> None:
        """The announced message will not be sent: forget it, ending the session if its envelope went out
        (its `before_data` has then run, or is waited for here)."""
        ...

    async def eight_bit(self) -> bool:
        """Whether 8bit message bodies may be sent (RFC 6152 8BITMIME)."""
        ...

    async def close(self) -> None: ...


class OutboxTransport:
    """Writes each mail into a Maildir that any mail reader can open."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._box: mailbox.Maildir | None = None

    async def send(self, envelope: Envelope, before_data: BeforeData | None = None) -> Result:
        if before_data is not None and not await before_data():
            return Result(Outcome.skipped, 0, "not sent: no longer eligible")
        if self._box is None:
            self._box = mailbox.Maildir(self.directory, create=True)
        self._box.add(b"Return-Path: <" + envelope.sender.encode() + b">\r\n" + envelope.data)
        return Result(Outcome.sent, 250, "stored in outbox")

    def announce(self, envelope: Envelope | None, before_data: BeforeData | None = None) -> None:
        return None

    async def abandon(self) -> None:
        return None

    async def eight_bit(self) -> bool:
        return True

    async def close(self) -> None:
        return None


class _NotHandedOver(Exception):
    """The connection failed before any byte of the message was written."""


def _classify(code: int, text: str) -> Result:
    outcome = Outcome.permanent if 500 <= code < 600 else Outcome.temporary
    return Result(outcome, code, text)


def _sender_refused(code: int, text: str) -> Result:
    """The answer to MAIL FROM was not 250. Whatever the code, it says nothing about the recipient: retry
    later. A 421 is the server closing the session, not a verdict on the sender, so it only defers the
    message (the session is already dropped); any other code means the sender itself was refused."""
    return Result(Outcome.temporary, code, text, sender_refused=code != 421)


@dataclass(frozen=True)
class Server:
    hostname: str
    port: int
    implicit_tls: bool
    username: str | None
    password: str | None

    @classmethod
    def parse(cls, url: str) -> Server:
        parts = urlsplit(url)
        implicit_tls = parts.scheme == "smtps"
        return cls(
            hostname=parts.hostname or "localhost",
            port=parts.port or (465 if implicit_tls else 25),
            implicit_tls=implicit_tls,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"{self.hostname}:{self.port}"


class _PipeliningProtocol(SMTPProtocol):
    """aiosmtplib's protocol holds one reply at a time and drops bytes that arrive while no reply is
    awaited; with several commands in flight every reply must be kept until it is read, in order.
    Swapped in (same state, other methods) on connections whose server offers PIPELINING."""

    def data_received(self, data: bytes) -> None:
        if self._response_waiter is None:
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            del self._buffer[:]
            if not self._response_waiter.done():
                self._set_response_exception(self._response_waiter, aiosmtplib.SMTPResponseException(
                    aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"))
            return
        self._deliver()

    def _deliver(self) -> None:
        waiter = self._response_waiter
        if waiter is None or waiter.done():
            return
        try:
            response = self._read_response_from_buffer()
        except Exception as error:
            self._set_response_exception(waiter, error)
        else:
            if response is not None:
                waiter.set_result(response)

    async def read_response(self, timeout: float | None = None) -> aiosmtplib.SMTPResponse:
        self._deliver()  # A reply may already wait in the buffer, behind the one read last.
        waiter = self._response_waiter
        if waiter is not None and waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            # Already here (the replies of a pipelined group come together): no timer to set and cancel.
            self._response_pending = False
            self._response_waiter = None if self.transport is None else self._loop.create_future()
            return waiter.result()
        return await super().read_response(timeout)


def _pipelining(client: aiosmtplib.SMTP) -> bool:
    return isinstance(client.protocol, _PipeliningProtocol)


# Per process: when each server may be tried again after it refused a connection.
_down_until: dict[Server, float] = {}


@dataclass
class _Ahead:
    """The next message's envelope. Once written behind the current message (RFC 2920 lets the message
    open a group), `client` is that session and `check` its hand-over check, started with the write."""

    envelope: Envelope
    before_data: BeforeData | None
    client: aiosmtplib.SMTP | None = None
    check: asyncio.Future[bool] | None = None

    def matches(self, envelope: Envelope) -> bool:
        return (self.envelope.sender, self.envelope.recipient) == (envelope.sender, envelope.recipient)


class SmtpTransport:
    """One kept-open SMTP session, with failover across the configured servers in order."""

    def __init__(self, urls: list[str], *, timeout: float) -> None:
        self.servers = [Server.parse(url) for url in urls]
        self.timeout = timeout
        self._client: aiosmtplib.SMTP | None = None
        self.server: Server | None = None
        self._next: _Ahead | None = None      # announced, not written yet
        self._written: _Ahead | None = None   # written behind the last message, replies not read yet

    async def _connect(self) -> aiosmtplib.SMTP:
        if self._client is not None and self._client.is_connected:
            return self._client
        now = time.monotonic()
        candidates = [s for s in self.servers if _down_until.get(s, 0) <= now] or self.servers
        last_error: Exception | None = None
        for server in candidates:
            client = aiosmtplib.SMTP(
                hostname=server.hostname,
                port=server.port,
                use_tls=server.implicit_tls,
                # None: upgrade with STARTTLS when the server offers it. With a password, TLS is required:
                # a server that stops offering STARTTLS must not get the password in clear.
                start_tls=False if server.implicit_tls else (True if server.username else None),
                username=server.username,
                password=server.password,
                timeout=self.timeout,
            )
            try:
                await client.connect()
            except (aiosmtplib.SMTPException, OSError) as error:
                log.warning("SMTP server %s refused the connection: %s", server, error)
                _down_until[server] = time.monotonic() + SERVER_DOWN_SECONDS
                last_error = error
                continue
            _down_until.pop(server, None)
            if client.supports_extension("pipelining") and type(client.protocol) is SMTPProtocol:
                client.protocol.__class__ = _PipeliningProtocol
            self._client, self.server = client, server
            return client
        raise ConnectionError(f"no SMTP server answered: {last_error}")

    async def eight_bit(self) -> bool:
        try:
            client = await self._connect()
        except OSError:
            return False  # send() will report the connection problem for the message itself.
        return bool(client.supports_extension("8bitmime"))

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    async def _reset(self) -> None:
        # After a refusal the session must be clean before the next MAIL FROM.
        if self._client is None:
            return
        try:
            await self._client.rset()
        except (aiosmtplib.SMTPException, OSError):
            self._drop()

    @staticmethod
    def _commands(client: aiosmtplib.SMTP, envelope: Envelope) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """The MAIL FROM and RCPT TO commands (verb and arguments) for this envelope's own sender."""
        utf8 = not (envelope.sender + envelope.recipient).isascii()
        mail_options = [b"SMTPUTF8"] if utf8 else []
        if client.supports_extension("8bitmime"):
            mail_options.append(b"BODY=8BITMIME")
        return ((b"MAIL", b"FROM:<" + envelope.sender.encode() + b">", *mail_options),
                (b"RCPT", b"TO:<" + envelope.recipient.encode() + b">"))

    async def _envelope(self, envelope: Envelope) -> Result | None:
        """MAIL FROM and RCPT TO; a Result when the server refused, None when it accepted both."""
        client = await self._connect()
        # execute_command skips aiosmtplib's address re-parsing, which costs more than the round trip;
        # the addresses were validated when they were stored.
        for verb, *arguments in self._commands(client, envelope):
            response = await client.execute_command(verb, *arguments)
            if response.code in (250, 251):
                continue
            if response.code == 421:
                self._drop()
            else:
                await self._reset()
            if verb == b"MAIL":
                return _sender_refused(response.code, response.message)
            return _classify(response.code, response.message)
        return None

    def announce(self, envelope: Envelope | None, before_data: BeforeData | None = None) -> None:
        self._next = _Ahead(envelope, before_data) if envelope is not None else None

    async def abandon(self) -> None:
        self._next = None
        written, self._written = self._written, None
        if written is None:
            return
        if written.client is self._client:
            self._drop()  # The server may be waiting in DATA for a message that will not come.
        if written.check is not None:
            try:
                await written.check
            except Exception:
                log.exception("the hand-over check of an abandoned message failed")

    async def send(self, envelope: Envelope, before_data: BeforeData | None = None) -> Result:
        if self._next is not None and self._next.matches(envelope):
            self._next = None  # This is the announced message itself: nothing to write behind it.
        written, self._written = self._written, None
        if written is not None and not written.matches(envelope):
            self._written = written
            await self.abandon()  # Not the message announced: that envelope and its session are void.
            written = None
        try:
            client = await self._connect()
        except OSError:
            client = None  # The attempts below report the connection problem for the message itself.
        if written is not None or (client is not None and _pipelining(client)):
            return await self._send_pipelined(envelope, before_data, written)
        # A session that broke before DATA is retried once on a fresh connection: nothing was handed over.
        for attempt in range(2):
            try:
                refused = await self._envelope(envelope)
            except (aiosmtplib.SMTPException, OSError) as error:
                self._drop()
                if attempt == 0:
                    continue
                return Result(Outcome.temporary, 0, f"{type(error).__name__}: {error}")
            if refused is not None:
                if refused.code == 421 and attempt == 0:
                    continue
                return refused
            break
        if before_data is not None and not await before_data():
            await self._reset()
            return Result(Outcome.skipped, 0, "not sent: no longer eligible")
        client = self._client
        assert client is not None
        try:
            response = await self._data(client, envelope.data)
        except _NotHandedOver as error:
            self._drop()
            return Result(Outcome.temporary, 0, f"connection lost at DATA, before the message: {error}")
        except aiosmtplib.SMTPResponseException as error:
            # The server answered: it either refused the DATA command or the message after the dot.
            if error.code == 421:
                self._drop()
            else:
                await self._reset()
            return _classify(error.code, error.message)
        except (aiosmtplib.SMTPException, OSError) as error:
            # Timeout or drop after DATA began: the server may have the message.
            self._drop()
            return Result(Outcome.unknown, 0, f"{type(error).__name__} after DATA: {error}")
        return Result(Outcome.sent, response.code, response.message)

    async def _send_pipelined(self, envelope: Envelope, before_data: BeforeData | None,
                              written: _Ahead | None = None) -> Result:
        """MAIL FROM, RCPT TO and DATA in one write (RFC 2920), the hand-over check running meanwhile;
        the message follows once both said yes. Every reply of the group is read and checked. With
        `written`, the group went out behind the previous message and its check runs already."""
        if written is not None:
            check, sent_on = written.check, written.client
        else:
            check = asyncio.ensure_future(before_data()) if before_data is not None else None
            sent_on = None
        try:
            return await self._pipelined(envelope, check, sent_on)
        finally:
            if check is not None and not check.done():
                check.cancel()

    async def _pipelined(self, envelope: Envelope, check: asyncio.Future[bool] | None,
                         sent_on: aiosmtplib.SMTP | None) -> Result:
        for attempt in range(2):
            try:
                client = await self._connect()
                commands = self._commands(client, envelope)
                if not _pipelining(client):
                    # Failover reached a server without PIPELINING: one command at a time.
                    replies = []
                    for verb, *arguments in commands:
                        replies.append(await client.execute_command(verb, *arguments))
                        if replies[-1].code not in (250, 251):
                            break
                    else:
                        replies.append(await client.execute_command(b"DATA"))
                else:
                    protocol = client.protocol
                    assert protocol is not None
                    if not (attempt == 0 and sent_on is client):
                        protocol.write(self._group(commands))
                    replies = []
                    for _ in range(3):
                        replies.append(await protocol.read_response(timeout=self.timeout))
                        if replies[-1].code == 421:
                            break  # The server is closing the session: nothing more will come.
            except (aiosmtplib.SMTPException, OSError) as error:
                # Broken before the message: nothing was handed over, so a fresh connection may try again.
                self._drop()
                if attempt == 0:
                    continue
                if not await self._verdict(check):
                    return _SKIPPED
                return Result(Outcome.temporary, 0, f"{type(error).__name__}: {error}")
            refused = next((r for r in replies if r.code not in (250, 251, 354)), None)
            if refused is None and len(replies) == 3:
                break
            if refused is not None and refused.code == 421:
                self._drop()
                if attempt == 0:
                    continue
            elif replies[-1].code == 354:
                self._drop()  # DATA was accepted after a refusal (RFC 2920 §3.1): end the session, send nothing.
            else:
                await self._reset()
            if not await self._verdict(check):
                return _SKIPPED  # The reader left or the campaign stopped: that is the answer, not the refusal.
            assert refused is not None
            if refused is replies[0]:
                return _sender_refused(refused.code, refused.message)
            return _classify(refused.code, refused.message)
        try:
            go = await self._verdict(check)
        except BaseException:
            self._drop()  # The server waits for a message that will not come.
            raise
        if not go:
            self._drop()
            return _SKIPPED
        protocol = client.protocol
        if protocol is None:
            self._drop()
            return Result(Outcome.temporary, 0, "connection lost at DATA, before the message")
        # The next message's envelope rides behind this one, its hand-over check starting now.
        following, self._next = self._next, None
        tail = b""
        if following is not None and not following.matches(envelope) and _pipelining(client):
            try:
                tail = self._group(self._commands(client, following.envelope))
            except ValueError:
                tail = b""
            else:
                following.client = client
                if following.before_data is not None:
                    following.check = asyncio.ensure_future(following.before_data())
                self._written = following
        try:
            response = await self._message(protocol, envelope.data, tail)
        except aiosmtplib.SMTPResponseException as error:
            if error.code == 421:
                self._drop()
            elif self._written is None:
                await self._reset()
            # else: the transaction ended with that reply, and the next one is already on its way: no RSET.
            return _classify(error.code, error.message)
        except (aiosmtplib.SMTPException, OSError) as error:
            # Timeout or drop after the message began: the server may have it.
            self._drop()
            return Result(Outcome.unknown, 0, f"{type(error).__name__} after DATA: {error}")
        return Result(Outcome.sent, response.code, response.message)

    @staticmethod
    def _group(commands: tuple[tuple[bytes, ...], ...]) -> bytes:
        """MAIL FROM, RCPT TO and DATA as one pipelined group."""
        lines = [b" ".join(command) for command in commands]
        if any(b"\r" in line or b"\n" in line for line in lines):
            raise ValueError("an address holds a line break")
        return b"\r\n".join(lines) + b"\r\nDATA\r\n"

    @staticmethod
    async def _verdict(check: asyncio.Future[bool] | None) -> bool:
        return True if check is None else await check

    async def _data(self, client: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
        """DATA with the message as we built it. Our messages already end lines with CRLF, so dot-stuffing
        is one bytes.replace; aiosmtplib's own `data()` runs two regexes over every message instead.
        A failure before the message bytes are written raises _NotHandedOver: the server cannot have it."""
        try:
            start = await client.execute_command(b"DATA")
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as error:
            raise _NotHandedOver(str(error)) from error
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol = client.protocol
        if protocol is None:
            raise _NotHandedOver("connection lost before the message was sent")
        return await self._message(protocol, data)

    async def _message(self, protocol: SMTPProtocol, data: bytes, tail: bytes = b"") -> aiosmtplib.SMTPResponse:
        """The message after a 354, dot-stuffed, and the server's answer to the final dot. `tail` (the next
        envelope, pipelined) goes out in the same write."""
        body = data.replace(b"\r\n.", b"\r\n..")
        if body.startswith(b"."):
            body = b"." + body
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        protocol.write(body + b".\r\n" + tail)
        response = await protocol.read_response(timeout=self.timeout)
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def close(self) -> None:
        await self.abandon()
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()


def transport_for(settings: Settings) -> Transport:
    if settings.smtp_urls:
        return SmtpTransport(settings.smtp_urls, timeout=settings.smtp_timeout)
    return OutboxTransport(settings.outbox_dir)
