"""CSV import of subscribers: columns email, name, categories, frequency, status.

An upload becomes an `ImportJob` row holding the file; the task that runs it carries only the job's id.
Rows go in chunks, each chunk one transaction that also moves the job's `processed` mark with a
compare-and-set, so a run that dies resumes after the last committed chunk and two runs of one job
never import a chunk twice. A dry run walks the same path and writes nothing but the report.

Rows with errors are listed and skipped; the rest are imported. Nobody on the suppression list comes
back through an import, and nobody who left on their own is subscribed again by an admin's file.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from mailer import admins, queue, store
from mailer.categories import slugify
from mailer.db import session_scope
from mailer.errors import InvalidInput, NotFound
from mailer.exports import FORMULA_STARTS
from mailer.models import (
    Category,
    ConsentEvent,
    Frequency,
    ImportJob,
    ImportState,
    Notice,
    NoticeKind,
    Status,
    Subscriber,
    Suppression,
    subscriber_categories,
    utcnow,
)
from mailer.subscriptions import clean_name, hash_email, normalize_email

log = logging.getLogger(__name__)

COLUMNS = ("email", "name", "categories", "frequency", "status")
CHUNK = 1000
# Chunk counts after which PostgreSQL's statistics are refreshed (see `_analyze`).
ANALYZE_AFTER = {1, 3, 10, 30, 100, 300}
MAX_LISTED = 2000
MAX_BYTES = 100 * 1024 * 1024
LEFT = {Status.unsubscribed, Status.bounced, Status.complained}
COUNTS = ("added", "updated", "unchanged", "skipped", "errors")


def decode(data: bytes) -> str:
    """CSV bytes as text: UTF-8 (with or without BOM), UTF-16 with a BOM (Excel's "Unicode text"),
    else Windows-1252, which spreadsheets still write. Anything with NUL bytes left is not a text file."""
    if len(data) > MAX_BYTES:
        raise InvalidInput("file", f"The file is larger than {MAX_BYTES // 1024 // 1024} MB; split it.")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16", errors="replace")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = data.decode("cp1252", errors="replace")
    if "\x00" in text:
        raise InvalidInput("file", "The file holds NUL bytes, so it is not a CSV text file; save it as "
                                   "\"CSV UTF-8\" and upload it again.")
    return text


def _header(content: str) -> tuple[list[str], list[str]]:
    """The file's column names (lower-cased) and those it has that we ignore."""
    try:
        first = next(csv.reader(io.StringIO(content)), None)
    except csv.Error as error:
        raise InvalidInput("file", f"The first line is not CSV: {error}.") from None
    if not first:
        raise InvalidInput("file", "The file is empty; the first line must name the columns, such as "
                                   "email,name,categories,frequency,status.")
    names = [name.strip().lower() for name in first]
    if "email" not in names:
        raise InvalidInput("file", "The first line must name the columns, and one must be 'email' "
                                   f"(found: {', '.join(names)[:200]}).")
    return names, [n for n in names if n not in COLUMNS]


def create_job(session: Session, *, content: str, filename: str, actor: str, dry_run: bool,
               default_status: Status = Status.confirmed, send_confirmation: bool = False) -> ImportJob:
    """Check the file's shape and store it as a job; errors in single rows are found later, per row."""
    _names, ignored = _header(content)
    if default_status in LEFT:
        raise InvalidInput("status", "The default status for rows without one must be confirmed or pending.")
    try:
        total = sum(1 for row in csv.reader(io.StringIO(content)) if any(cell.strip() for cell in row)) - 1
    except csv.Error as error:
        raise InvalidInput("file", f"The file is not valid CSV: {error}.") from None
    message = f"Ignored columns: {', '.join(ignored)}." if ignored else ""
    job = ImportJob(filename=filename[:300], actor=actor, dry_run=dry_run, content=content, total=max(total, 0),
                    options={"default_status": default_status.value, "send_confirmation": send_confirmation},
                    counts=dict.fromkeys(COUNTS, 0), errors=[], message=message)
    session.add(job)
    session.flush()
    return job


def start(job_id: int) -> None:
    """Run the job on a worker (or the in-process pool)."""
    queue.dispatch("import_subscribers", job_id)


@dataclass
class Row:
    number: int
    email: str
    key: str
    name: str | None
    categories: list[int] | None
    frequency: Frequency | None
    status: Status


@dataclass
class Chunk:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))
    problems: list[dict[str, Any]] = field(default_factory=list)
    notices: list[int] = field(default_factory=list)

    def problem(self, number: int, email: str, error: str, *, skipped: bool = False) -> None:
        self.counts["skipped" if skipped else "errors"] += 1
        self.problems.append({"row": number, "email": email[:320], "error": error,
                              "kind": "skipped" if skipped else "error"})


