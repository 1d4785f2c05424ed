"""Pen uploads the OCR could attach to no bureau, in the review UI: listed apart in the queue, shown with their
page, claimed on opening, given a registered bureau (the upload is read again: the OCR relay re-enqueues its job)
or rejected; and end to end, a real InkML upload with no bureau from its OCR job to its return in the journal."""

from __future__ import annotations

import html
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import expect
from review_support import (
    ReviewEnv,
    bureau_codes,
    env,
    item_id_for,
    login,
    record_stray_upload,
    sqlite_journal,
)
from rq import SimpleWorker
from rq.job import Job, JobStatus
from sqlalchemy import func, select, update
from test_review_browser import _log_in, _shot, _watch_console, browser, screenshots, served

from pen_gateway.ocr_relay import OcrRelay
from pen_gateway.uploads import get_upload, uploads
from returns_queue.jobs import ocr_job_id, ocr_queue
from returns_queue.journal import audit, returns
from review.review_items import ItemUnavailable
from tests.form_fill import consistent_counts, handwriting_available
from validation import utc_now

__all__ = ["browser", "env", "screenshots", "served", "sqlite_journal"]  # the fixtures, imported for pytest
UPLOAD = "01JNOBUREAU000000000000000A"


def text(response) -> str:
    return html.unescape(response.get_data(as_text=True))


def desk(env: ReviewEnv):  # the UnassignedUploads of the app
    return env.app.extensions["remontee_review"].uploads


def audit_rows(env: ReviewEnv, action: str) -> list:
    with env.journal.read() as conn:
        return conn.execute(select(audit).where(audit.c.action == action)).all()


def ocr_mark(env: ReviewEnv, upload_id: str) -> float | None:
    with env.journal.read() as conn:
        return conn.execute(select(uploads.c.ocr_enqueued_at).where(uploads.c.upload_id == upload_id)).scalar_one()


def test_queue_lists_uploads_without_bureau_apart_oldest_first(env: ReviewEnv) -> None:
    now = time.time()
    record_stray_upload(env.journal, "01JNOBUREAU00000000000000B", received_at=now - 120, station_id="station-B",
                        pen_serial="AJX-B")
    record_stray_upload(env.journal, "01JNOBUREAU00000000000000A", received_at=now - 3 * 3600, station_id="station-A",
                        pen_serial="AJX-A", error="page InkML sans aucun trait")
    client = env.client()
    login(client, "alice")
    page = text(client.get("/items"))
    assert "Envois sans bureau identifié" in page and "2 envois" in page
    section = page.split("Envois sans bureau identifié", 1)[1]
    assert section.index("station-A") < section.index("station-B")  # oldest first
    assert "AJX-A" in section and "AJX-B" in section
    assert "page InkML sans aucun trait" in section and "bureau introuvable" in section
    assert "3 h 00" in section and "2 min" in section  # how long each has waited
    assert "/uploads/01JNOBUREAU00000000000000A" in section
    assert "Aucun élément ne correspond" in page  # no review item: the uploads are not counted as items
    # A filter that cannot match an upload without a bureau hides the section; the default shows it.
    assert "Envois sans bureau identifié" not in text(client.get("/items?channel=ivr"))
    assert "Envois sans bureau identifié" not in text(client.get("/items?state=approved"))
    assert "Envois sans bureau identifié" in text(client.get("/items?channel=pen"))


def test_upload_page_shows_the_page_or_says_there_is_none(env: ReviewEnv) -> None:
    record_stray_upload(env.journal, UPLOAD, var_dir=env.settings.var_dir, pen_serial="AJX-00C0FE")
    record_stray_upload(env.journal, "01JNOBUREAU0000000000NOPAGE")
    client = env.client()
    login(client, "alice")
    page = text(client.get(f"/uploads/{UPLOAD}"))
    assert f'src="/uploads/{UPLOAD}/page"' in page and "AJX-00C0FE" in page and "bureau introuvable" in page
    assert 'name="bureau"' in page and "Réservé par vous" in page
    png = client.get(f"/uploads/{UPLOAD}/page")
    assert png.status_code == 200 and png.mimetype == "image/png"
    assert png.data == (env.settings.var_dir / "uploads" / "artefacts" / UPLOAD / "page.png").read_bytes()
    bare = text(client.get("/uploads/01JNOBUREAU0000000000NOPAGE"))
    assert "Pas d'image de page disponible" in bare and "/NOPAGE/page" not in bare
    assert client.get("/uploads/01JNOBUREAU0000000000NOPAGE/page").status_code == 404
    assert client.get("/uploads/01JUNKNOWN").status_code == 404
    assert client.get("/uploads/..%2Fsecret").status_code == 404


