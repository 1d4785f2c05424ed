"""The upload API (`/api/v1/`): docking stations post signed pages and read back what became of them.

`POST /api/v1/uploads` — multipart/form-data with the page in the part `file` and the fields
`station_id`, `pen_serial` and, optionally, `bureau`; signed (see `pen_gateway.signing`);
optionally an `Idempotency-Key` header (scoped to the station). Answers `202 {"upload_id",
"status": "queued", "status_url"}` only once the raw bytes are synced under var/uploads/ and the
upload row is committed in the journal, and once its `ocr` job is enqueued (or left to the OCR
relay when Redis is down): the gateway's recorder does those for a batch of uploads at a time
(`pen_gateway.recorder`). A retry under the same key gets the first answer again (same status
and body), without storing anything new (the bytes are content-addressed); the same key with a
different page is a 409. A replayed signature is a 401, also without storing anything new.

`GET /api/v1/uploads/<upload_id>` — signed like the POST (the body is empty, so its digest is the
SHA-256 of the empty string), and only for the station that made the upload (any other: 404).
Answers the status (queued, recognized, accepted, review, rejected, failed), once accepted the
receipt, and for a page that was not read (`review` without a return, `failed`) an `error` of the
same shape as the API's errors, `{"code", "message"}`, from `STATION_ERRORS`: why exactly (an
exception, a path) stays in the journal's row for the supervisor, and in the worker's log.
A status read's signature is remembered with the path it read; two reads of one
upload signed in the same second carry the same signature (the second is a replay, 401), so a
station polling faster signs with the next second (tests/pen_helpers.py does).

Every error is JSON `{"code", "message"}` and changes nothing: 401 for signatures (missing,
stale, unknown station, wrong, replayed), 400 a chunked body whose framing is broken or a body that
stopped before its end, 408 a body whose next bytes did not come for 30 s (under gunicorn), 413 too
large, 415 a type we do not take, 422 a page we cannot or will not read (corrupt, decompression bomb,
XML with entities or a DTD), 409 an idempotency key reused for another page, 507 no room to store it,
503 the journal is unavailable.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import time
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, current_app, request, url_for
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from ulid import ULID
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from pen_gateway.app import PenGateway, error_response, gateway_of
from pen_gateway.decode import DecodeError, probe_upload
from pen_gateway.signing import (
    SignatureError,
    SignedRequest,
    check_headers,
    claim_signature,
    remember_signature,
    replayed,
)
from pen_gateway.storage import FULL_ERRNOS, StorageFull, StoredFile
from pen_gateway.uploads import Upload, get_upload, uploads_with_bytes
from telemetry import logs, metrics

bp = Blueprint("api", __name__, url_prefix="/api/v1")

PEN_SERIAL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
BUREAU = re.compile(r"^[0-9]{1,10}$")  # ASCII digits: \d takes "٧" and "７" too
IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


# What a status read says of an upload that was not read, in place of the row's `error`.
STATION_ERRORS = {
    "review": ("NOT_READ", "no return could be read from the page (unreadable, or its bureau unknown); "
                           "it waits for a supervisor"),
    "failed": ("RECOGNITION_FAILED", "the page could not be processed; it waits for a supervisor"),
}


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@bp.errorhandler(ApiError)
def _api_error(exc: ApiError) -> Any:
    return error_response(exc.code, exc.message, exc.status)


@bp.errorhandler(SignatureError)
def _signature_error(exc: SignatureError) -> Any:
    response = error_response(exc.code, exc.message, 401)
    response.headers["WWW-Authenticate"] = 'Remontee-HMAC realm="pen uploads"'
    return response


@bp.errorhandler(DecodeError)
def _decode_error(exc: DecodeError) -> Any:
    return error_response(exc.code, exc.message, exc.http_status)


@bp.errorhandler(StorageFull)
def _storage_full(exc: StorageFull) -> Any:
    return error_response("STORAGE_FULL", "the gateway has no room to store the upload; nothing was kept, "
                          "retry later", 507)


def _gateway() -> PenGateway:
    return gateway_of(current_app)


def _signed_request(gateway: PenGateway) -> tuple[SignedRequest, bytes]:
    """Check the signature headers before reading the body, then the body against the signature."""
    signed = check_headers(request.headers, gateway.stations, window=gateway.signature_window)
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    if request.content_length is not None and request.content_length > limit:
        raise RequestEntityTooLarge()  # refused before a byte of the body is read
    # gunicorn reads the body with no time limit: a station whose link died in the middle of it (no FIN ever
    # comes) would hold this thread for good, and a few such every thread, unless nginx buffers the body first.
    connection = request.environ.get("gunicorn.socket")
    if connection is not None:
        connection.settimeout(current_app.config["BODY_TIMEOUT"])
    try:
        body = request.get_data(cache=True)
        # A streamed (chunked) body is cut at the limit by Werkzeug without an error: one more byte
        # says whether there was more than the limit, i.e. too much.
        too_much = request.content_length is None and len(body) >= limit and request.environ["wsgi.input"].read(1)
    except ParseException as exc:  # gunicorn's reading of a chunked body: a chunk size that is not hex, and so on
        raise ApiError("BAD_REQUEST", f"the body's chunked transfer encoding is malformed ({str(exc)[:100]}); "
                       "nothing was stored: send the upload again", 400) from exc
    except (ClientDisconnected, OSError) as exc:  # OSError: from the one byte read past Werkzeug, above
        # Werkzeug says a read that failed is a disconnection; the one that waited too long, it raised from.
        if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
            raise ApiError("BODY_TIMEOUT", f"no byte of the body came for {current_app.config['BODY_TIMEOUT']:g} "
                           "s: the upload was given up and nothing was stored; send it again", 408) from exc
        raise ApiError("INCOMPLETE_BODY", "the body stopped before its end (before the last chunk of a chunked "
                       "body, or the length its Content-Length announced); nothing was stored: send the upload again",
                       400) from exc
    if too_much:
        raise RequestEntityTooLarge()
    if request.content_length is not None and len(body) < request.content_length:
        # gunicorn hands over what came before the station stopped sending, without an error.
        raise ApiError("INCOMPLETE_BODY", f"the body ended after {len(body)} of the {request.content_length} bytes "
                       "its Content-Length announced; nothing was stored: send the upload again", 400)
    signed.check_body(hashlib.sha256(body).hexdigest())
    return signed, body


def _journal_failure(exc: SQLAlchemyError) -> ApiError:
    orig = getattr(exc, "orig", None)
    full = (isinstance(orig, sqlite3.Error) and getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL) or (
        getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == "53100" or _gateway().journal_disk_full()
    if full:
        return ApiError("STORAGE_FULL", "the journal has no room to record the upload; nothing was kept, "
                        "retry later", 507)
    return ApiError("JOURNAL_UNAVAILABLE", "the journal cannot record the upload right now; nothing was kept, "
                    "retry later", 503)


@bp.errorhandler(SQLAlchemyError)
def _journal_error(exc: SQLAlchemyError) -> Any:
    current_app.logger.warning("journal error: %s", exc)
    failure = _journal_failure(exc)
    return error_response(failure.code, failure.message, failure.status)


def _first_answer(upload: Upload) -> Any:
    body = {"upload_id": upload.upload_id, "status": "queued",
            "status_url": url_for("api.upload_status", upload_id=upload.upload_id)}
    return body, 202, {"Location": body["status_url"]}


def _same_upload(first: Upload, sha256: str, pen_serial: str, bureau: str | None) -> bool:
    return first.sha256 == sha256 and first.pen_serial == pen_serial and first.bureau == bureau


def _discard(gateway: PenGateway, stored: StoredFile) -> None:
    """Remove the bytes this request wrote, unless a journaled upload holds the same bytes.

    Content addressing makes twins share one file: a replay racing its original (or any two
    requests with identical bytes) can be the one that wrote it, while the other's row points at
    it. The store waits for the twins still on their way to the journal (their claims), then this
    asks the journal. When it cannot be read, the bytes go (nothing half-kept): a journal that
    fails this read failed the twin's commit too."""

    def journaled() -> bool:
        try:
            with gateway.journal.read() as conn:
                return uploads_with_bytes(conn, stored.sha256)
        except SQLAlchemyError as exc:
            current_app.logger.warning("journal unreadable, bytes of the refused upload removed: %s", exc)
            return False

    gateway.store.discard(stored, in_use=journaled)


