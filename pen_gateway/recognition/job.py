"""The `ocr` RQ job: one stored pen upload → decoded, read, checked, journaled, its upload row updated.

`recognize_upload(upload_id)` is the function path the upload API enqueues (DESIGN.md: queue
`ocr`, argument the upload id). It reads the raw bytes the API stored, runs the pipeline,
keeps the reviewer's artefacts (pen_gateway/artefacts.py), and submits the return to the
journal with the upload row's new status in the same transaction. An accepted return is
then the journal's to relay onto `returns`; a doubtful one is a review item.

Running twice for the same upload never makes two returns: an upload already past `queued`
is answered from its row, and the row is checked again inside the journal's transaction, so
two workers racing on one upload leave exactly one return (the loser's transaction rolls back).

When the job raises, the upload row goes `failed` (for a supervisor to read the page) only on
its last attempt: while RQ has a retry left (pen_gateway/ocr_relay.py: spread over minutes), the
row stays as it was, since the journal, Redis or the disk may well be back by then. When even the
last attempt cannot write the row, it stays `queued` and the OCR relay's reconciliation enqueues
the job again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rq import get_current_job
from sqlalchemy import Connection, select
from sqlalchemy.exc import SQLAlchemyError

from pen_gateway.artefacts import INK_PAGE, SCAN_PAGE, artefact_dir, field_crop_path, reading_path
from pen_gateway.recognition.assess import Assessment, UploadFacts, assess
from pen_gateway.recognition.pipeline import PageReading, Recognizer, read_page
from pen_gateway.storage import FULL_ERRNOS, ROOM_WAIT_SECONDS, fsync_directory
from pen_gateway.uploads import Upload, create_tables, get_upload, set_upload_status, uploads
from registry import Registry, RegistryFile
from returns_queue.journal import Journal, Submission
from settings import Settings

log = logging.getLogger(__name__)

# Statuses from which a run (first, retried, or asked again by a supervisor) recognizes the upload.
TO_RECOGNIZE = ("queued", "recognized", "failed")
UPLOAD_STATUS_FOR = {"accepted": "accepted", "review": "review", "rejected": "rejected"}


class AlreadyRecognized(Exception):
    """Another run finished this upload while we were reading it: ours is rolled back."""


@dataclass
class Context:
    """What a worker loads once: the journal, the registry, the digit model.

    Built in the RQ worker's main process (`preload`), it is inherited by every forked work
    horse, so a job pays neither the imports nor the registry load. The journal starts its own
    commit thread in each process, and the digit model is loaded per process (a cv2.dnn net
    is not shared across a fork), which costs a few milliseconds.
    """

    settings: Settings
    journal: Journal
    threshold: float
    registry_file: RegistryFile

    @property
    def recognizer(self) -> Recognizer:
        from pen_gateway.digits.recognizer import DigitRecognizer

        return DigitRecognizer()  # cached per process and model by the recognizer module

    @property
    def registry(self) -> Registry | None:
        """The registry, reloaded when its file changes (bureaux added on the night), None when there is none."""
        return self.registry_file.get()


_contexts: dict[Settings, Context] = {}
_contexts_lock = threading.Lock()


def context(settings: Settings) -> Context:
    with _contexts_lock:
        ctx = _contexts.get(settings)
        if ctx is None:
            from pen_gateway.digits.recognizer import RECOMMENDED_THRESHOLD

            journal = Journal(settings.db_url_resolved)
            create_tables(journal)
            ctx = Context(settings, journal, RECOMMENDED_THRESHOLD, RegistryFile(settings.registry_path))
            _contexts[settings] = ctx
        return ctx


_worker_settings: Settings | None = None


def preload(settings: Settings) -> None:
    """For the RQ worker's main process, before it forks: the pipeline's imports, the journal, the registry.

    The worker's settings (its flags as well as its environment) become the jobs' settings.
    """
    global _worker_settings
    import pen_gateway.decode  # noqa: F401 - imported here so that no job pays for it

    _worker_settings = settings
    _ = context(settings).registry


def recognize_upload(upload_id: str) -> dict[str, Any]:
    """The RQ job: the worker's settings when it preloaded them, else the environment's."""
    return process_upload(upload_id, context(_worker_settings or Settings.from_env()))


def process_upload(upload_id: str, ctx: Context) -> dict[str, Any]:
    try:
        upload = get_upload(ctx.journal, upload_id)
        if upload is None:
            raise LookupError(f"no upload {upload_id!r} in the journal")
        if upload.status not in TO_RECOGNIZE:
            log.info("upload %s already %s: nothing to do", upload_id, upload.status)
            return _outcome(upload)
        return _recognize(upload, ctx)
    except Exception as exc:
        # A retry may still mend it (a journal or a disk back, a timeout): `failed` sends the upload to a
        # supervisor, so only the last attempt says so. RQ keeps the traceback either way.
        if not _retries_left():
            _mark_failed(ctx, upload_id, exc)
        raise


def _retries_left() -> int:
    """How many times RQ will run this job again if it raises now (0 outside RQ, or with no Retry)."""
    job = get_current_job()
    return (job.retries_left or 0) if job is not None else 0


def _mark_failed(ctx: Context, upload_id: str, exc: Exception) -> None:
    """Recognition broke for good: say so on the row (the raw bytes stay), unless the journal is away too.

    When it is, the row stays `queued` with its job ended, and the OCR relay's reconciliation runs the
    job again once the journal is back (pen_gateway/ocr_relay.py): the upload is not forgotten.
    """
    try:
        with ctx.journal.write() as conn:
            if _status(conn, upload_id) in TO_RECOGNIZE:
                set_upload_status(conn, upload_id, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
    except (SQLAlchemyError, TimeoutError) as journal_error:
        log.warning("upload %s: could not mark it failed (%s); it stays queued for the OCR relay", upload_id,
                    journal_error)


def _recognize(upload: Upload, ctx: Context) -> dict[str, Any]:
    from pen_gateway.decode import DecodeError, decode_upload

    settings = ctx.settings
    data = upload.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != upload.sha256:
        raise OSError(f"stored bytes of upload {upload.upload_id} do not match their SHA-256")
    try:
        page = decode_upload(data, upload.content_type)
        reading = read_page(page, ctx.recognizer, settings.election)
    except DecodeError as exc:
        # The API's probe let it in, the full decode does not: a page nobody can read, for a human.
        reading = PageReading("image", None, None, "none", None, None, problem=f"fichier illisible : {exc.message}")
    facts = UploadFacts(upload.upload_id, upload.station_id, upload.pen_serial, upload.bureau, upload.received_at)
    assessment = assess(reading, facts, ctx.registry, settings.election, ctx.threshold)
    write_artefacts(settings.var_dir, upload.upload_id, reading, assessment, ctx.threshold)
    if assessment.ret is None:
        with ctx.journal.write() as conn:
            if _status(conn, upload.upload_id) not in TO_RECOGNIZE:
                return _outcome(_refetch(ctx, upload))
            set_upload_status(conn, upload.upload_id, "review", error=assessment.problem)
        log.warning("upload %s: %s", upload.upload_id, assessment.problem)
        return {"upload_id": upload.upload_id, "status": "review", "return_id": None, "receipt": None,
                "error": assessment.problem}

    def also(conn: Connection, submission: Submission) -> None:
        if _status(conn, upload.upload_id) not in TO_RECOGNIZE:
            raise AlreadyRecognized(upload.upload_id)
        set_upload_status(conn, upload.upload_id, UPLOAD_STATUS_FOR.get(submission.status, "review"),
                          return_id=submission.return_id, receipt=submission.receipt)

    try:
        submission = ctx.journal.submit(assessment.ret, assessment.findings, also=also)
    except AlreadyRecognized:
        return _outcome(_refetch(ctx, upload))
    log.info("upload %s → return %s (%s, receipt %s)", upload.upload_id, submission.return_id, submission.status,
             submission.receipt)
    return {"upload_id": upload.upload_id, "status": UPLOAD_STATUS_FOR.get(submission.status, "review"),
            "return_id": submission.return_id, "receipt": submission.receipt,
            "reasons": sorted({str(f.code) for f in submission.findings})}


def _status(conn: Connection, upload_id: str) -> str | None:
    return conn.execute(select(uploads.c.status).where(uploads.c.upload_id == upload_id)).scalar_one_or_none()


def _refetch(ctx: Context, upload: Upload) -> Upload:
    return get_upload(ctx.journal, upload.upload_id) or upload


def _outcome(upload: Upload) -> dict[str, Any]:
    """What an earlier job made of the upload: this one changed nothing (`changed`, for telemetry/worker.py)."""
    return {"upload_id": upload.upload_id, "status": upload.status, "return_id": upload.return_id,
            "receipt": upload.receipt, "error": upload.error, "changed": False}


# --- the reviewer's artefacts ---

def reading_document(reading: PageReading, assessment: Assessment, threshold: float) -> dict[str, Any]:
    """reading.json, as pen_gateway/artefacts.py describes it, plus how the form was identified and read."""
    return {
        "fields": {
            fid: {**fr.to_dict(), "checked_confidence": round(assessment.confidences.get(fid, fr.confidence), 6)}
            for fid, fr in reading.fields.items()
        },
        "suggestions": [[fid, value] for fid, value in assessment.suggestions],
        "bureau": assessment.bureau,
        "election": reading.election.id if reading.election else None,
        "qr": reading.qr_text if reading.identified_by == "qr" else None,
        "identified_by": reading.identified_by,
        "printed_text": reading.qr_text if reading.identified_by != "qr" else None,
        "bureau_from": assessment.bureau_from,
        "kind": reading.kind,
        "problem": assessment.problem,
        "threshold": threshold,
        "alignment": None if reading.alignment is None else {
            "markers": list(reading.alignment.markers),
            "residual_mm": round(reading.alignment.residual_mm, 4),
            "px_per_mm": round(reading.alignment.px_per_mm, 3),
        },
        "findings": [f.to_dict() for f in assessment.findings],
    }


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(data)
            # On disk before its name: the journal's commit that follows makes ext4 commit the rename at once, and
            # the blocks would be written back up to 30 s later (after a power cut, an empty file under the name).
            os.fdatasync(f.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # a half-written file must not take the room others need
        raise


def _encoded(image: np.ndarray, extension: str, params: list[int]) -> bytes:
    ok, buf = cv2.imencode(extension, image, params)
    if not ok:
        raise ValueError(f"cannot encode the artefact as {extension}")
    return buf.tobytes()


def _png(image: np.ndarray) -> bytes:
    # Run-length coding only: a scan's grain defeats zlib's search, which took a quarter more time
    # for larger files (a scanned form's artefacts: 1,004-1,113 kB, 868-988 kB with RLE; ink 38 and 26 kB).
    # No row filter either: on grain, trying libpng's five filters a row costs more than it saves
    # (a scanned page 51 → 28 ms and 764 → 735 kB, another 35 → 20 ms and 490 → 508 kB; an ink page 14 → 3 ms).
    return _encoded(image, ".png", [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY,
                                    cv2.IMWRITE_PNG_STRATEGY_RLE, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE])


def _jpeg(image: np.ndarray) -> bytes:
    # A scan's page for the reviewer to see: its grain costs lossless coding 28 ms and 730 kB a page, this 4 ms and
    # 280 kB, and at quality 90 the eye sees the same page (the raw upload is kept, byte for byte).
    return _encoded(image, ".jpg", [cv2.IMWRITE_JPEG_QUALITY, 90])


def write_artefacts(
    var_dir: Path, upload_id: str, reading: PageReading, assessment: Assessment, threshold: float
) -> None:
    """page.jpg (page.png), field-<id>.png and reading.json, each replaced whole so the review UI never sees half a
    file."""
    waited, delay = 0.0, 1.0
    while True:
        try:
            _write_artefact_files(var_dir, upload_id, reading, assessment, threshold)
            return
        except OSError as exc:
            if exc.errno not in FULL_ERRNOS or waited >= ROOM_WAIT_SECONDS:
                raise
            log.warning("upload %s: no room for its artefacts (%s); trying again in %.0f s", upload_id,
                        os.strerror(exc.errno or 0), delay)
            time.sleep(delay)
            waited += delay
            delay = min(2 * delay, 15.0)


def _write_artefact_files(
    var_dir: Path, upload_id: str, reading: PageReading, assessment: Assessment, threshold: float
) -> None:
    directory = artefact_dir(var_dir, upload_id)
    created = not directory.is_dir()
    directory.mkdir(parents=True, exist_ok=True)
    if reading.page_image is not None:
        if reading.kind == "image":
            _write_atomically(directory / SCAN_PAGE, _jpeg(reading.page_image))
        else:
            _write_atomically(directory / INK_PAGE, _png(reading.page_image))
    for field_id, image in reading.field_images.items():
        _write_atomically(field_crop_path(var_dir, upload_id, field_id), _png(image))
    document = reading_document(reading, assessment, threshold)
    _write_atomically(reading_path(var_dir, upload_id), json.dumps(document, ensure_ascii=False, indent=1).encode())
    # The names too, before the return that sends a supervisor to them is journaled.
    fsync_directory(directory)
    if created:
        fsync_directory(directory.parent)
        fsync_directory(directory.parent.parent)
