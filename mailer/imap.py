"""Polling the bounce mailbox at MAILER_INBOUND_URL (imaps://user:password@host/INBOX).

Each poll (the `poll_mailbox` task, queued by the periodic tick every MAILER_INBOUND_POLL_SECONDS):

    1. delete the messages whose rows were understood (a bounce, complaint, delay, unsubscribe, or a
       report that needs nothing), by the UID they were stored under;
    2. store every message not seen before (inbound.receive, keyed by UIDVALIDITY and UID) and queue it;
       one over MAILER_INBOUND_MAX_BYTES is listed for an admin, unread (inbound.keep_too_large).

So a message leaves the mailbox only after it was understood, and mail that was not understood,
including unrelated mail, stays there for a person. Polls that overlap store nothing twice.
"""

from __future__ import annotations

import imaplib
import logging
import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from sqlalchemy import select, update

from mailer import inbound
from mailer.config import get_settings
from mailer.db import session_scope
from mailer.errors import MailboxError
from mailer.models import UNDERSTOOD, InboundMessage, utcnow

log = logging.getLogger(__name__)

FETCH_BATCH = 50
# UIDs per STORE / EXPUNGE command and per database look-up, so neither grows with the mailbox.
UID_BATCH = 500


@dataclass(frozen=True)
class Mailbox:
    host: str
    port: int
    tls: bool
    user: str
    password: str
    folder: str

    @classmethod
    def parse(cls, url: str) -> Mailbox:
        parts = urlsplit(url)
        tls = parts.scheme == "imaps"
        return cls(host=parts.hostname or "localhost", port=parts.port or (993 if tls else 143), tls=tls,
                   user=unquote(parts.username or ""), password=unquote(parts.password or ""),
                   folder=unquote(parts.path.lstrip("/")) or "INBOX")


@contextmanager
def connect(mailbox: Mailbox) -> Iterator[imaplib.IMAP4]:
    timeout = get_settings().smtp_timeout
    try:
        client: imaplib.IMAP4
        if mailbox.tls:
            client = imaplib.IMAP4_SSL(mailbox.host, mailbox.port, ssl_context=ssl.create_default_context(),
                                       timeout=timeout)
        else:
            client = imaplib.IMAP4(mailbox.host, mailbox.port, timeout=timeout)
            if "STARTTLS" in client.capabilities:
                client.starttls(ssl.create_default_context())
        client.login(mailbox.user, mailbox.password)
        status, _ = client.select(_quoted(mailbox.folder))
        if status != "OK":
            raise MailboxError(f"the folder {mailbox.folder!r} cannot be opened")
    except (OSError, imaplib.IMAP4.error) as error:
        raise MailboxError(f"{mailbox.host}:{mailbox.port}: {error}") from None
    try:
        yield client
    except (OSError, imaplib.IMAP4.error) as error:
        # A connection that breaks halfway is the same trouble as one that never opened: poll again later.
        raise MailboxError(f"{mailbox.host}:{mailbox.port}: {error}") from None
    finally:
        with suppress(OSError, imaplib.IMAP4.error):
            client.logout()


def _quoted(folder: str) -> str:
    return '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _uidvalidity(client: imaplib.IMAP4) -> str:
    _, values = client.response("UIDVALIDITY")
    value = values[0] if values else b"0"
    return value.decode() if isinstance(value, bytes) else str(value)


def _delete_understood(client: imaplib.IMAP4, prefix: str) -> int:
    with session_scope() as session:
        rows = session.execute(select(InboundMessage.id, InboundMessage.source_ref).where(
            InboundMessage.source_ref.startswith(prefix, autoescape=True), InboundMessage.removed_at.is_(None),
            InboundMessage.kind.in_(UNDERSTOOD))).all()
    if not rows:
        return 0
    uids = [ref.removeprefix(prefix) for _id, ref in rows if ref]
    for start in range(0, len(uids), UID_BATCH):
        chunk = ",".join(uids[start:start + UID_BATCH])
        status, _ = client.uid("STORE", chunk, "+FLAGS.SILENT", r"(\Deleted)")
        if status != "OK":
            raise MailboxError("the server refused to mark messages deleted")
        # UID EXPUNGE (RFC 4315) removes only ours; plain EXPUNGE would also remove what a person marked
        # deleted, so it is the fallback only for servers without UIDPLUS.
        if "UIDPLUS" in client.capabilities:
            client.uid("EXPUNGE", chunk)
    if "UIDPLUS" not in client.capabilities:
        client.expunge()
    with session_scope() as session:
        session.execute(update(InboundMessage).where(InboundMessage.id.in_([i for i, _ in rows]))
                        .values(removed_at=utcnow()))
    return len(rows)


