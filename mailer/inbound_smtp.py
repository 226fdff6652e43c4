"""The SMTP listener (`mailer inbound serve`) that the site's MTA forwards bounces and unsubscribe mails to.

It takes mail only for our own addresses (the bounce and unsubscribe addresses, with or without a
tag), keeps each message as it came (inbound.receive) and answers 250 once it is stored, so the MTA
keeps and retries anything we could not store (451). Processing happens in the task that follows.
"""

from __future__ import annotations

import asyncio
import logging

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import Envelope, Session

from mailer import addresses, inbound
from mailer.config import get_settings

log = logging.getLogger(__name__)


class Handler:
    """aiosmtpd's handler: RCPT checks the address, DATA stores the message."""

    async def handle_RCPT(self, server: SMTPServer, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if addresses.read(address) is None:
            return "550 5.1.1 This address does not take mail here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        try:
            await asyncio.to_thread(inbound.receive, channel="smtp", raw=raw, mail_from=envelope.mail_from or "",
                                    rcpt_to=list(envelope.rcpt_tos))
        except Exception:
            log.exception("could not store an inbound message")
            return "451 4.3.0 Could not store the message; please try again later"
        return "250 2.0.0 Stored"


def controller(host: str, port: int) -> Controller:
    """A listener on host:port; `start()` and `stop()` it."""
    settings = get_settings()
    return Controller(Handler(), hostname=host, port=port, data_size_limit=settings.inbound_max_bytes,
                      decode_data=False)