def test_assigning_a_registered_bureau_sends_the_upload_back_to_be_read_and_is_audited(env: ReviewEnv) -> None:
    record_stray_upload(env.journal, UPLOAD, var_dir=env.settings.var_dir)
    with env.journal.write() as conn:  # the OCR relay had marked its first job
        conn.execute(update(uploads).where(uploads.c.upload_id == UPLOAD).values(ocr_enqueued_at=time.time()))
    code = bureau_codes(env.registry)[0]
    client = env.client()
    token = login(client, "alice")
    client.get(f"/uploads/{UPLOAD}")
    response = client.post(f"/uploads/{UPLOAD}/assign", data={"csrf_token": token, "bureau": f" {code} "})
    assert response.status_code == 303
    assert f"rattaché au bureau {code}" in text(client.get("/items"))
    upload = get_upload(env.journal, UPLOAD)
    assert upload.status == "queued" and upload.bureau == code and upload.return_id is None
    assert upload.error is None  # the station's status read no longer shows the old reason
    assert ocr_mark(env, UPLOAD) is None  # the OCR relay's to-do again
    [row] = audit_rows(env, "assign_bureau")
    assert row.actor == "alice" and row.subject == UPLOAD
    assert json.loads(row.before) == {"bureau": None} and json.loads(row.after) == {"bureau": code}
    assert "Envois sans bureau identifié" not in text(client.get("/items"))
    decided = text(client.get(f"/uploads/{UPLOAD}"))
    assert f'Rattaché au bureau <span class="mono">{code}</span> par alice' in decided
    assert 'name="bureau"' not in decided
    assert "en attente de lecture" in decided
    # The audit trail names the action for people.
    admin = env.client()
    login(admin, "root")
    assert "bureau attribué à un envoi" in text(admin.get("/audit?action=assign_bureau"))


@pytest.mark.parametrize("typed", ["999999", "75A01", ""])
def test_an_unknown_or_malformed_bureau_is_refused_and_changes_nothing(env: ReviewEnv, typed: str) -> None:
    record_stray_upload(env.journal, UPLOAD)
    client = env.client()
    token = login(client, "alice")
    client.get(f"/uploads/{UPLOAD}")
    response = client.post(f"/uploads/{UPLOAD}/assign", data={"csrf_token": token, "bureau": typed})
    assert response.status_code == 422
    page = text(response)
    assert "Bureau refusé" in page and "Rien n'a été modifié" in page
    if typed == "999999":
        assert "inconnu du registre" in page and 'value="999999"' in page  # kept for the next try
    upload = get_upload(env.journal, UPLOAD)
    assert upload.status == "review" and upload.bureau is None and upload.error
    assert audit_rows(env, "assign_bureau") == []


def test_assigning_twice_yields_one_change(env: ReviewEnv) -> None:
    record_stray_upload(env.journal, UPLOAD)
    first, second = bureau_codes(env.registry)[:2]
    client = env.client()
    token = login(client, "alice")
    assert client.post(f"/uploads/{UPLOAD}/assign", data={"csrf_token": token, "bureau": first}).status_code == 303
    again = client.post(f"/uploads/{UPLOAD}/assign", data={"csrf_token": token, "bureau": second})
    assert again.status_code == 409 and f"déjà été rattaché au bureau {first} par alice" in text(again)
    assert get_upload(env.journal, UPLOAD).bureau == first
    assert len(audit_rows(env, "assign_bureau")) == 1
    rejected = client.post(f"/uploads/{UPLOAD}/reject", data={"csrf_token": token, "reason": "doublon"})
    assert rejected.status_code == 409 and get_upload(env.journal, UPLOAD).status == "queued"


