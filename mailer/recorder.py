"""Writes delivery progress to the database from a thread of its own, with group commit.

The sending coroutines ask for two things per message:
  * `handover(id, message_id)` just before DATA: re-checks the reader (confirmed, not suppressed) and
    marks the delivery as handed over, with its Message-ID, in a commit that must land before DATA is sent;
  * `record(...)` after the server's answer: the delivery's final or next state.
Each commit carries whatever was asked for since the last one: with several SMTP connections in
flight that is a handful of rows, never a whole batch, so the window between a server's 250 and
the commit that records it stays one small transaction wide.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import BindParameter, Connection, Table, bindparam, exists, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY as postgresql_array
from sqlalchemy.orm import Session

from mailer import bounces
from mailer.db import engine
from mailer.models import (
    Campaign,
    CampaignStatus,
    Delivery,
    DeliveryState,
    Status,
    Subscriber,
    Suppression,
    utcnow,
)
from mailer.store import one_of
from mailer.subscriptions import Origin

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    delivery_id: int
    state: DeliveryState
    code: int | None = None
    text: str | None = None
    message_id: str | None = None
    next_attempt_at: datetime | None = None
    failed: bool = False
    # The reader of a 5xx: the bounce policy (bounces.py) applies to them.
    bounce_subscriber: int | None = None


@dataclass
class _Op:
    kind: str
    delivery_id: int = 0
    outcome: Outcome | None = None
    # A hand-over's: the signed Message-ID of the mail (addresses.message_id).
    message_id: str | None = None
    future: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_STOP = _Op("stop")

_DELIVERIES: Table = Delivery.__table__  # type: ignore[assignment]

# Checked in the hand-over itself, just before DATA: the reader is still confirmed and not suppressed,
# and the campaign is still sending (a pause or cancel stops mail that is not yet handed over).
_CAMPAIGN_SENDING = exists().where(Campaign.id == Delivery.campaign_id, Campaign.status == CampaignStatus.sending)
_ELIGIBLE = exists().where(
    Subscriber.id == Delivery.subscriber_id,
    Subscriber.status == Status.confirmed,
    ~exists().where(Suppression.email_hash == Subscriber.email_hash),
) & _CAMPAIGN_SENDING

_IDS: BindParameter[Any] = bindparam("ids")


@dataclass(frozen=True)
class _Statements:
    held: Any
    handover: Any
    # Where the hand-over cannot write each row's own Message-ID (not PostgreSQL): one row at a time after it.
    handover_message_ids: Any | None
    first_failure: Any
    sent: Any


@lru_cache(maxsize=2)
def _statements(postgresql: bool) -> _Statements:
    """Core statements built once per dialect: the recorder runs them thousands of times a second."""
    held = select(_DELIVERIES.c.id).where(one_of(_DELIVERIES.c.id, _IDS, postgresql=postgresql), ~_CAMPAIGN_SENDING)
    # The Message-ID goes in with the mark, so a delivery that ends `unknown` (swept, handed back) names
    # the mail an operator can look for in the server's logs. It is signed, so SQL cannot make it: on
    # PostgreSQL each marked row picks its own from the (id, Message-ID) pairs passed with the ids, in the
    # one statement. (Joining those pairs instead made the planner scan every claimed row of the campaign.)
    handover_message_ids = None
    values: dict[str, Any] = {}
    if postgresql:
        pairs = func.unnest(bindparam("ids", type_=postgresql_array(_DELIVERIES.c.id.type)),
                            bindparam("message_ids", type_=postgresql_array(_DELIVERIES.c.message_id.type))
                            ).table_valued("id", "message_id").render_derived("handed")
        values["message_id"] = select(pairs.c.message_id).where(pairs.c.id == _DELIVERIES.c.id).scalar_subquery()
    else:
        handover_message_ids = (update(_DELIVERIES).where(_DELIVERIES.c.id == bindparam("b_id"))
                                .values(message_id=bindparam("b_message_id")))
    handover = (
        update(_DELIVERIES)
        .where(one_of(_DELIVERIES.c.id, _IDS, postgresql=postgresql),
               _DELIVERIES.c.state == DeliveryState.sending.value,
               _DELIVERIES.c.claimed_by == bindparam("worker"),
               _ELIGIBLE)
        .values(handed_over_at=bindparam("now"), **values)
        .returning(_DELIVERIES.c.id)
    )

    first_failure = (
        update(_DELIVERIES)
        .where(one_of(_DELIVERIES.c.id, _IDS, postgresql=postgresql), _DELIVERIES.c.first_failed_at.is_(None))
        .values(first_failed_at=bindparam("now"))
    )

    # Most answers are 250s: one statement marks them all, instead of one row at a time. A 250 follows a
    # hand-over, which wrote the Message-ID.
    sent = (
        update(_DELIVERIES)
        .where(one_of(_DELIVERIES.c.id, _IDS, postgresql=postgresql),
               _DELIVERIES.c.claimed_by == bindparam("worker"))
        .values(state=DeliveryState.sent.value, sent_at=bindparam("now"), smtp_code=250, smtp_text=None,
                next_attempt_at=None, claimed_by=None)
    )
    return _Statements(held=held, handover=handover, handover_message_ids=handover_message_ids,
                       first_failure=first_failure, sent=sent)


_RESULT = (
    update(_DELIVERIES)
    .where(_DELIVERIES.c.id == bindparam("b_id"), _DELIVERIES.c.claimed_by == bindparam("b_worker"))
    .values(
        state=bindparam("b_state"),
        smtp_code=bindparam("b_code"),
        smtp_text=bindparam("b_text"),
        message_id=bindparam("b_message_id"),
        next_attempt_at=bindparam("b_next"),
        sent_at=bindparam("b_sent_at"),
        claimed_by=None,
    )
)


def _settle(futures: list[tuple[asyncio.Future[Any], Any]], error: BaseException | None) -> None:
    for future, value in futures:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


class Recorder:
    def __init__(self, worker: str) -> None:
        self.worker = worker
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._connection: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="mailer-recorder", daemon=True)
        self._thread.start()
        self.commits = 0

    # --- called from the event loop -------------------------------------------------------------

    def _submit(self, op: _Op) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        op.future, op.loop = loop.create_future(), loop
        self._queue.put(op)
        return op.future

    async def handover(self, delivery_id: int, message_id: str) -> str:
        """Re-check and mark the delivery handed over, with the Message-ID of its mail. Answers "go"; "skip"
        when the reader left or was suppressed; "hold" when the campaign was paused or cancelled (the claim
        is then handed back)."""
        return str(await self._submit(_Op("handover", delivery_id, message_id=message_id)))

    def record(self, outcome: Outcome) -> None:
        """Queue a result; nobody waits for it (flush() does), so it carries no future to settle."""
        self._queue.put(_Op("record", outcome.delivery_id, outcome))

    async def flush(self) -> None:
        await self._submit(_Op("flush"))

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=60)

    # --- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            ops = [self._queue.get()]
            while True:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(op is _STOP for op in ops)
            ops = [op for op in ops if op is not _STOP]
            try:
                answers = self._apply(ops) if ops else {}
            except BaseException as error:
                log.exception("recording %d operations failed", len(ops))
                self._resolve(ops, {}, error)
            else:
                self._resolve(ops, answers, None)
            if stop:
                if self._connection is not None:
                    self._connection.close()
                return

    @staticmethod
    def _resolve(ops: list[_Op], answers: dict[int, Any], error: BaseException | None) -> None:
        """Settle the group's futures with one wake-up of each event loop, not one per operation."""
        waiting: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for op in ops:
            if op.future is not None and op.loop is not None:
                waiting.setdefault(op.loop, []).append((op.future, answers.get(id(op), True)))
        for loop, futures in waiting.items():
            loop.call_soon_threadsafe(_settle, futures, error)

    def _apply(self, ops: list[_Op]) -> dict[int, Any]:
        answers: dict[int, Any] = {}
        handovers = [op for op in ops if op.kind == "handover"]
        records = [op.outcome for op in ops if op.kind == "record" and op.outcome is not None]
        now = utcnow()
        if self._connection is None or self._connection.closed:
            self._connection = engine().connect()
        connection = self._connection
        statements = _statements(connection.dialect.name == "postgresql")
        try:
            with connection.begin():
                sent = [r.delivery_id for r in records if r.state is DeliveryState.sent]
                if sent:
                    connection.execute(statements.sent, {"ids": sent, "worker": self.worker, "now": now})
                records = [r for r in records if r.state is not DeliveryState.sent]
                if records:
                    connection.execute(_RESULT, [
                        {"b_id": r.delivery_id, "b_worker": self.worker, "b_state": r.state.value, "b_code": r.code,
                         "b_text": (r.text or "")[:1000] or None, "b_message_id": r.message_id,
                         "b_next": r.next_attempt_at, "b_sent_at": now if r.state is DeliveryState.sent else None}
                        for r in records
                    ])
                    failed = [r.delivery_id for r in records if r.failed]
                    if failed:
                        connection.execute(statements.first_failure, {"ids": failed, "now": now})
                    bounced = [r for r in records if r.bounce_subscriber is not None]
                    if bounced:
                        with Session(bind=connection, join_transaction_mode="create_savepoint") as session:
                            for r in bounced:
                                self._bounce(session, r)
                            session.commit()
                if handovers:
                    ids = [op.delivery_id for op in handovers]
                    marked = set(connection.scalars(statements.handover, {
                        "ids": ids, "message_ids": [op.message_id for op in handovers], "worker": self.worker,
                        "now": now}))
                    if statements.handover_message_ids is not None and marked:
                        connection.execute(statements.handover_message_ids, [
                            {"b_id": op.delivery_id, "b_message_id": op.message_id}
                            for op in handovers if op.delivery_id in marked])
                    refused = [i for i in ids if i not in marked]
                    held = set(connection.scalars(statements.held, {"ids": refused})) if refused else set()
                    for op in handovers:
                        answers[id(op)] = ("go" if op.delivery_id in marked
                                           else "hold" if op.delivery_id in held else "skip")
        except BaseException:
            # A broken connection is not reused; the next group opens a fresh one.
            connection.invalidate()
            self._connection = None
            raise
        self.commits += 1
        return answers

    @staticmethod
    def _bounce(session: Session, outcome: Outcome) -> None:
        subscriber = session.scalars(
            select(Subscriber).where(Subscriber.id == outcome.bounce_subscriber)
        ).first()
        if subscriber is None:
            return
        detail = f"{outcome.code} {outcome.text or ''}".strip()
        severity = bounces.classify(bounces.enhanced_code(outcome.text or ""))
        bounces.bounce(session, subscriber=subscriber, severity=severity, detail=detail,
                       origin=Origin(channel="smtp"))