class _Categories:
    """Category cells name categories by slug or by name, whatever the case and punctuation."""

    def __init__(self, session: Session) -> None:
        self.ids: dict[str, int] = {}
        for category in session.scalars(select(Category)):
            self.ids[category.slug] = category.id
            self.ids.setdefault(slugify(category.name), category.id)

    def parse(self, cell: str) -> list[int]:
        separator = "|" if "|" in cell else ";" if ";" in cell else ","
        found: list[int] = []
        for part in (p.strip() for p in cell.split(separator)):
            if not part:
                continue
            category_id = self.ids.get(slugify(part))
            if category_id is None:
                raise InvalidInput("categories", f"Unknown category '{part[:80]}'.")
            if category_id not in found:
                found.append(category_id)
        return found


def _rows(content: str, skip: int) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number for people, cells by column) for each non-blank data row after the first `skip`."""
    reader = csv.reader(io.StringIO(content))
    names = [name.strip().lower() for name in next(reader)]
    seen = 0
    for cells in reader:
        if not any(cell.strip() for cell in cells):
            continue
        seen += 1
        if seen <= skip:
            continue
        yield reader.line_num, {name: (cells[i] if i < len(cells) else "") for i, name in enumerate(names)}


def _unquote(cell: str) -> str:
    """Undo an export's guard against spreadsheet formulas ("'=…" back to "=…")."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) else cell


def _parse(number: int, cells: dict[str, str], categories: _Categories, default: Status) -> Row:
    cells = {name: _unquote(value) for name, value in cells.items()}
    email, key = normalize_email(cells.get("email", ""))
    name = clean_name(cells["name"]) if cells.get("name", "").strip() else None
    category_cell = cells.get("categories", "").strip()
    chosen = categories.parse(category_cell) if category_cell else None
    frequency_cell = cells.get("frequency", "").strip().lower()
    if frequency_cell and frequency_cell not in {"daily", "weekly"}:
        raise InvalidInput("frequency", f"'{frequency_cell[:40]}' is not daily or weekly.")
    status_cell = cells.get("status", "").strip().lower()
    if status_cell and status_cell not in Status.__members__:
        raise InvalidInput("status", f"'{status_cell[:40]}' is not one of {', '.join(Status.__members__)}.")
    return Row(number=number, email=email, key=key, name=name, categories=chosen,
               frequency=Frequency(frequency_cell) if frequency_cell else None,
               status=Status(status_cell) if status_cell else default)


