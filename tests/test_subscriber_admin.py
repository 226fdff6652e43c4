"""Looking after subscribers through the admin API: CSV import and export, edit, suppress, erase."""

from __future__ import annotations

import csv
import io
import time
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from mailer import queue
from mailer.db import session_scope
from mailer.models import (
    AdminAction,
    Campaign,
    ConsentEvent,
    Delivery,
    DigestCursor,
    ImportJob,
    Subscriber,
    Suppression,
    utcnow,
)
from mailer.subscriptions import hash_email
from tests.conftest import SmtpSink, consent_actions, subscriber_row

CSV_WITH_BAD_ROWS = (
    "email,name,categories,frequency,status,signed_up\n"
    "ada@example.org,Ada Lovelace,U.S.–Russia Relations|foreign-policy-and-international-relations,weekly,"
    "confirmed,2024\n"
    "not-an-address,Bad Row,,daily,confirmed,\n"
    "grace@example.org,Grace,,daily,,\n"
    "ADA@example.org,Ada Again,,daily,confirmed,\n"
    "linus@example.org,Linus,Gardening,daily,confirmed,\n"
    "ken@example.org,Ken,,hourly,confirmed,\n"
    "left@example.org,Left Before,,daily,unsubscribed,\n"
    "pending@example.org,,,daily,pending,\n"
    "\n"
)


def upload(admin: TestClient, content: str | bytes, **params: Any) -> dict[str, Any]:
    data = content if isinstance(content, bytes) else content.encode()
    response = admin.post("/api/imports", params=params, files={"file": ("list.csv", data, "text/csv")})
    assert response.status_code == 202, response.text
    return finished(admin, response.json()["id"])


def finished(admin: TestClient, job_id: int) -> dict[str, Any]:
    queue.drain()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        report = admin.get(f"/api/imports/{job_id}").json()
        if report["state"] in {"done", "failed"}:
            return dict(report)
        time.sleep(0.05)
    raise AssertionError(f"import {job_id} did not finish")


def test_csv_import_dry_run_then_real_lists_bad_rows_and_imports_the_rest(admin: TestClient) -> None:
    """A dry run reports every bad row and changes nothing; the import then adds the good rows only."""
    dry = upload(admin, CSV_WITH_BAD_ROWS, dry_run="true")
    assert dry["state"] == "done"
    assert dry["counts"] == {"added": 4, "updated": 0, "unchanged": 0, "skipped": 0, "errors": 4}
    assert subscriber_row("ada@example.org") is None, "a dry run writes nothing"
    errors = {e["row"]: e["error"] for e in dry["errors"]}
    assert set(errors) == {3, 5, 6, 7}
    assert errors[3].startswith("email:")
    assert "already on line 2" in errors[5]
    assert "Unknown category 'Gardening'" in errors[6]
    assert "'hourly' is not daily or weekly" in errors[7]
    assert "Ignored columns: signed_up" in dry["message"]

    real = admin.post(f"/api/imports/{dry['id']}/run")
    assert real.status_code == 202
    report = finished(admin, dry["id"])
    assert report["counts"]["added"] == 4
    assert report["counts"]["errors"] == 4
    ada = subscriber_row("ada@example.org")
    assert ada is not None
    assert ada.status == "confirmed"
    assert ada.frequency == "weekly"
    assert [c.slug for c in ada.categories] == ["foreign-policy-and-international-relations", "us-russia-relations"]
    assert ada.name == "Ada Lovelace"
    grace = subscriber_row("grace@example.org")
    assert grace is not None
    assert grace.status == "confirmed", "no status means the default, confirmed"
    left = subscriber_row("left@example.org")
    assert left is not None
    assert left.status == "unsubscribed"
    assert subscriber_row("linus@example.org") is None
    assert consent_actions("ada@example.org") == ["import"]
    # The file held personal data: it is not kept once imported.
    assert admin.post(f"/api/imports/{dry['id']}/run").status_code == 422