def _retry(gateway: PenGateway, signed: SignedRequest, first: Upload, sha256: str, pen_serial: str,
           bureau: str | None, key: str) -> Any:
    logs.bind(upload_id=first.upload_id)
    if not _same_upload(first, sha256, pen_serial, bureau):
        raise ApiError("IDEMPOTENCY_KEY_REUSED", f"Idempotency-Key {key!r} was used for another upload "
                       f"({first.upload_id}); use a new key for a new page", 409)
    try:
        with gateway.journal.write() as conn:
            remember_signature(conn, signed)
    except IntegrityError as exc:
        raise replayed() from exc
    except SQLAlchemyError as exc:
        raise _journal_failure(exc) from exc
    return _first_answer(first)


@bp.get("/")
def index() -> Any:
    return {"service": "remontee pen gateway", "uploads": url_for("api.create_upload"),
            "formats": ["image/png", "image/jpeg", "image/tiff", "application/inkml+xml"],
            "max_upload_bytes": _gateway().settings.max_upload_bytes}


@bp.post("/uploads")
def create_upload() -> Any:
    gateway = _gateway()
    signed, _body = _signed_request(gateway)

    page = request.files.get("file")
    if page is None:
        raise ApiError("MISSING_FILE", "the page must be in the multipart part named 'file'", 422)
    station_field = request.form.get("station_id", "").strip()
    if station_field != signed.station_id:
        raise ApiError("STATION_MISMATCH", f"the form's station_id {station_field[:64]!r} is not the signing "
                       f"station {signed.station_id!r}", 422)
    pen_serial = request.form.get("pen_serial", "").strip()
    if not PEN_SERIAL.match(pen_serial):
        raise ApiError("BAD_PEN_SERIAL", "pen_serial is required: 1-64 letters, digits, '.', '_', ':' or '-'", 422)
    bureau = request.form.get("bureau", "").strip() or None
    if bureau is not None and not BUREAU.match(bureau):
        raise ApiError("BAD_BUREAU", "bureau, when given, is the bureau's code: digits only", 422)
    key = request.headers.get("Idempotency-Key", "").strip() or None
    if key is not None and not IDEMPOTENCY_KEY.match(key):
        raise ApiError("BAD_IDEMPOTENCY_KEY", "Idempotency-Key is 1-128 printable ASCII characters", 422)

    data = page.read()
    if len(data) > gateway.settings.max_upload_bytes:
        raise RequestEntityTooLarge()
    sha256 = hashlib.sha256(data).hexdigest()
    probed = probe_upload(data, page.mimetype or None)
    # Replays and retries are told apart in the recorder's transaction (the authoritative check, and
    # no read of the journal per request): their bytes, identical to the first upload's, are already
    # stored under the same name, so nothing new is written for them.
    # The bytes are made durable by the recorder, for the whole batch at once, before its commit.
    stored: StoredFile = gateway.store.write(data, sha256)
    try:
        return _record(gateway, signed, stored, probed.content_type, len(data), pen_serial, bureau, key)
    finally:
        gateway.store.release(stored)  # refused or committed: no longer this request's to keep


