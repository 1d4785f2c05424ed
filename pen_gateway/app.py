"""The pen gateway's Flask app factory: configuration, the shared services, JSON errors, the OCR relay thread.

`create_app(test_config=None)` builds the app. Configuration comes from the mapping first
(tests pass `SETTINGS`, a `settings.Settings`, plus any of the keys below), then the
environment through `Settings.from_env()` for whatever the mapping does not give.

Keys: `SETTINGS`; `OCR_RELAY` (start the OCR relay thread in this process; `run_gateway.py pen`
sets it, tests that want to watch the relay at work call it themselves); `OCR_JOB` (the
function path of the `ocr` job); `OCR_RELAY_GRACE` (seconds an unenqueued upload waits before
the relay takes it over from the API); `SIGNATURE_WINDOW` (seconds a timestamp may be off); `BODY_TIMEOUT`
(seconds gunicorn may wait for the next bytes of an upload's body: nginx's `client_body_timeout`, docs/deploy.md).
"""

from __future__ import annotations

import atexit
import io
import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Request, jsonify
from redis import Redis
from redis.exceptions import RedisError
from werkzeug.exceptions import HTTPException

from pen_gateway.multipart import parse_form_data
from pen_gateway.ocr_relay import OCR_JOB, OcrRelay, ocr_job_data
from pen_gateway.recorder import UploadRecorder
from pen_gateway.signing import REPLAY_MEMORY, SIGNATURE_WINDOW, StationRegistry
from pen_gateway.storage import RawStore
from pen_gateway.uploads import Upload, create_tables
from returns_queue.jobs import OCR_QUEUE, ocr_queue
from returns_queue.journal import Journal
from settings import Settings, make_var_dir
from telemetry import logs
from telemetry.exposition import install_flask
from telemetry.state import StateCollector

log = logging.getLogger(__name__)

# Room for the multipart envelope and the form fields on top of the file itself.
ENVELOPE_BYTES = 64 * 1024

# HTTP status → the `code` of the JSON error, for errors Flask or Werkzeug raise themselves.
HTTP_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 411: "LENGTH_REQUIRED",
              413: "TOO_LARGE", 415: "UNSUPPORTED_MEDIA_TYPE", 500: "INTERNAL_ERROR"}


class PenRequest(Request):
    """Parses an upload's multipart body from memory (`pen_gateway.multipart`) when it is well formed, and
    keeps file parts in memory when Werkzeug parses it: the whole body is already in memory (bounded by
    MAX_CONTENT_LENGTH), and Werkzeug would otherwise spool each part over 500 KB to a temporary file."""

    def _get_file_stream(self, total_content_length: int | None, content_type: str | None,
                         filename: str | None = None, content_length: int | None = None) -> Any:
        return io.BytesIO()

    def _load_form_data(self) -> None:
        body = getattr(self, "_cached_data", None)  # the signature check read it (get_data(cache=True))
        if "form" not in self.__dict__ and isinstance(body, bytes) and self.mimetype == "multipart/form-data":
            parsed = parse_form_data(body, self.mimetype_params.get("boundary", ""),
                                     max_field_bytes=self.max_form_memory_size, max_parts=self.max_form_parts)
            if parsed is not None:
                self.__dict__["stream"] = io.BytesIO()
                self.__dict__["form"], self.__dict__["files"] = parsed
                return
        super()._load_form_data()