def test_import_updates_but_never_resubscribes_someone_who_left(admin: TestClient) -> None:
    """A second file updates names and categories, records an unsubscribe, and skips people who left."""
    upload(admin, "email,name,status\nkim@example.org,Kim,confirmed\nlee@example.org,Lee,unsubscribed\n")
    second = upload(admin, "email,name,categories,status\nkim@example.org,Kim Park,us-nato-relations,confirmed\n"
                           "lee@example.org,Lee,,confirmed\nkim@EXAMPLE.org,,,\n")
    assert (second["counts"]["updated"], second["counts"]["skipped"], second["counts"]["errors"]) == (1, 1, 1)
    problems = {e["row"]: (e["kind"], e["error"]) for e in second["errors"]}
    assert problems[3] == ("skipped", "the address is unsubscribed; only its owner can subscribe it again.")
    assert problems[4] == ("error", "email: the address is already on line 2.")
    kim = subscriber_row("kim@example.org")
    assert kim is not None
    assert kim.name == "Kim Park"
    assert [c.slug for c in kim.categories] == ["us-nato-relations"]
    lee = subscriber_row("lee@example.org")
    assert lee is not None
    assert lee.status == "unsubscribed"


def test_an_import_that_confirms_a_reader_starts_their_digests_afresh(admin: TestClient) -> None:
    """A reader confirmed by a file, as by their link, gets a first digest of one period, not a backlog
    from a cursor left over from an earlier time on the list."""
    upload(admin, "email,name,status\nback@example.org,Back,pending\n")
    reader = subscriber_row("back@example.org")
    assert reader is not None
    with session_scope() as session:
        session.add(DigestCursor(subscriber_id=reader.id, at=utcnow().replace(year=2025)))
    upload(admin, "email,status\nback@example.org,confirmed\n")
    with session_scope() as session:
        assert session.get(Subscriber, reader.id).status == "confirmed"  # type: ignore[union-attr]
        assert session.get(DigestCursor, reader.id) is None


def test_erased_subscriber_stays_suppressed_when_imported_again(admin: TestClient) -> None:
    """Erasure removes the person's data and keeps only a hash; importing them again skips them."""
    upload(admin, "email,name\nerin@example.org,Erin Example\n")
    erin = subscriber_row("erin@example.org")
    assert erin is not None
    # Her address is quoted elsewhere too: an import's report, the audit trail, an SMTP reply.
    upload(admin, "email,name\nerin@example.org,Erin Example\nerin@example.org,Twice\n")
    admin.post(f"/api/subscribers/{erin.id}/suppress", json={"reason": "asked for a pause"})
    with session_scope() as session:
        campaign = Campaign(subject="s", html="h", categories=[], status="finished")
        session.add(campaign)
        session.flush()
        session.add(Delivery(campaign_id=campaign.id, subscriber_id=erin.id, state="failed", smtp_code=550,
                             smtp_text="5.1.1 <erin@example.org>: Recipient address rejected"))
    no_reason = admin.post(f"/api/subscribers/{erin.id}/erase", json={"reason": ""})
    assert no_reason.status_code == 422
    erased = admin.post(f"/api/subscribers/{erin.id}/erase", json={"reason": "Asked by mail on 2026-11-20"})
    assert erased.status_code == 200
    view = admin.get(f"/api/subscribers/{erin.id}").json()
    assert view["erased"] is True
    assert view["name"] == ""
    assert "erin" not in view["email"]
    with session_scope() as session:
        entry = session.scalar(select(Suppression).where(Suppression.email_hash == hash_email("erin@example.org")))
        assert entry is not None
        assert entry.email is None
        # The admin's earlier block is the stronger entry (a fresh sign-up cannot lift it), so it stays.
        assert entry.reason == "admin"
        trail = session.scalars(select(ConsentEvent).where(ConsentEvent.subscriber_id == erin.id)).all()
        assert all(e.ip is None and e.user_agent is None for e in trail)
        assert "Erin" not in str([e.details for e in trail])
        everywhere = " ".join([
            *session.scalars(select(Delivery.smtp_text)), *session.scalars(select(AdminAction.target)),
            *(str(errors) for errors in session.scalars(select(ImportJob.errors)))]).lower()
        assert "erin" not in everywhere
    again = upload(admin, "email,name,status\nErin@Example.org,Erin Example,unsubscribed\n")
    assert again["counts"]["skipped"] == 1
    assert again["counts"]["added"] == 0
    assert "suppressed (admin)" in again["errors"][0]["error"]
    assert subscriber_row("erin@example.org") is None
    # The export leaves erased people out.
    exported = admin.get("/api/subscribers/export")
    assert exported.status_code == 200
    assert "erin" not in exported.text.lower()