class _Importer:
    def __init__(self, job: ImportJob) -> None:
        self.job_id = job.id
        self.dry_run = job.dry_run
        self.default = Status(job.options.get("default_status", "confirmed"))
        self.send_confirmation = bool(job.options.get("send_confirmation"))
        self.source = {"file": job.filename, "by": job.actor, "job": job.id}
        # Addresses seen earlier in this run: a second row for one address is an error, not an update.
        self.seen: dict[str, int] = {}

    def forget(self, batch: list[tuple[int, dict[str, str]]]) -> None:
        """A chunk rolled back: its addresses are no longer "seen earlier in this run"."""
        lines = {number for number, _cells in batch}
        self.seen = {key: line for key, line in self.seen.items() if line not in lines}

    def chunk(self, session: Session, lines: list[tuple[int, dict[str, str]]], categories: _Categories) -> Chunk:
        result = Chunk()
        rows: list[Row] = []
        for number, cells in lines:
            try:
                row = _parse(number, cells, categories, self.default)
            except InvalidInput as error:
                result.problem(number, cells.get("email", ""), f"{error.field}: {error.message}")
                continue
            if row.key in self.seen:
                result.problem(number, row.email, f"email: the address is already on line {self.seen[row.key]}.")
                continue
            self.seen[row.key] = number
            rows.append(row)
        keys = [row.key for row in rows]
        existing = {s.email_key: s for s in session.scalars(
            select(Subscriber).where(Subscriber.email_key.in_(keys)))} if keys else {}
        hashes = {hash_email(key): key for key in keys}
        suppressed = {hashes[h]: reason for h, reason in session.execute(
            select(Suppression.email_hash, Suppression.reason).where(Suppression.email_hash.in_(list(hashes))))}
        new: list[Row] = []
        for row in rows:
            # Whatever the file says, a suppressed address is left alone: for an erased person even an
            # "unsubscribed" row would store their address and name again.
            if row.key in suppressed:
                # The report is kept; an erased person's address must not come back through it either.
                shown = "(an erased address)" if suppressed[row.key] == "erased" else row.email
                result.problem(row.number, shown, f"suppressed ({suppressed[row.key]}): it gets no mail.",
                               skipped=True)
            elif row.key in existing:
                self._update(session, row, existing[row.key], result)
            else:
                new.append(row)
        if new:
            self._insert(session, new, result)
        return result

    def _update(self, session: Session, row: Row, subscriber: Subscriber, result: Chunk) -> None:
        if subscriber.status in LEFT and row.status not in LEFT:
            result.problem(row.number, row.email, f"the address is {subscriber.status.value}; only its owner can "
                                                  "subscribe it again.", skipped=True)
            return
        changes: dict[str, Any] = {}
        if row.name is not None and row.name != subscriber.name:
            changes["name"] = row.name
        if row.frequency is not None and row.frequency != subscriber.frequency:
            changes["frequency"] = row.frequency
        # A file never downgrades a confirmed reader to pending; it may record that they left.
        if row.status != subscriber.status and not (row.status is Status.pending
                                                    and subscriber.status is Status.confirmed):
            changes["status"] = row.status
        new_categories = row.categories is not None and sorted(row.categories) != sorted(
            c.id for c in subscriber.categories)
        if not changes and not new_categories:
            result.counts["unchanged"] += 1
            return
        result.counts["updated"] += 1
        if self.dry_run:
            return
        now = utcnow()
        if changes.get("status") is Status.confirmed:
            changes.update(confirmed_at=now, confirm_nonce=None)
            # As when they confirm by link: a reader who comes back starts from the first window.
            store.forget_digest_cursor(session, subscriber.id)
        elif changes.get("status") in LEFT:
            changes.update(unsubscribed_at=now, confirm_nonce=None)
        session.execute(update(Subscriber).where(Subscriber.id == subscriber.id).values(updated_at=now, **changes))
        if new_categories:
            session.execute(delete(subscriber_categories).where(
                subscriber_categories.c.subscriber_id == subscriber.id))
            self._link(session, [(subscriber.id, row.categories or [])])
        if row.status in {Status.bounced, Status.complained}:
            store.add_suppression(session, email_hash=hash_email(row.key), email=row.email,
                                  reason=row.status.value, detail=f"imported from {self.source['file']}")
        session.execute(insert(ConsentEvent), [self._event(subscriber.id, row, "import-update",
                                                           {k: str(v) for k, v in changes.items()})])

    def _insert(self, session: Session, rows: list[Row], result: Chunk) -> None:
        result.counts["added"] += len(rows)
        if self.dry_run:
            return
        now = utcnow()
        values = [{
            "email": row.email, "email_key": row.key, "email_hash": hash_email(row.key), "name": row.name or "",
            "frequency": row.frequency or Frequency.daily, "status": row.status, "created_at": now,
            "updated_at": now, "confirmed_at": now if row.status is Status.confirmed else None,
            "unsubscribed_at": now if row.status in LEFT else None,
            "confirm_nonce": None, "timezone": None, "erased_at": None,
        } for row in rows]
        returned = session.execute(insert(Subscriber).returning(Subscriber.email_key, Subscriber.id), values)
        ids: dict[str, int] = {key: subscriber_id for key, subscriber_id in returned}
        self._link(session, [(ids[row.key], row.categories) for row in rows if row.categories])
        session.execute(insert(ConsentEvent), [self._event(ids[row.key], row, "import", {}) for row in rows])
        for row in rows:
            if row.status in {Status.bounced, Status.complained}:
                store.add_suppression(session, email_hash=hash_email(row.key), email=row.email,
                                      reason=row.status.value, detail=f"imported from {self.source['file']}")
        if self.send_confirmation:
            pending = [{"subscriber_id": ids[row.key], "kind": NoticeKind.confirm, "created_at": now}
                       for row in rows if row.status is Status.pending]
            if pending:
                session.execute(update(Subscriber).where(
                    Subscriber.id.in_([p["subscriber_id"] for p in pending])).values(confirm_nonce=_nonce()))
                result.notices = list(session.scalars(insert(Notice).returning(Notice.id), pending))

    def _link(self, session: Session, pairs: list[tuple[int, list[int]]]) -> None:
        links = [{"subscriber_id": sid, "category_id": cid} for sid, cids in pairs for cid in cids]
        if links:
            session.execute(insert(subscriber_categories), links)

    def _event(self, subscriber_id: int, row: Row, action: str, changes: dict[str, str]) -> dict[str, Any]:
        details: dict[str, Any] = {**self.source, "line": row.number, "status": row.status.value}
        if changes:
            details["changes"] = changes
        return {"subscriber_id": subscriber_id, "action": action, "at": utcnow(), "ip": None, "user_agent": None,
                "channel": "import", "details": details}


