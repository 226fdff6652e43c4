"""Claim tokens, kept alive by one heartbeat thread per process.

Every batch loop claims deliveries under a token of its own (`<host>:<pid>:<nonce>`), registered
here. A thread beats for all of this process's live tokens; the sweeper hands claims back only
when their token stopped beating, so a slow SMTP server never makes a live loop look dead. And
because hand-over and record both check the token, a loop whose claims were handed back can never
send them: a second loop in the same process holds a different token.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

from sqlalchemy import delete, update

from mailer.config import get_settings
from mailer.db import session_scope
from mailer.models import WorkerBeat, utcnow

log = logging.getLogger(__name__)

_lock = threading.Lock()
_tokens: set[str] = set()
_thread: tuple[int, threading.Thread] | None = None


def _beat(tokens: list[str]) -> None:
    with session_scope() as session:
        session.execute(update(WorkerBeat).where(WorkerBeat.id.in_(tokens)).values(seen_at=utcnow()))


def _loop() -> None:
    interval = get_settings().heartbeat_seconds
    stop = threading.Event()
    while not stop.wait(interval):
        with _lock:
            tokens = list(_tokens)
        if not tokens:
            continue
        try:
            _beat(tokens)
        except Exception:
            log.exception("heartbeat failed")


def register() -> str:
    """A fresh claim token, recorded as alive before any claim is made under it."""
    global _thread
    token = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"
    with session_scope() as session:
        session.add(WorkerBeat(id=token, seen_at=utcnow()))
    with _lock:
        _tokens.add(token)
        # A forked child (Celery prefork) starts its own thread; the parent's did not survive the fork.
        if _thread is None or _thread[0] != os.getpid() or not _thread[1].is_alive():
            thread = threading.Thread(target=_loop, name="mailer-heartbeat", daemon=True)
            thread.start()
            _thread = (os.getpid(), thread)
    return token


def unregister(token: str) -> None:
    with _lock:
        _tokens.discard(token)
    with session_scope() as session:
        session.execute(delete(WorkerBeat).where(WorkerBeat.id == token))