def test_an_erased_reader_is_not_imported_again_by_dry_run_or_real_run(admin: TestClient) -> None:
    """A reader who was only erased (no other suppression) is reported as skipped, with the reason, by a
    dry run and by the real import of the same file, and is not subscribed again."""
    upload(admin, "email,name\nnora@example.org,Nora\n")
    nora = subscriber_row("nora@example.org")
    assert nora is not None
    assert admin.post(f"/api/subscribers/{nora.id}/erase", json={"reason": "asked by mail"}).status_code == 200
    with session_scope() as session:
        entries = session.scalars(select(Suppression)).all()
        assert [(e.reason, e.email) for e in entries] == [("erased", None)], "only the erasure's hashed entry"
    again = "email,name,status\nNora@Example.org,Nora Back,confirmed\nnew@example.org,New,confirmed\n"
    dry = upload(admin, again, dry_run="true")
    real = upload(admin, again)
    for report in (dry, real):
        assert report["state"] == "done"
        assert (report["counts"]["added"], report["counts"]["skipped"], report["counts"]["errors"]) == (1, 1, 0)
        [problem] = report["errors"]
        assert (problem["row"], problem["kind"]) == (2, "skipped")
        assert problem["error"] == "suppressed (erased): it gets no mail."
        assert problem["email"] == "(an erased address)", "the kept report does not bring the address back"
    assert subscriber_row("nora@example.org") is None, "nobody has the address again"
    assert subscriber_row("new@example.org") is not None
    with session_scope() as session:
        erased = session.get(type(nora), nora.id)
        assert erased is not None
        assert (erased.status.value, erased.name) == ("unsubscribed", "")
        kept = " ".join(str(errors) for errors in session.scalars(select(ImportJob.errors))).lower()
        assert "nora" not in kept


def test_export_round_trips_through_import(admin: TestClient) -> None:
    """An export has the import's columns; a name that looks like a formula is defused for spreadsheets."""
    upload(admin, "email,name,categories,frequency\nsam@example.org,=HYPERLINK(1),us-russia-relations,weekly\n")
    exported = admin.get("/api/subscribers/export")
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["email"], r["name"], r["categories"], r["frequency"], r["status"]) for r in rows] == [
        ("sam@example.org", "'=HYPERLINK(1)", "us-russia-relations", "weekly", "confirmed")]
    # An address may itself start like a formula; importing the export gives back the very same values.
    upload(admin, "email,name\n-2@example.org,Minus\n")
    exported = admin.get("/api/subscribers/export").text
    assert "\r\n'-2@example.org,Minus," in exported
    again = upload(admin, exported)
    assert again["counts"]["unchanged"] == 2
    sam = subscriber_row("sam@example.org")
    assert sam is not None
    assert sam.name == "=HYPERLINK(1)"