def _nonce() -> str:
    import secrets

    return secrets.token_urlsafe(12)


def _claim(job_id: int) -> tuple[ImportJob, int] | None:
    with session_scope() as session:
        job = session.get(ImportJob, job_id, with_for_update=True)
        if job is None:
            raise NotFound(f"There is no import {job_id}.")
        if job.state in {ImportState.done, ImportState.failed} or job.content is None:
            return None
        if job.state is ImportState.queued:
            job.state, job.started_at = ImportState.running, utcnow()
        session.flush()
        session.expunge(job)
        return job, job.processed


def run(job_id: int, *, progress: Callable[[int, int], None] | None = None) -> None:
    """Run an import to its end, or on from where a stopped run left it. Safe to call twice."""
    claimed = _claim(job_id)
    if claimed is None:
        return
    job, done = claimed
    importer = _Importer(job)
    content = job.content or ""
    try:
        with session_scope() as session:
            categories = _Categories(session)
        batch: list[tuple[int, dict[str, str]]] = []
        chunks = 0
        for line in _rows(content, done):
            batch.append(line)
            if len(batch) == CHUNK:
                done = _commit(importer, batch, categories, done)
                if done < 0:
                    return
                batch = []
                chunks += 1
                if chunks in ANALYZE_AFTER and not importer.dry_run:
                    _analyze()
                if progress:
                    progress(done, job.total)
        if batch:
            done = _commit(importer, batch, categories, done)
            if done < 0:
                return
        _finish(job_id, ImportState.done, "")
    except csv.Error as error:
        _finish(job_id, ImportState.failed, f"The file stops being valid CSV after row {done}: {error}.")
    except Exception:
        # Rows up to the mark are in; say where it stopped rather than leave the job running for ever.
        log.exception("import %s failed after row %s", job_id, done)
        _finish(job_id, ImportState.failed, f"The import stopped after row {done} on an internal error; "
                                            "the rows before it are in. The server log has the details.")
        raise
    if progress:
        progress(done, job.total)


def _analyze() -> None:
    """Refresh PostgreSQL's statistics while a big import grows the tables: planned on the stale
    "empty table" figures, each chunk's look-ups turn into sequential scans and the import slows
    quadratically (100k rows: 113 s before, 21 s after)."""
    with session_scope() as session:
        if session.get_bind().dialect.name == "postgresql":
            session.execute(text("ANALYZE subscribers, subscriber_categories, suppressions"))


def _commit(importer: _Importer, batch: list[tuple[int, dict[str, str]]], categories: _Categories,
            done: int) -> int:
    """Import one chunk and move the mark in one transaction; -1 when another run got there first.

    The job row is locked and its mark compared before any row is written, so a second run of the same
    job (a redelivered task, a re-queue) waits here and then stops instead of importing the chunk again.
    """
    for attempt in range(2):
        try:
            return _commit_once(importer, batch, categories, done)
        except IntegrityError:
            # Another import (or a sign-up) added one of these addresses meanwhile: the chunk is
            # rolled back whole, and read again it finds those rows and updates them instead.
            if attempt:
                raise
            importer.forget(batch)
    return -1