def test_two_supervisors_assigning_at_once_yield_one_change(env: ReviewEnv) -> None:
    """Both pass the early checks; the conditional UPDATE inside the transaction lets one through."""
    record_stray_upload(env.journal, UPLOAD)
    codes = dict(zip(("alice", "bob"), bureau_codes(env.registry)[:2], strict=True))
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def assign(who: str) -> None:
        barrier.wait()
        try:
            outcomes[who] = desk(env).assign(UPLOAD, who, codes[who], env.registry)
        except ItemUnavailable as exc:
            outcomes[who] = exc

    threads = [threading.Thread(target=assign, args=(who,)) for who in codes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    winners = [who for who, o in outcomes.items() if not isinstance(o, ItemUnavailable)]
    assert len(winners) == 1 and len(outcomes) == 2
    assert get_upload(env.journal, UPLOAD).bureau == codes[winners[0]]
    [row] = audit_rows(env, "assign_bureau")
    assert row.actor == winners[0]


def test_opening_an_upload_claims_it_and_a_second_supervisor_only_reads(env: ReviewEnv) -> None:
    record_stray_upload(env.journal, UPLOAD)
    alice, bob = env.client(), env.client()
    alice_token = login(alice, "alice")
    bob_token = login(bob, "bob")
    assert "Réservé par vous" in text(alice.get(f"/uploads/{UPLOAD}"))
    assert desk(env).get(UPLOAD).claimed_by == "alice"
    assert "réservé par alice" in text(bob.get("/items"))
    bob_page = text(bob.get(f"/uploads/{UPLOAD}"))
    assert "Consultation seule" in bob_page and "traitement par alice" in bob_page
    assert 'name="bureau"' not in bob_page
    code = bureau_codes(env.registry)[0]
    refused = bob.post(f"/uploads/{UPLOAD}/assign", data={"csrf_token": bob_token, "bureau": code})
    assert refused.status_code == 409 and "traitement par alice" in text(refused)
    assert bob.post(f"/uploads/{UPLOAD}/reject", data={"csrf_token": bob_token, "reason": "non"}).status_code == 409
    assert bob.post(f"/uploads/{UPLOAD}/claim", data={"csrf_token": bob_token}).status_code == 409
    assert get_upload(env.journal, UPLOAD).status == "review"
    # Alice's heartbeat keeps it; releasing lets bob take it.
    beat = alice.post(f"/uploads/{UPLOAD}/claim", data={"csrf_token": alice_token})
    assert beat.status_code == 200 and beat.json["claimed"] is True
    assert alice.post(f"/uploads/{UPLOAD}/release", data={"csrf_token": alice_token}).status_code == 303
    assert "Réservé par vous" in text(bob.get(f"/uploads/{UPLOAD}"))
    assert bob.post(f"/uploads/{UPLOAD}/assign", data={"csrf_token": bob_token, "bureau": code}).status_code == 303


def test_reject_needs_a_reason_and_is_audited(env: ReviewEnv) -> None:
    record_stray_upload(env.journal, UPLOAD)
    client = env.client()
    token = login(client, "alice")
    client.get(f"/uploads/{UPLOAD}")
    blank = client.post(f"/uploads/{UPLOAD}/reject", data={"csrf_token": token, "reason": "  "})
    assert blank.status_code == 400 and "motif est obligatoire" in text(blank)
    assert get_upload(env.journal, UPLOAD).status == "review"
    reason = "page d'essai, pas un procès-verbal"
    assert client.post(f"/uploads/{UPLOAD}/reject", data={"csrf_token": token, "reason": reason}).status_code == 303
    upload = get_upload(env.journal, UPLOAD)
    assert upload.status == "rejected" and upload.return_id is None and upload.bureau is None
    [row] = audit_rows(env, "reject_upload")
    assert row.actor == "alice" and row.subject == UPLOAD
    assert json.loads(row.after) == {"status": "rejected", "note": reason}
    decided = text(client.get(f"/uploads/{UPLOAD}"))
    assert "Rejeté par alice" in decided and reason in decided and "Rejeter cet envoi" not in decided
    assert "Envois sans bureau identifié" not in text(client.get("/items"))


def test_progress_counts_uploads_without_bureau_as_waiting(env: ReviewEnv) -> None:
    record_stray_upload(env.journal, UPLOAD)
    record_stray_upload(env.journal, "01JNOBUREAU00000000000000C")
    client = env.client()
    login(client, "alice")
    data = client.get("/progress.json").json
    assert data["uploads_waiting"] == 2 and data["items_open"] == 0
    panel = text(client.get("/progress/panel"))
    assert 'data-figure="items">2<' in panel and 'data-figure="uploads-waiting">2</span> envois sans bureau' in panel


def test_the_ocr_relay_replaces_the_ended_job_of_an_upload_sent_back(env: ReviewEnv) -> None:
    """The first job's id (derived from the upload id) is still taken by the finished job: the relay replaces it,
    but only for an upload that is queued again, and never a job that is still waiting or running."""
    record_stray_upload(env.journal, UPLOAD)
    record_stray_upload(env.journal, "01JNOBUREAU0000000000WAITS")
    queue = ocr_queue(env.redis)
    for upload_id in (UPLOAD, "01JNOBUREAU0000000000WAITS"):
        queue.enqueue("builtins.len", "x", job_id=ocr_job_id(upload_id))  # stands for the first recognition
    SimpleWorker([queue], connection=env.redis).work(burst=True)
    assert Job.fetch(ocr_job_id(UPLOAD), connection=env.redis).get_status() == JobStatus.FINISHED
    relay = OcrRelay(env.journal, env.redis, "builtins.str", grace=0)
    assert relay.relay_once() == 0  # nothing queued: the finished jobs stay
    for code, upload_id in zip(bureau_codes(env.registry), (UPLOAD, "01JNOBUREAU0000000000WAITS"), strict=False):
        desk(env).assign(upload_id, "alice", code, env.registry)
    queue.enqueue("builtins.len", "y", job_id=ocr_job_id("01JNOBUREAU0000000000WAITS"))  # its new job, waiting
    assert relay.relay_once(now=time.time() + 1) == 1
    job = Job.fetch(ocr_job_id(UPLOAD), connection=env.redis)
    assert job.func_name == "builtins.str" and job.args == (UPLOAD,) and job.get_status() == JobStatus.QUEUED
    assert Job.fetch(ocr_job_id("01JNOBUREAU0000000000WAITS"), connection=env.redis).args == ("y",)
    assert ocr_mark(env, UPLOAD) is not None and relay.relay_once(now=time.time() + 1) == 0
    assert sorted(queue.job_ids) == sorted(ocr_job_id(u) for u in (UPLOAD, "01JNOBUREAU0000000000WAITS"))
    # An ended job whose upload is no longer queued (its first run has just written the row) is left alone.
    record_stray_upload(env.journal, "01JNOBUREAU0000000000STAYS")
    queue.enqueue("builtins.len", "z", job_id=ocr_job_id("01JNOBUREAU0000000000STAYS"))
    SimpleWorker([queue], connection=env.redis).work(burst=True)
    assert relay._replace_ended(["01JNOBUREAU0000000000STAYS"]) == []
    assert Job.fetch(ocr_job_id("01JNOBUREAU0000000000STAYS"), connection=env.redis).args == ("z",)


@pytest.mark.skipif(not handwriting_available(),
                    reason="../shared/data/handwriting is absent: the page is written with real held-out handwriting")
def test_an_inkml_upload_with_no_bureau_reaches_the_journal_once_a_supervisor_assigns_it(
    env: ReviewEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.filled_forms import inkml_upload
    from tests.test_recognition_job import run_worker, store_upload

    # The worker's settings: the review UI's journal, registry and var/ (where the reviewer's artefacts go).
    for key, value in {"REMONTEE_VAR_DIR": env.settings.var_dir, "REMONTEE_DB_URL": env.journal.url,
                       "REMONTEE_REGISTRY": env.settings.registry_path, "REMONTEE_ELECTION": env.election.id}.items():
        monkeypatch.setenv(key, str(value))
    bureau = env.registry.get(bureau_codes(env.registry)[10])
    counts = consistent_counts(env.election, np.random.default_rng(21), inscrits=bureau.inscrits)
    # Strokes carry no QR; no `bureau` field; a pen the registry does not know.
    upload_id = store_upload(env.journal, env.settings.var_dir.parent, inkml_upload(env.election, counts, seed=21),
                             "application/inkml+xml", pen_serial="AJX-UNREGISTERED")
    [first] = run_worker(env.redis, [upload_id])
    assert first.get_status() == JobStatus.FINISHED
    upload = get_upload(env.journal, upload_id)
    assert upload.status == "review" and upload.return_id is None and "bureau introuvable" in upload.error

    client = env.client()
    token = login(client, "alice")
    queue_page = text(client.get("/items"))
    assert "Envois sans bureau identifié" in queue_page and "AJX-UNREGISTERED" in queue_page
    page = text(client.get(f"/uploads/{upload_id}"))
    assert "Page rendue" in page and client.get(f"/uploads/{upload_id}/page").status_code == 200
    assigned = client.post(f"/uploads/{upload_id}/assign", data={"csrf_token": token, "bureau": bureau.code})
    assert assigned.status_code == 303

    # The pen gateway's OCR relay sees the upload queued again and puts a new job on `ocr`; a worker reads it.
    relay = OcrRelay(env.journal, env.redis)
    assert relay.relay_once(now=time.time() + 60) == 1
    SimpleWorker([ocr_queue(env.redis)], connection=env.redis).work(burst=True)
    upload = get_upload(env.journal, upload_id)
    assert upload.status in ("accepted", "review") and upload.return_id and upload.receipt
    entry = env.journal.get(upload.return_id)
    assert entry.ret.bureau == bureau.code and entry.ret.channel == "pen" and entry.receipt == upload.receipt
    assert entry.ret.source == {"upload_id": upload_id, "station_id": "station-7", "pen_serial": "AJX-UNREGISTERED"}
    assert entry.status == ("accepted" if upload.status == "accepted" else "review")
    queue_page = text(client.get("/items"))
    assert "Envois sans bureau identifié" not in queue_page
    if entry.status == "review":  # the figures wait for a supervisor as any pen return's do
        assert f"/items/{item_id_for(env.journal, upload.return_id)}" in queue_page
    # Relaying again reads it no more; one return for the upload.
    assert relay.relay_once(now=time.time() + 60) == 0
    with env.journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 1


def test_in_a_browser_a_supervisor_assigns_the_bureau_of_an_upload(
    browser: Any, served: tuple[str, ReviewEnv], screenshots: Path
) -> None:
    """Chromium against the app served on loopback: the section, the upload's page, an unknown bureau refused,
    then the right one; no console error (the page keeps the content security policy)."""
    base, env = served
    record_stray_upload(env.journal, UPLOAD, var_dir=env.settings.var_dir, received_at=time.time() - 1500,
                        pen_serial="AJX-00C0FE")
    page = browser.new_context(viewport={"width": 1366, "height": 900}, locale="fr-FR").new_page()
    errors = _watch_console(page)
    _log_in(page, base, "alice")
    expect(page.get_by_role("heading", name="Envois sans bureau identifié")).to_be_visible()
    _shot(page, screenshots / "12-queue-uploads-without-bureau.png")
    page.get_by_role("link", name=f"Ouvrir l'envoi {UPLOAD} de la station station-3").click()
    page.wait_for_url(f"{base}/uploads/{UPLOAD}")
    expect(page.get_by_text("Réservé par vous")).to_be_visible()
    assert page.locator(".page-image img").evaluate("img => img.naturalWidth") == 300  # the PNG was served
    page.get_by_label("Code du bureau").fill("999999")
    page.get_by_role("button", name="Rattacher et relire").click()
    expect(page.get_by_text("le bureau 999999 est inconnu du registre")).to_be_visible()
    _shot(page, screenshots / "13-upload-unknown-bureau.png")
    code = bureau_codes(env.registry)[0]
    page.get_by_label("Code du bureau").fill(code)
    page.get_by_role("button", name="Rattacher et relire").click()
    page.wait_for_url(f"{base}/items")
    expect(page.get_by_text(f"rattaché au bureau {code}")).to_be_visible()
    assert get_upload(env.journal, UPLOAD).bureau == code
    # Chromium reports the refusal's status (422) on the console; nothing else may appear there.
    assert [e for e in errors if "status of 422" not in e] == []


# --- uploads whose recognition failed ---

FAILED = "01JFAILEDREAD0000000000000A"
BROKE = "OSError: stored bytes of upload 01JFAILEDREAD0000000000000A do not match their SHA-256"


def record_failed_upload(env: ReviewEnv, upload_id: str = FAILED, *, error: str = BROKE, received_at: float = 0.0,
                         pen_serial: str | None = "AJX-00FA11") -> None:
    """An upload as the OCR job leaves it when recognition itself raised: `failed`, the exception in `error`."""
    record_stray_upload(env.journal, upload_id, received_at=received_at, pen_serial=pen_serial)
    with env.journal.write() as conn:
        conn.execute(update(uploads).where(uploads.c.upload_id == upload_id).values(status="failed", error=error))


def count_form(env: ReviewEnv, token: str, bureau: str, counts: dict[str, int | str], note: str = "") -> dict:
    return {"csrf_token": token, "bureau": bureau, "note": note,
            **{f"count-{field}": str(value) for field, value in counts.items()}}


def figures(env: ReviewEnv, seed: int, bureau: str) -> dict[str, int]:
    return consistent_counts(env.election, np.random.default_rng(seed), inscrits=env.registry.get(bureau).inscrits)


def test_failed_uploads_are_listed_apart_with_why_and_stay_whatever_the_filter(env: ReviewEnv) -> None:
    record_failed_upload(env, received_at=time.time() - 2 * 3600)
    record_stray_upload(env.journal, UPLOAD)
    client = env.client()
    login(client, "alice")
    page = text(client.get("/items"))
    assert "Envois dont la lecture a échoué" in page and "Envois sans bureau identifié" in page
    section = page.split("Envois dont la lecture a échoué", 1)[1]
    assert "1 envoi" in section and BROKE in section and "AJX-00FA11" in section and f"/uploads/{FAILED}" in section
    assert "2 h 00" in section
    # Not among the uploads without a bureau: each section says what to do with its own.
    unassigned = page.split("Envois sans bureau identifié", 1)[1].split("Envois dont la lecture a échoué", 1)[0]
    assert FAILED not in unassigned
    # A reason filter hides the uploads without a bureau (they have UNKNOWN_BUREAU); a failed one has no reason
    # code to filter on, so it stays in view.
    assert "Envois dont la lecture a échoué" in text(client.get("/items?reason=SUM_MISMATCH"))
    assert "Envois dont la lecture a échoué" in text(client.get("/items?channel=pen"))
    assert "Envois dont la lecture a échoué" not in text(client.get("/items?channel=ivr"))
    # The progress page counts it among what waits for a supervisor.
    progress = client.get("/progress.json").json
    assert progress["uploads_waiting"] == 1 and progress["uploads_failed"] == 1
    panel = text(client.get("/progress/panel"))
    assert 'data-figure="items">2<' in panel and 'data-figure="uploads-failed">1</span> envoi en échec' in panel


def test_a_failed_upload_page_says_why_offers_the_raw_bytes_and_a_count_form(env: ReviewEnv) -> None:
    record_failed_upload(env)
    raw = env.settings.var_dir / "raw-failed.inkml"
    raw.write_bytes(b"<ink>strokes</ink>")
    with env.journal.write() as conn:
        conn.execute(update(uploads).where(uploads.c.upload_id == FAILED).values(path=str(raw)))
    client = env.client()
    login(client, "alice")
    page = text(client.get(f"/uploads/{FAILED}"))
    assert "Envoi dont la lecture a échoué" in page and BROKE in page and "Réservé par vous" in page
    assert 'name="bureau"' in page and all(f'name="count-{f.id}"' in page for f in env.election.fields)
    assert "Enregistrer ces chiffres" in page and "Rejeter cet envoi" in page and "Rattacher et relire" not in page
    assert "Pas d'image de page disponible" in page
    download = client.get(f"/uploads/{FAILED}/raw")
    assert download.status_code == 200 and download.data == b"<ink>strokes</ink>"
    assert download.headers["Content-Disposition"].startswith("attachment")
    assert download.mimetype == "application/octet-stream" and download.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/uploads/01JUNKNOWN00000000000000000/raw").status_code == 404
    anonymous = env.client().get(f"/uploads/{FAILED}/raw")
    assert anonymous.status_code in (302, 401) and anonymous.data != b"<ink>strokes</ink>"


def test_counts_typed_for_a_failed_upload_become_its_return_relayed_and_audited(env: ReviewEnv) -> None:
    docked = time.time() - 2 * 3600
    record_failed_upload(env, received_at=docked)
    code = bureau_codes(env.registry)[3]
    counts = figures(env, 5, code)
    client = env.client()
    token = login(client, "alice")
    client.get(f"/uploads/{FAILED}")
    response = client.post(f"/uploads/{FAILED}/counts", data=count_form(env, token, f" {code} ", counts,
                                                                         "lu sur la page"))
    assert response.status_code == 303
    flashed = text(client.get("/items"))
    assert f"enregistrés pour le bureau {code}" in flashed and "accepté" in flashed
    assert "Envois dont la lecture a échoué" not in flashed
    upload = get_upload(env.journal, FAILED)
    assert upload.status == "accepted" and upload.bureau == code and upload.return_id and upload.receipt
    assert upload.error is None  # the station's status read shows the outcome alone; the audit row keeps why
    entry = env.journal.get(upload.return_id)
    assert entry.status == "accepted" and entry.receipt == upload.receipt and entry.ret.channel == "pen"
    assert entry.ret.bureau == code and dict(entry.ret.counts) == counts
    assert entry.ret.source == {"upload_id": FAILED, "station_id": "station-3", "pen_serial": "AJX-00FA11",
                                "supervisor": "alice"}
    assert entry.ret.received_at == utc_now(docked)  # when the station was answered, not when it was typed
    [row] = audit_rows(env, "enter_upload_counts")
    assert row.actor == "alice" and row.subject == FAILED
    assert json.loads(row.before) == {"status": "failed", "error": BROKE, "bureau": None}
    after = json.loads(row.after)
    assert after["bureau"] == code and after["counts"] == counts and after["receipt"] == upload.receipt
    assert after["status"] == "accepted" and after["note"] == "lu sur la page"
    # The relay takes it to the back office like any accepted return.
    from returns_queue.jobs import return_job_id, returns_queue
    from returns_queue.relay import Relay

    assert Relay(env.journal, env.redis, env.settings.consolidate_job).relay_once() == 1
    assert returns_queue(env.redis).job_ids == [return_job_id(upload.return_id)]
    # Still in view, decided: who, when, the receipt; no form any more.
    decided = text(client.get(f"/uploads/{FAILED}"))
    assert f'Chiffres saisis pour le bureau <span class="mono">{code}</span> par alice' in decided
    assert upload.receipt in decided and "Enregistrer ces chiffres" not in decided and "accepté" in decided
    # A second entry, or a rejection, after the decision changes nothing.
    again = client.post(f"/uploads/{FAILED}/counts", data=count_form(env, token, code, counts))
    assert again.status_code == 409 and "déjà été saisis pour le bureau" in text(again)
    rejected = client.post(f"/uploads/{FAILED}/reject", data={"csrf_token": token, "reason": "doublon"})
    assert rejected.status_code == 409
    assert get_upload(env.journal, FAILED).status == "accepted" and len(audit_rows(env, "enter_upload_counts")) == 1
    with env.journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 1
    admin = env.client()
    login(admin, "root")
    trail = text(admin.get("/audit?action=enter_upload_counts"))
    assert "chiffres saisis pour un envoi illisible" in trail
    # The counts typed, each by its printed label, not the return's JSON with its codes (« channel : pen »).
    assert f"Nombre de votants (émargements)</span> : <del>—</del> → <ins>{counts['votants']}</ins>" in trail
    assert "channel" not in trail.split("<tbody>", 1)[1] and "'votants'" not in trail


def test_counts_that_break_the_form_or_an_unknown_bureau_are_refused_and_change_nothing(env: ReviewEnv) -> None:
    record_failed_upload(env)
    code = bureau_codes(env.registry)[3]
    counts = figures(env, 6, code)
    broken = {**counts, "votants": counts["votants"] + 1}
    client = env.client()
    token = login(client, "alice")
    response = client.post(f"/uploads/{FAILED}/counts", data=count_form(env, token, code, broken))
    assert response.status_code == 422
    page = text(response)
    assert "Chiffres non enregistrés" in page and 'aria-invalid="true"' in page
    assert f'value="{broken["votants"]}"' in page  # what was typed is kept for the next try
    unknown = client.post(f"/uploads/{FAILED}/counts", data=count_form(env, token, "999999", counts))
    assert unknown.status_code == 422 and "inconnu du registre" in text(unknown)
    # More digits than int() converts (4300): a count pasted by mistake answered 500.
    pasted = client.post(f"/uploads/{FAILED}/counts",
                         data=count_form(env, token, code, {**counts, "aubry": "1" * 5000}))
    assert pasted.status_code == 422 and "illisible" in text(pasted)
    upload = get_upload(env.journal, FAILED)
    assert upload.status == "failed" and upload.return_id is None and upload.error == BROKE
    assert audit_rows(env, "enter_upload_counts") == []
    with env.journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 0


def test_counts_for_a_bureau_that_reported_otherwise_by_phone_wait_in_review(env: ReviewEnv) -> None:
    from review_support import submit

    record_failed_upload(env)
    code = bureau_codes(env.registry)[4]
    phoned = figures(env, 7, code)
    assert submit(env.journal, env.election, env.registry, code, phoned).status == "accepted"
    typed = figures(env, 8, code)
    assert typed != phoned
    client = env.client()
    token = login(client, "alice")
    assert client.post(f"/uploads/{FAILED}/counts", data=count_form(env, token, code, typed)).status_code == 303
    upload = get_upload(env.journal, FAILED)
    assert upload.status == "review" and upload.return_id
    queue_page = text(client.get("/items"))
    assert "le retour attend dans la file" in queue_page
    assert f"(retour {upload.return_id}, en revue)" in queue_page  # the return's status in words, not « review »
    assert f"/items/{item_id_for(env.journal, upload.return_id)}" in queue_page  # a review item: never lost


def test_a_failed_upload_can_be_rejected_with_a_reason_and_a_claim_keeps_others_out(env: ReviewEnv) -> None:
    record_failed_upload(env)
    alice, bob = env.client(), env.client()
    alice_token, bob_token = login(alice, "alice"), login(bob, "bob")
    alice.get(f"/uploads/{FAILED}")
    assert "Consultation seule" in text(bob.get(f"/uploads/{FAILED}"))
    code = bureau_codes(env.registry)[3]
    held = bob.post(f"/uploads/{FAILED}/counts", data=count_form(env, bob_token, code, figures(env, 9, code)))
    assert held.status_code == 409 and "traitement par alice" in text(held)
    assert alice.post(f"/uploads/{FAILED}/reject", data={"csrf_token": alice_token, "reason": " "}).status_code == 400
    reason = "page blanche, le bureau a téléphoné"
    assert alice.post(f"/uploads/{FAILED}/reject",
                      data={"csrf_token": alice_token, "reason": reason}).status_code == 303
    assert get_upload(env.journal, FAILED).status == "rejected"
    [row] = audit_rows(env, "reject_upload")
    assert json.loads(row.before) == {"status": "failed", "error": BROKE}
    assert "Rejeté par alice" in text(alice.get(f"/uploads/{FAILED}"))


def test_an_upload_whose_stored_bytes_went_bad_fails_its_ocr_job_and_reaches_a_supervisor(
    env: ReviewEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real OCR job on a real worker: the stored bytes no longer match their hash, the job raises, the row is
    `failed`; a supervisor sees it, downloads it and types its counts; its return is journaled once."""
    from tests.test_recognition_job import run_worker, store_upload

    for key, value in {"REMONTEE_VAR_DIR": env.settings.var_dir, "REMONTEE_DB_URL": env.journal.url,
                       "REMONTEE_REGISTRY": env.settings.registry_path, "REMONTEE_ELECTION": env.election.id}.items():
        monkeypatch.setenv(key, str(value))
    upload_id = store_upload(env.journal, env.settings.var_dir.parent, b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "image/png",
                             pen_serial="AJX-00BAD0")
    get_upload(env.journal, upload_id).path.write_bytes(b"bit rot")
    [job] = run_worker(env.redis, [upload_id])
    assert job.get_status() == JobStatus.FAILED
    upload = get_upload(env.journal, upload_id)
    assert upload.status == "failed" and "do not match their SHA-256" in upload.error

    client = env.client()
    token = login(client, "alice")
    section = text(client.get("/items")).split("Envois dont la lecture a échoué", 1)[1]
    assert "AJX-00BAD0" in section and "do not match their SHA-256" in section
    assert client.get(f"/uploads/{upload_id}/raw").data == b"bit rot"
    code = bureau_codes(env.registry)[5]
    counts = figures(env, 10, code)
    assert client.post(f"/uploads/{upload_id}/counts", data=count_form(env, token, code, counts)).status_code == 303
    upload = get_upload(env.journal, upload_id)
    assert upload.status == "accepted" and env.journal.get(upload.return_id).ret.source["upload_id"] == upload_id
    # A later retry of the job finds the upload decided and writes nothing.
    [again] = run_worker(env.redis, [upload_id])
    assert get_upload(env.journal, upload_id).return_id == upload.return_id
    with env.journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 1
    assert again.get_status() == JobStatus.FINISHED


def test_in_a_browser_a_supervisor_types_the_counts_of_a_failed_upload(
    browser: Any, served: tuple[str, ReviewEnv], screenshots: Path
) -> None:
    """Chromium: the failed section, the upload's page with the live arithmetic check, the return accepted."""
    base, env = served
    record_failed_upload(env, received_at=time.time() - 600)
    code = bureau_codes(env.registry)[2]
    counts = figures(env, 11, code)
    page = browser.new_context(viewport={"width": 1366, "height": 900}, locale="fr-FR").new_page()
    errors = _watch_console(page)
    _log_in(page, base, "alice")
    expect(page.get_by_role("heading", name="Envois dont la lecture a échoué")).to_be_visible()
    page.get_by_role("link", name=f"Ouvrir l'envoi {FAILED} de la station station-3").click()
    page.wait_for_url(f"{base}/uploads/{FAILED}")
    expect(page.get_by_text("Réservé par vous")).to_be_visible()
    expect(page.get_by_text(BROKE)).to_be_visible()
    page.get_by_label("Code du bureau").fill(code)
    labels = {f.id: f.label for f in env.election.fields}
    page.keyboard.press("Enter")  # to the first count, the form not sent: only its button sends it
    expect(page.get_by_label(labels["votants"], exact=True)).to_be_focused()
    assert page.url == f"{base}/uploads/{FAILED}" and get_upload(env.journal, FAILED).status == "failed"
    for field, value in counts.items():
        page.get_by_label(labels[field], exact=True).fill(str(value))
    expect(page.locator('[data-check="total"] .check-result')).to_have_text(f"juste ({counts['votants']})")
    expect(page.locator('[data-check="sum"] .check-result')).to_have_text(f"juste ({counts['exprimes']})")
    _shot(page, screenshots / "14-failed-upload-counts.png")
    page.get_by_role("button", name="Enregistrer ces chiffres").click()
    page.wait_for_url(f"{base}/items")
    expect(page.get_by_text(f"enregistrés pour le bureau {code}")).to_be_visible()
    upload = get_upload(env.journal, FAILED)
    assert upload.status == "accepted" and dict(env.journal.get(upload.return_id).ret.counts) == counts
    assert errors == []


def test_the_upload_sections_page_like_the_queue(env: ReviewEnv) -> None:
    """Each section of uploads showed its first page (ITEMS_PER_PAGE, 50) and said how many there were, with no
    way to the others: past the 50th, an upload without a bureau or whose reading failed could not be reached from
    the queue. Each section now has its pages, as the items do, and paging one keeps the other's page."""
    env.app.config["ITEMS_PER_PAGE"] = 2
    now = time.time()
    stray = [f"01JNOBUREAU00000000000000{c}" for c in "ABCDE"]  # oldest first
    for i, upload_id in enumerate(stray):
        record_stray_upload(env.journal, upload_id, received_at=now - 3600 + i * 60)
    failed = [f"01JFAILEDPAGE0000000000000{c}" for c in "ABC"]
    for i, upload_id in enumerate(failed):
        record_failed_upload(env, upload_id, received_at=now - 3600 + i * 60)
    client = env.client()
    login(client, "alice")

    def section(page: str, title_id: str) -> str:
        return page.split(f'id="{title_id}"', 1)[1].split("</section>", 1)[0]

    def walk(title_id: str, ids: list[str], pages: int) -> str:
        """Follow the section's « Suivante » links from the queue; the ids listed on each page, in order."""
        seen, url = [], "/items"
        for n in range(1, pages + 1):
            listed = section(text(client.get(url)), title_id)
            assert f"page {n} / {pages}" in listed
            seen += re.findall(r'/uploads/([0-9A-Z]+)"', listed)
            following = re.search(r'<a href="([^"]+)">Suivante →</a>', listed)
            if n == pages:
                assert following is None and "Précédente" in listed
                assert seen == ids  # each upload on one page, oldest first
                return url
            url = following.group(1)
        raise AssertionError("no last page")

    last = walk("uploads-title", stray, 3)
    # On the last page of the uploads without a bureau, the failed ones are still at their first page.
    assert failed[0] in section(text(client.get(last)), "failed-title")
    walk("failed-title", failed, 2)
    # Paging the failed section keeps the other's page.
    both = text(client.get("/items?uploads_page=3&failed_page=2"))
    assert stray[4] in section(both, "uploads-title") and failed[2] in section(both, "failed-title")
    following = re.search(r'<a href="([^"]+)">← Précédente</a>', section(both, "failed-title")).group(1)
    back = text(client.get(following))
    assert stray[4] in section(back, "uploads-title") and failed[0] in section(back, "failed-title")
    # The items' pages keep the uploads' too.
    from review_support import GOOD_T1, submit

    for code in bureau_codes(env.registry)[:3]:
        submit(env.journal, env.election, env.registry, code, {**GOOD_T1, "votants": 251})
    items_pager = text(client.get("/items?uploads_page=2")).split('aria-label="Pages"', 1)[1]
    following = re.search(r'<a href="([^"]+)">Suivante →</a>', items_pager).group(1)
    assert re.search(r"[?&]page=2(&|$)", following) and "uploads_page=2" in following