def test_suppression_list_add_and_remove_need_a_reason(admin: TestClient, smtp: SmtpSink) -> None:
    """Admins add to and remove from the suppression list, each with a reason kept in the audit trail."""
    assert admin.post("/api/suppressions", json={"email": "x@example.org", "reason": " "}).status_code == 422
    assert admin.post("/api/suppressions", json={"email": "nope", "reason": "spam trap"}).status_code == 422
    added = admin.post("/api/suppressions", json={"email": "Trap@Example.org", "reason": "spam trap"})
    assert added.status_code == 201
    listed = admin.get("/api/suppressions", params={"q": "trap@example.org"}).json()
    assert [(e["email"], e["reason"], e["detail"]) for e in listed] == [("Trap@example.org", "admin", "spam trap")]
    skipped = upload(admin, "email\ntrap@example.org\n")
    assert skipped["counts"]["skipped"] == 1
    removed = admin.post(f"/api/suppressions/{listed[0]['id']}/remove", json={"reason": "was a typo"})
    assert removed.status_code == 200
    assert admin.get("/api/suppressions").json() == []
    assert admin.post(f"/api/suppressions/{listed[0]['id']}/remove", json={"reason": "again"}).status_code == 404


def test_bad_uploads_get_a_sentence(admin: TestClient) -> None:
    """A file with no email column, or an empty file, is refused at once with a sentence naming the problem."""
    for content, words in (("name,status\nAda,confirmed\n", "one must be 'email'"), ("", "The file is empty")):
        response = admin.post("/api/imports", files={"file": ("x.csv", content.encode(), "text/csv")})
        assert response.status_code == 422
        assert words in response.json()["detail"]
        assert response.json()["field"] == "file"
    missing = admin.post("/api/imports")
    assert missing.status_code == 422
    assert "file" in missing.json()["detail"]
    assert admin.get("/api/imports/999").status_code == 404


def test_subscriber_view_edit_and_unsubscribe(admin: TestClient) -> None:
    """One subscriber's page data: consent history and deliveries; edits and unsubscribes are recorded."""
    upload(admin, "email,name\nval@example.org,Val\n")
    val = subscriber_row("val@example.org")
    assert val is not None
    edited = admin.patch(f"/api/subscribers/{val.id}",
                         json={"frequency": "weekly", "categories": ["us-nato-relations"]})
    assert edited.status_code == 200
    assert edited.json()["frequency"] == "weekly"
    assert admin.patch(f"/api/subscribers/{val.id}", json={"categories": ["nope"]}).status_code == 422
    left = admin.post(f"/api/subscribers/{val.id}/unsubscribe", json={"reason": "asked on the phone"})
    assert left.json()["status"] == "unsubscribed"
    view = admin.get(f"/api/subscribers/{val.id}").json()
    assert [c["action"] for c in view["consent"]] == ["unsubscribe", "preferences", "import"]
    assert view["name"] == "Val"
    assert view["categories"] == ["us-nato-relations"]
    assert admin.get("/api/subscribers/123456").status_code == 404


def test_an_erased_person_can_come_back_on_their_own_but_an_admin_block_holds(admin: TestClient,
                                                                               smtp: SmtpSink) -> None:
    """Confirming a fresh sign-up lifts an erasure's suppression; an admin's block gets no mail at all."""
    from tests.conftest import sign_up
    from tests.mails import confirm_link

    upload(admin, "email,name\nback@example.org,Back\n")
    back = subscriber_row("back@example.org")
    assert back is not None
    admin.post(f"/api/subscribers/{back.id}/erase", json={"reason": "asked"})
    sign_up(admin, "back@example.org", name="Back Again")
    [mail] = smtp.wait_for(1)
    admin.post(confirm_link(mail).removeprefix("https://news.example.org"))
    returned = subscriber_row("back@example.org")
    assert returned is not None
    assert returned.status == "confirmed"
    assert admin.get("/api/suppressions", params={"q": "erased"}).json() == []
    assert consent_actions("back@example.org")[-1] == "confirm"

    # The welcome mail must be in before the sink is cleared, or it would land after and look like a leak.
    queue.drain()
    smtp.wait_for(2)
    admin.post("/api/suppressions", json={"email": "trap@example.org", "reason": "spam trap"})
    smtp.clear()
    sign_up(admin, "trap@example.org")
    queue.drain()
    time.sleep(0.3)
    assert smtp.messages == [], "no confirmation mail to an address an admin blocked"
    # Nor to one whose owner once complained, even when their subscriber row is long gone.
    from mailer import store

    with session_scope() as session:
        store.add_suppression(session, email_hash=hash_email("angry@example.org"), email=None,
                              reason="complaint", detail="ARF from a mailbox provider")
    sign_up(admin, "angry@example.org")
    queue.drain()
    time.sleep(0.3)
    assert smtp.messages == [], "no confirmation mail to an address that complained"