def _record(gateway: PenGateway, signed: SignedRequest, stored: StoredFile, content_type: str, size: int,
            pen_serial: str, bureau: str | None, key: str | None) -> Any:
    """Journal the upload whose bytes `stored` holds (claimed), and answer."""
    sha256 = stored.sha256
    upload_id = str(ULID())
    logs.bind(upload_id=upload_id)  # every later line of this request carries it (undone at its end)
    upload = Upload(
        upload_id=upload_id, sha256=sha256, path=stored.path, content_type=content_type, size=size,
        station_id=signed.station_id, pen_serial=pen_serial, bureau=bureau, idempotency_key=key, status="queued",
        return_id=None, receipt=None, error=None, received_at=time.time(),
    )
    try:
        recorded = gateway.recorder.record(signed, upload, key, file=stored)
    except TimeoutError as exc:
        # Not known to be committed: keep the bytes (a row may yet point at them); the station retries.
        raise ApiError("JOURNAL_UNAVAILABLE", str(exc), 503) from exc
    except OSError as exc:  # the bytes could not be made durable
        _discard(gateway, stored)
        if exc.errno in FULL_ERRNOS:
            raise StorageFull(exc.errno, str(exc)) from exc
        raise
    except SQLAlchemyError as exc:
        current_app.logger.warning("upload not journaled, its stored bytes removed if new: %s", exc)
        _discard(gateway, stored)
        raise _journal_failure(exc) from exc
    if recorded.outcome == "replayed":
        _discard(gateway, stored)
        raise replayed()
    if recorded.outcome == "first":  # a concurrent retry under the same key committed first
        assert recorded.first is not None
        if recorded.first.sha256 != sha256:
            _discard(gateway, stored)
        return _retry(gateway, signed, recorded.first, sha256, pen_serial, bureau, key or "")

    metrics.UPLOADS.labels("queued").inc()  # its `ocr` job was enqueued by the recorder, after the commit
    return _first_answer(upload)


@bp.get("/uploads/<upload_id>")
def upload_status(upload_id: str) -> Any:
    gateway = _gateway()
    if upload_id.isalnum() and len(upload_id) <= 40:
        logs.bind(upload_id=upload_id)
    signed, _body = _signed_request(gateway)
    try:
        claim_signature(signed, gateway.redis, gateway.journal, scope=request.path)
    except SQLAlchemyError as exc:
        raise _journal_failure(exc) from exc
    upload = get_upload(gateway.journal, upload_id) if upload_id.isalnum() and len(upload_id) <= 40 else None
    if upload is None or upload.station_id != signed.station_id:
        # Another station's upload is as unknown as a missing one: ids are not to be probed.
        raise ApiError("NOT_FOUND", f"no upload {upload_id[:40]!r} from station {signed.station_id}", 404)
    answer: dict[str, Any] = {
        "upload_id": upload.upload_id,
        "status": upload.status,
        "received_at": datetime.fromtimestamp(upload.received_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "station_id": upload.station_id,
        "pen_serial": upload.pen_serial,
        "bureau": upload.bureau,
        "content_type": upload.content_type,
        "size": upload.size,
        "sha256": upload.sha256,
    }
    if upload.return_id:
        answer["return_id"] = upload.return_id
    if upload.status == "accepted" and upload.receipt:
        answer["receipt"] = upload.receipt
    if upload.error and upload.status in STATION_ERRORS:
        # The row's own words (an exception, a path, the reader's French) are the supervisor's and the log's.
        code, message = STATION_ERRORS[upload.status]
        answer["error"] = {"code": code, "message": message}
    return answer