def _import_new(client: imaplib.IMAP4, prefix: str) -> int:
    status, data = client.uid("SEARCH", None, "ALL")  # type: ignore[arg-type]
    if status != "OK":
        raise MailboxError("the server refused to list the folder")
    uids = [uid.decode() for uid in (data[0] or b"").split()]
    if not uids:
        return 0
    seen: set[str | None] = set()
    with session_scope() as session:
        for start in range(0, len(uids), UID_BATCH):
            refs = [prefix + uid for uid in uids[start:start + UID_BATCH]]
            seen.update(session.scalars(select(InboundMessage.source_ref).where(InboundMessage.source_ref.in_(refs))))
    new = [uid for uid in uids if prefix + uid not in seen]
    stored = 0
    max_bytes = get_settings().inbound_max_bytes
    for start in range(0, len(new), FETCH_BATCH):
        chunk = new[start:start + FETCH_BATCH]
        # BODY.PEEK leaves the \Seen flag alone: a person reading the mailbox sees what is new to them.
        status, items = client.uid("FETCH", ",".join(chunk), "(UID RFC822.SIZE BODY.PEEK[])")
        if status != "OK":
            raise MailboxError("the server refused to fetch messages")
        for item in items:
            if not isinstance(item, tuple):
                continue
            head, raw = item
            fields = head.decode(errors="replace").replace("(", " ").split()
            uid = fields[fields.index("UID") + 1] if "UID" in fields else ""
            if not uid:
                continue
            if len(raw) > max_bytes:
                # Listed once (its row marks the UID seen), so the next poll neither fetches nor warns again.
                if inbound.keep_too_large(channel="imap", raw=bytes(raw), source_ref=prefix + uid) is not None:
                    log.warning("mailbox message %s%s is too large (%d bytes, MAILER_INBOUND_MAX_BYTES is %d): "
                                "left in the mailbox and listed for an admin", prefix, uid, len(raw), max_bytes)
                    stored += 1
                continue
            if inbound.receive(channel="imap", raw=bytes(raw), source_ref=prefix + uid) is not None:
                stored += 1
    return stored


def poll() -> dict[str, int]:
    """One poll of MAILER_INBOUND_URL: delete what was understood, store what is new."""
    settings = get_settings()
    if not settings.inbound_url:
        return {"deleted": 0, "stored": 0}
    mailbox = Mailbox.parse(settings.inbound_url)
    with connect(mailbox) as client:
        prefix = f"imap:{mailbox.user}@{mailbox.host}/{mailbox.folder}:{_uidvalidity(client)}:"
        deleted = _delete_understood(client, prefix)
        stored = _import_new(client, prefix)
    if deleted or stored:
        log.info("mailbox %s: %d new, %d understood and deleted", mailbox.folder, stored, deleted)
    return {"deleted": deleted, "stored": stored}


def poll_task() -> dict[str, int]:
    """The task's body: an unreachable mailbox is logged, and the next tick polls again."""
    try:
        return poll()
    except MailboxError as error:
        log.warning("could not poll the mailbox: %s", error)
        return {"deleted": 0, "stored": 0}


_last_poll: float | None = None


def poll_due() -> bool:
    """Queue a poll when MAILER_INBOUND_POLL_SECONDS have passed since this process last queued one."""
    import time

    from mailer import queue

    global _last_poll
    settings = get_settings()
    if not settings.inbound_url:
        return False
    if _last_poll is not None and time.monotonic() - _last_poll < settings.inbound_poll_seconds:
        return False
    _last_poll = time.monotonic()
    queue.dispatch("poll_mailbox")
    return True