class PenGateway:
    """What every request of the pen gateway uses: settings, journal, stations, raw store, Redis."""

    def __init__(self, settings: Settings, *, ocr_job: str = OCR_JOB, signature_window: int = SIGNATURE_WINDOW,
                 relay_grace: float = 5.0) -> None:
        if not 0 < signature_window <= REPLAY_MEMORY / 2:
            # A timestamp is good from `window` before it to `window` after: a signature used at the start
            # could be replayed at the end, 2 x window later, and must still be remembered then.
            raise ValueError(f"a signature window of {signature_window} s needs used signatures remembered "
                             f"for {2 * signature_window} s; they are for {REPLAY_MEMORY} s")
        self.settings = settings
        make_var_dir(settings.var_dir)
        self.journal = Journal(settings.db_url_resolved)
        create_tables(self.journal)
        self.stations = StationRegistry(self.journal, settings.var_dir)
        self.store = RawStore(settings.var_dir)
        # Short timeouts: a hung Redis must not hold an upload whose bytes are already journaled.
        self.redis = Redis.from_url(settings.redis_url_resolved, socket_timeout=2, socket_connect_timeout=1)
        self.recorder = UploadRecorder(self.journal, settings.var_dir / "journal.lock" if self.journal.sqlite else None,
                                       store=self.store, after_commit=self._enqueue_recorded)
        self.ocr_job, self.signature_window, self.relay_grace = ocr_job, signature_window, relay_grace
        self._redis_down_until = 0.0
        self._stop = threading.Event()
        self.relay: OcrRelay | None = None

    def enqueue_ocr(self, upload_id: str) -> bool:
        """Best effort, after the journal commit: False leaves the job to the OCR relay."""
        return self.enqueue_ocr_many([upload_id])

    def enqueue_ocr_many(self, upload_ids: list[str]) -> bool:
        """The `ocr` jobs of uploads just committed, in one Redis round trip; False leaves them to the OCR relay."""
        if time.monotonic() < self._redis_down_until:
            return False  # Redis failed a moment ago: don't make every upload wait for it to fail again
        try:
            queue = ocr_queue(self.redis)
            queue.enqueue_many([ocr_job_data(queue, upload_id, self.ocr_job) for upload_id in upload_ids])
            return True
        except RedisError as exc:
            self._redis_down_until = time.monotonic() + 1.0
            for upload_id in upload_ids:  # a line per upload, each carrying its id (as a request's lines do)
                with logs.bound(upload_id=upload_id):
                    log.warning("upload %s journaled; Redis unavailable (%s): the OCR relay will enqueue it",
                                upload_id, exc)
            return False

    def _enqueue_recorded(self, recorded: list[Upload]) -> None:
        self.enqueue_ocr_many([upload.upload_id for upload in recorded])

    def journal_disk_full(self) -> bool:
        """Whether the SQLite journal's filesystem is out of room (SQLite often reports that as an I/O error)."""
        if not self.journal.url.startswith("sqlite:///"):
            return False
        try:
            stats = os.statvfs(Path(self.journal.url.removeprefix("sqlite:///")).parent)
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize < 1024 * 1024

    def start_relay(self) -> OcrRelay:
        if self.relay is None:
            self.relay = OcrRelay(self.journal, self.redis, self.ocr_job, grace=self.relay_grace,
                                  write=self.recorder.write, var_dir=self.settings.var_dir)
            self.relay.start(self._stop)
        return self.relay

    def close(self) -> None:
        self._stop.set()
        if self.relay is not None:
            self.relay.wakeup.set()
        self.recorder.close()
        self.redis.close()
        self.journal.dispose()


def gateway_of(app: Flask) -> PenGateway:
    return app.extensions["pen_gateway"]


def error_response(code: str, message: str, status: int) -> Any:
    response = jsonify({"code": code, "message": message})
    response.status_code = status
    return response


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    from pen_gateway.api import bp as api_blueprint

    app = Flask(__name__)
    app.request_class = PenRequest
    app.config.from_mapping(OCR_RELAY=False, OCR_JOB=OCR_JOB, OCR_RELAY_GRACE=5.0,
                            SIGNATURE_WINDOW=SIGNATURE_WINDOW, BODY_TIMEOUT=30.0)
    if test_config is not None:
        app.config.from_mapping(test_config)
    settings: Settings = app.config.get("SETTINGS") or Settings.from_env()
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + ENVELOPE_BYTES
    app.json.ensure_ascii = False  # type: ignore[attr-defined]  # messages are French-friendly UTF-8

    gateway = PenGateway(settings, ocr_job=app.config["OCR_JOB"], signature_window=app.config["SIGNATURE_WINDOW"],
                         relay_grace=float(app.config["OCR_RELAY_GRACE"]))
    app.extensions["pen_gateway"] = gateway
    # /metrics (counts only, no signature asked: Prometheus scrapes it) and request durations;
    # the state it reads at scrape time is the pen's own: uploads by status, the OCR relay, `ocr`.
    install_flask(app, "pen", [StateCollector(gateway.journal, gateway.redis, queues=(OCR_QUEUE,), parts={"uploads"})])
    app.register_blueprint(api_blueprint)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Any:
        status = exc.code or 500
        code = HTTP_CODES.get(status, (exc.name or "ERROR").upper().replace(" ", "_"))
        message = exc.description or exc.name
        if status == 413:
            message = (f"the upload is larger than the {settings.max_upload_bytes} bytes accepted "
                       "(a form page is far smaller)")
        response = error_response(code, message, status)
        if status == 413:
            # The body may still be arriving: don't keep the connection to read the rest.
            response.headers["Connection"] = "close"
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unexpected error")
        return error_response("INTERNAL_ERROR", "the gateway failed to handle this request; nothing was stored "
                              "unless a 202 was given", 500)

    if app.config["OCR_RELAY"]:
        gateway.start_relay()
        atexit.register(gateway.close)
    return app