def test_two_runs_of_one_import_import_each_row_once(admin: TestClient) -> None:
    """A job run twice at once (a redelivered task) imports every row once and ends done, not failed."""
    import threading

    from mailer import imports
    from mailer.db import session_scope as scope

    rows = "".join(f"twice{i}@example.org,Twice {i}\n" for i in range(2500))
    with scope() as session:
        job_id = imports.create_job(session, content="email,name\n" + rows, filename="twice.csv", actor="test",
                                    dry_run=False).id
    runners = [threading.Thread(target=imports.run, args=(job_id,)) for _ in range(2)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join(timeout=60)
    report = admin.get(f"/api/imports/{job_id}").json()
    assert (report["state"], report["processed"], report["message"]) == ("done", 2500, "")
    assert report["counts"]["added"] == 2500
    assert report["counts"]["unchanged"] == 0
    exported = admin.get("/api/subscribers/export").text
    assert exported.count("twice") == 2500


def test_odd_files_and_ids_get_sentences(admin: TestClient) -> None:
    """NUL bytes, UTF-16, a header alone and huge ids get a sentence or an empty report, never a 500."""
    nul = admin.post("/api/imports", files={"file": ("x.csv", b"email\na@b.org\x00\n", "text/csv")})
    assert nul.status_code == 422
    assert "NUL bytes" in nul.json()["detail"]
    utf16 = upload(admin, "email,name\nzoe@example.org,Zoë\n".encode("utf-16"))
    assert utf16["counts"]["added"] == 1
    zoe = subscriber_row("zoe@example.org")
    assert zoe is not None
    assert zoe.name == "Zoë"
    header_only = upload(admin, "email,name\n")
    assert (header_only["total"], header_only["counts"]["added"]) == (0, 0)
    for path in ("/api/subscribers/99999999999", "/api/imports/99999999999", "/api/campaigns/99999999999"):
        assert admin.get(path).status_code == 422, path
    assert admin.get("/api/campaigns/1/deliveries", params={"after": 2**70}).status_code == 422


def test_uploads_are_refused_before_they_are_read(admin: TestClient) -> None:
    """Without the token an upload gets 401; an oversize one 413, a missing file a sentence naming it."""
    from mailer.web.app import create_app

    client = TestClient(create_app(), base_url="https://news.example.org")
    anonymous = client.post("/api/imports", files={"file": ("x.csv", b"email\na@b.org\n", "text/csv")})
    assert anonymous.status_code == 401
    console = client.post("/admin/import", files={"file": ("x.csv", b"email\na@b.org\n", "text/csv")},
                          follow_redirects=False)
    assert console.status_code == 303
    assert console.headers["location"].startswith("/admin/login")
    huge = admin.post("/api/imports", content=b"x", headers={"Content-Length": str(200 * 1024 * 1024),
                                                            "Content-Type": "multipart/form-data; boundary=b"})
    assert huge.status_code == 413
    assert "larger than 100 MB" in huge.json()["detail"]
    empty = admin.post("/api/imports", files={"other": ("x.csv", b"email\n", "text/csv")})
    assert empty.status_code == 422
    assert empty.json()["field"] == "file"
    assert subscriber_row("a@b.org") is None