def _commit_once(importer: _Importer, batch: list[tuple[int, dict[str, str]]], categories: _Categories,
                 done: int) -> int:
    with session_scope() as session:
        job = session.get(ImportJob, importer.job_id, with_for_update=True)
        if job is None or job.processed != done or job.state is not ImportState.running:
            return -1
        chunk = importer.chunk(session, batch, categories)
        counts = dict(job.counts)
        for key, value in chunk.counts.items():
            counts[key] = counts.get(key, 0) + value
        room = MAX_LISTED - len(job.errors)
        job.counts, job.processed = counts, done + len(batch)
        if room > 0 and chunk.problems:
            job.errors = [*job.errors, *chunk.problems[:room]]
        notices = chunk.notices
    for notice_id in notices:
        queue.dispatch("send_notice", notice_id)
    return done + len(batch)


def _finish(job_id: int, state: ImportState, message: str) -> None:
    with session_scope() as session:
        job = session.get(ImportJob, job_id, with_for_update=True)
        if job is None or job.state is ImportState.done:
            return  # Another run finished it; a late failure of this one must not undo that.
        job.state, job.finished_at = state, utcnow()
        if message:
            job.message = f"{job.message} {message}".strip()
        # The file held personal data; once imported, the subscribers table is where it lives. A dry
        # run keeps it until the admin imports it for real (`promote`) or a day has passed (`expire`).
        if not job.dry_run or state is not ImportState.done:
            job.content = None
        if not job.dry_run and state is ImportState.done:
            admins.record(session, actor=job.actor, action="import", target=job.filename,
                          reason=", ".join(f"{k} {v}" for k, v in job.counts.items()))


def promote(session: Session, job_id: int) -> ImportJob:
    """Import for real the file a finished dry run checked."""
    job = session.get(ImportJob, job_id, with_for_update=True)
    if job is None:
        raise NotFound(f"There is no import {job_id}.")
    if not job.dry_run or job.state is not ImportState.done or job.content is None:
        raise InvalidInput("import", "Only a finished dry run can be imported; upload the file again.")
    job.dry_run, job.state, job.processed = False, ImportState.queued, 0
    job.counts, job.errors, job.started_at, job.finished_at = dict.fromkeys(COUNTS, 0), [], None, None
    return job


def requeue_stale(*, idle_seconds: float = 120) -> int:
    """Queue again the imports whose worker stopped (a crash, a restart): they go on from their mark."""
    from datetime import timedelta

    with session_scope() as session:
        stale = session.scalars(select(ImportJob.id).where(
            ImportJob.state.in_([ImportState.queued, ImportState.running]),
            ImportJob.updated_at < utcnow() - timedelta(seconds=idle_seconds))).all()
        if stale:
            # Touching the rows keeps the next tick from queueing them again while they run.
            session.execute(update(ImportJob).where(ImportJob.id.in_(stale)).values(updated_at=utcnow()))
        expire(session)
    for job_id in stale:
        start(job_id)
    return len(stale)


def expire(session: Session, *, older_than_hours: float = 24) -> int:
    """Drop the files of dry runs nobody imported: they hold personal data."""
    from datetime import timedelta

    return int(session.execute(
        update(ImportJob).where(ImportJob.content.is_not(None), ImportJob.state == ImportState.done,
                                ImportJob.created_at < utcnow() - timedelta(hours=older_than_hours))
        .values(content=None)).rowcount)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Report:
    id: int
    filename: str
    dry_run: bool
    state: str
    total: int
    processed: int
    counts: dict[str, int]
    errors: list[dict[str, Any]]
    message: str


def report(session: Session, job_id: int) -> Report:
    job = session.get(ImportJob, job_id)
    if job is None:
        raise NotFound(f"There is no import {job_id}.")
    return Report(id=job.id, filename=job.filename, dry_run=job.dry_run, state=job.state.value, total=job.total,
                  processed=job.processed, counts=dict(job.counts), errors=list(job.errors), message=job.message)
