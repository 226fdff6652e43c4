"""A fault-injecting SMTP server (aiosmtpd) for tests.

Each recipient's fate on each attempt is decided by a rule: explicit ones by address, the rest
drawn from a seeded random generator keyed on (seed, address, attempt), so a run is repeatable
whatever order the mails arrive in. Modes:

    ok        250
    421       421 at RCPT, then the server hangs up
    451/452   temporary refusal at RCPT
    550       permanent refusal at RCPT (5.1.1, bad mailbox)
    552       permanent refusal at RCPT (5.2.2, mailbox full: a soft bounce)
    550-policy permanent refusal at RCPT (5.7.1, not about the address)
    554-data  permanent refusal after the final dot
    421-data  421 after the final dot (the message is not taken), then the server hangs up
    drop-rcpt the server closes the connection at RCPT, before DATA, without answering
    drop      the server takes the message, then closes the connection without answering
    hang      the server takes the message, then never answers

`sender_replies` are answers to MAIL FROM, one per command in order (a "421 …" also hangs up), before
`sender_reply`, which answers every MAIL FROM once they are used up.

With `pipelining` the server offers PIPELINING (RFC 2920), so the client sends MAIL FROM, RCPT TO and
DATA in one write; `PIPELINING` is the default, which tests switch to run every case both ways.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller

from tests.conftest import Received, advertise_pipelining, free_port

PIPELINING = False

RCPT_REPLIES = {
    "421": "421 4.3.2 Service shutting down",
    "451": "451 4.3.0 Try again later",
    "452": "452 4.2.2 Mailbox full, try later",
    "550": "550 5.1.1 No such user",
    "552": "552 5.2.2 Mailbox full",
    "550-policy": "550 5.7.1 Message refused by policy",
}


@dataclass
class FaultySmtp:
    seed: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    rules: dict[str, list[str]] = field(default_factory=dict)
    hang_seconds: float = 30.0
    port: int = 0
    received: list[Received] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    connections: int = 0
    sender_reply: str = ""
    sender_replies: list[str] = field(default_factory=list)
    pipelining: bool = field(default_factory=lambda: PIPELINING)
    # Commands a client sent on a session after the server answered 421 there (must stay empty).
    after_421: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Keyed by the session objects themselves, which this keeps alive: keyed by id(), a new connection's
    # session could take a closed one's address and inherit its 421 or its recipients' modes.
    _closing: set[Any] = field(default_factory=set)
    _modes: dict[Any, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))

    def mode(self, address: str, attempt: int) -> str:
        listed = self.rules.get(address.lower())
        if listed is not None:
            return listed[attempt] if attempt < len(listed) else "ok"
        if attempt > 0 or not self.rates:
            return "ok"
        draw = random.Random(f"{self.seed}:{address.lower()}").random()
        for mode, rate in self.rates.items():
            if draw < rate:
                return mode
            draw -= rate
        return "ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        with self.lock:
            attempt = self.attempts[address.lower()]
            self.attempts[address.lower()] += 1
        if session in self._closing:
            self.after_421.append(f"RCPT {address}")
        mode = self.mode(address, attempt)
        if mode == "drop-rcpt":
            server.transport.close()
            return "250 OK (never seen by the client)"
        if mode in RCPT_REPLIES:
            if mode == "421":
                self._hang_up_after_421(server, session)
            return RCPT_REPLIES[mode]
        self._modes[session][address.lower()] = mode
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if session in self._closing:
            self.after_421.append(f"MAIL {address}")
        with self.lock:
            reply = self.sender_replies.pop(0) if self.sender_replies else self.sender_reply
        if reply:
            if reply.startswith("421"):
                self._hang_up_after_421(server, session)
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        modes = self._modes.pop(session, {})
        mode = next((modes.get(r.lower(), "ok") for r in envelope.rcpt_tos), "ok")
        if mode == "554-data":
            return "554 5.6.0 Message content rejected"
        if mode == "421-data":
            asyncio.get_running_loop().call_later(0.5, server.transport.close)
            return "421 4.3.2 Service shutting down"
        with self.lock:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        if mode == "drop":
            server.transport.close()
            return "250 OK (never seen by the client)"
        if mode == "hang":
            await asyncio.sleep(self.hang_seconds)
        return "250 2.0.0 OK"

    def _hang_up_after_421(self, server: Any, session: Any) -> None:
        # The server keeps the line open a moment: a client that reuses the session would show here.
        self._closing.add(session)
        asyncio.get_running_loop().call_later(0.5, server.transport.close)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        with self.lock:
            self.connections += 1
        session.host_name = hostname
        return advertise_pipelining(responses) if self.pipelining else responses

    def count(self, address: str) -> int:
        with self.lock:
            return sum(1 for m in self.received if address.lower() in (r.lower() for r in m.recipients))


def start_faulty(**kwargs: Any) -> tuple[FaultySmtp, Controller]:
    handler = FaultySmtp(**kwargs)
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    handler.port = controller.port
    return handler, controller
