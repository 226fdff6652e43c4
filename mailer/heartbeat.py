"""This process's identity as a sender, kept alive by a heartbeat thread.

Deliveries are claimed in a process's name. The sweeper hands claims back only when their
process stopped beating, so a slow SMTP server never makes a live process look dead.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading

from sqlalchemy import update

from mailer.config import get_settings
from mailer.db import session_scope
from mailer.models import WorkerBeat, utcnow

log = logging.getLogger(__name__)

_lock = threading.Lock()
_worker_id: str | None = None
_pid: int | None = None


def beat(worker_id: str) -> None:
    with session_scope() as session:
        changed = session.execute(update(WorkerBeat).where(WorkerBeat.id == worker_id).values(seen_at=utcnow()))
        if not changed.rowcount:  # type: ignore[attr-defined]
            session.add(WorkerBeat(id=worker_id, seen_at=utcnow()))


def _loop(worker_id: str, interval: float) -> None:
    stop = threading.Event()
    while not stop.wait(interval):
        try:
            beat(worker_id)
        except Exception:
            log.exception("heartbeat of %s failed", worker_id)


def worker_id() -> str:
    """This process's sender id; the first call records a beat and starts the heartbeat thread."""
    global _worker_id, _pid
    with _lock:
        # A forked child (Celery prefork) must not share its parent's identity.
        if _worker_id is None or _pid != os.getpid():
            _worker_id = f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"
            _pid = os.getpid()
            beat(_worker_id)
            thread = threading.Thread(target=_loop, args=(_worker_id, get_settings().heartbeat_seconds),
                                      name="mailer-heartbeat", daemon=True)
            thread.start()
        return _worker_id
