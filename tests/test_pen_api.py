"""The pen upload API over real HTTP with a real Redis: signatures, idempotency, errors, durability across restarts."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pen_helpers import (
    BILLION_LAUGHS,
    EXTERNAL_DTD,
    EXTERNAL_ENTITY,
    Answer,
    LiveServer,
    PenClient,
    bomb_png,
    huge_png_header,
    inkml_page,
    scribbled_page,
    signed_upload,
)
from PIL import Image
from redis import Redis
from rq.job import Job
from sqlalchemy import func, select

from conftest import ROOT
from pen_gateway.app import PenGateway, create_app, gateway_of
from pen_gateway.decode import MAX_INK_POINTS, MAX_INK_TRACES
from pen_gateway.signing import REPLAY_MEMORY, seen_signatures, signature_headers
from pen_gateway.uploads import get_upload, set_upload_status, uploads
from returns_queue.jobs import ocr_job_id, ocr_queue
from returns_queue.journal import audit
from settings import Settings

OCR_JOB = "pen_gateway.recognition.job.recognize_upload"


@dataclass
class Gateway:
    """One running pen gateway: its var/, its app, its HTTP server, a registered station and its client."""

    settings: Settings
    app: Any
    server: LiveServer
    station: str
    secret: str
    client: PenClient

    @property
    def gateway(self) -> Any:
        return gateway_of(self.app)

    def stop(self) -> None:
        self.client.close()
        self.server.stop()
        self.gateway.close()


def start_gateway(var_dir: Path, redis_url: str, *, relay: bool = False, station: str | None = "station-01",
                  secret: str | None = None, **settings: Any) -> Gateway:
    s = Settings(var_dir=var_dir, redis_url=redis_url, **settings)
    app = create_app({"SETTINGS": s, "TESTING": True, "OCR_RELAY": relay, "OCR_RELAY_GRACE": 0.2})
    if station is not None and secret is None:
        secret = gateway_of(app).stations.add(station)
    server = LiveServer(app)
    return Gateway(s, app, server, station or "", secret or "", PenClient(server.url, station or "", secret or ""))


@pytest.fixture
def pen(tmp_path: Path, redis: Redis, redis_server: Any) -> Iterator[Gateway]:
    g = start_gateway(tmp_path / "var", redis_server.url, max_upload_bytes=2 * 1024 * 1024)
    yield g
    g.stop()


@pytest.fixture(scope="module")
def page_png() -> bytes:
    return scribbled_page(1240, 1754, strokes=400, seed=7)


def snapshot(g: Gateway, redis: Redis | None = None) -> dict[str, Any]:
    """Everything an upload could change: rows, remembered signatures, stored files, queued jobs."""
    with g.gateway.journal.read() as conn:
        rows = conn.execute(select(func.count()).select_from(uploads)).scalar_one()
        seen = conn.execute(select(func.count()).select_from(seen_signatures)).scalar_one()
    raw = g.settings.var_dir / "uploads" / "raw"
    files = sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()) if raw.exists() else []
    jobs = ocr_queue(redis).count if redis is not None else None
    return {"rows": rows, "seen": seen, "files": files, "jobs": jobs}


def assert_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.json
    assert isinstance(answer.json, dict) and answer.json["code"] == code, answer.json
    assert answer.json["message"]


# --- the happy path ---

def test_signed_upload_is_stored_journaled_and_enqueued(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    answer = pen.client.upload(page_png, "image/png", pen_serial="PEN-0042", bureau="750120")
    assert answer.status == 202, answer.json
    upload_id = answer.json["upload_id"]
    assert answer.json == {"upload_id": upload_id, "status": "queued", "status_url": f"/api/v1/uploads/{upload_id}"}

    upload = get_upload(pen.gateway.journal, upload_id)
    assert upload is not None and upload.status == "queued"
    assert (upload.station_id, upload.pen_serial, upload.bureau) == ("station-01", "PEN-0042", "750120")
    assert upload.content_type == "image/png" and upload.size == len(page_png)
    # Content-addressed: the path is the SHA-256 of the bytes, and the bytes are exactly what was sent.
    assert upload.path.name == upload.sha256 and upload.path.read_bytes() == page_png
    assert upload.path.is_relative_to((pen.settings.var_dir / "uploads").resolve())

    job = Job.fetch(ocr_job_id(upload_id), connection=redis)
    assert job.func_name == OCR_JOB and job.args == (upload_id,) and job.origin == "ocr"
    assert ocr_queue(redis).job_ids == [ocr_job_id(upload_id)]


def test_inkml_upload_is_accepted(pen: Gateway, redis: Redis) -> None:
    ink = inkml_page([[(10.0, 20.0), (11.0, 21.5), (12.0, 23.0)]], units="mm")
    answer = pen.client.upload(ink, "application/inkml+xml", pen_serial="PEN-7")
    assert answer.status == 202, answer.json
    upload = get_upload(pen.gateway.journal, answer.json["upload_id"])
    assert upload is not None and upload.content_type == "application/inkml+xml" and upload.bureau is None


def test_identical_pages_are_stored_once(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    first = pen.client.upload(page_png, "image/png", pen_serial="PEN-1")
    second = pen.client.upload(page_png, "image/png", pen_serial="PEN-1")
    assert first.status == second.status == 202
    assert first.json["upload_id"] != second.json["upload_id"]  # two uploads (no key), one stored file
    assert len(snapshot(pen)["files"]) == 1


# --- status ---

def test_status_is_for_the_uploading_station_only(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    upload_id = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", bureau="750120").json["upload_id"]
    answer = pen.client.status(upload_id)
    assert answer.status == 200 and answer.json["status"] == "queued" and "receipt" not in answer.json

    with pen.gateway.journal.write() as conn:
        set_upload_status(conn, upload_id, "accepted", return_id="01RETURN", receipt="0000018")
    answer = pen.client.status(upload_id)
    assert answer.json["status"] == "accepted" and answer.json["receipt"] == "0000018"
    assert answer.json["return_id"] == "01RETURN"

    other_secret = pen.gateway.stations.add("station-02")
    other = PenClient(pen.server.url, "station-02", other_secret)
    assert_error(other.status(upload_id), 404, "NOT_FOUND")
    assert_error(pen.client.status("01NOSUCHUPLOAD"), 404, "NOT_FOUND")
    unsigned = pen.client.send("GET", f"/api/v1/uploads/{upload_id}", b"", {})
    assert_error(unsigned, 401, "MISSING_SIGNATURE")


def _png_with_a_broken_stream() -> bytes:
    """A PNG whose every chunk checksum is right (the upload's probe lets it in) but whose pixels do not inflate."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", b"not a zlib stream" * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def test_a_page_that_could_not_be_read_says_why_in_a_code_not_in_the_servers_words(
    pen: Gateway, redis: Redis, page_png: bytes
) -> None:
    from pen_gateway.recognition.job import context, process_upload

    unreadable = pen.client.upload(_png_with_a_broken_stream(), "image/png", pen_serial="PEN-1")
    assert unreadable.status == 202, unreadable.json
    lost = pen.client.upload(page_png, "image/png", pen_serial="PEN-2")
    assert lost.status == 202, lost.json
    lost_upload = get_upload(pen.gateway.journal, lost.json["upload_id"])
    assert lost_upload is not None
    lost_upload.path.unlink()  # the stored bytes gone: the job raises FileNotFoundError, with the path in it

    ctx = context(pen.settings)
    process_upload(unreadable.json["upload_id"], ctx)  # the page does not decode: for a supervisor
    with pytest.raises(FileNotFoundError):
        process_upload(lost.json["upload_id"], ctx)

    for answer, status, code in ((unreadable, "review", "NOT_READ"), (lost, "failed", "RECOGNITION_FAILED")):
        row = get_upload(pen.gateway.journal, answer.json["upload_id"])
        assert row is not None and row.status == status and row.error  # the details stay for the supervisor
        read = pen.client.status(answer.json["upload_id"])
        assert read.status == 200 and read.json["status"] == status, read.json
        assert read.json["error"]["code"] == code and read.json["error"]["message"], read.json
        assert set(read.json["error"]) == {"code", "message"}
        shown = json.dumps(read.json)
        for detail in (row.error, "Errno", "Error", str(pen.settings.var_dir), "broken data stream"):
            assert detail not in shown, (detail, shown)


def test_status_read_signature_cannot_be_replayed(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    upload_id = pen.client.upload(page_png, "image/png", pen_serial="PEN-1").json["upload_id"]
    headers = signature_headers(pen.station, pen.secret, b"")
    assert pen.client.send("GET", f"/api/v1/uploads/{upload_id}", b"", headers).status == 200
    assert_error(pen.client.send("GET", f"/api/v1/uploads/{upload_id}", b"", headers), 401, "REPLAYED_SIGNATURE")


# --- the signature rules: 401 and nothing changes ---

def _tamper(kind: str, g: Gateway, body: bytes, headers: dict[str, str]) -> dict[str, str]:
    headers = dict(headers)
    if kind == "bad-signature":
        sig = headers["X-Remontee-Signature"]
        headers["X-Remontee-Signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    elif kind == "wrong-secret":
        headers.update(signature_headers(g.station, "f" * 64, body))
    elif kind == "unknown-station":
        headers.update(signature_headers("station-99", g.secret, body))
    elif kind in ("stale-past", "stale-future"):
        ts = int(time.time()) + (-301 if kind == "stale-past" else 301)
        headers.update(signature_headers(g.station, g.secret, body, timestamp=ts))
    elif kind == "superscript-timestamp":
        # "¹" is a digit to str.isdigit() but not to int(); a WSGI server hands header bytes over as Latin-1.
        headers["X-Remontee-Timestamp"] = "¹" + headers["X-Remontee-Timestamp"][1:]
    elif kind == "missing":
        del headers["X-Remontee-Signature"]
    elif kind == "body-changed":
        pass  # the caller sends another body under these headers
    return headers


@pytest.mark.parametrize(("kind", "code"), [
    ("bad-signature", "BAD_SIGNATURE"),
    ("wrong-secret", "BAD_SIGNATURE"),
    ("body-changed", "BAD_SIGNATURE"),
    ("unknown-station", "UNKNOWN_STATION"),
    ("stale-past", "STALE_TIMESTAMP"),
    ("stale-future", "STALE_TIMESTAMP"),
    ("superscript-timestamp", "BAD_TIMESTAMP"),
    ("missing", "MISSING_SIGNATURE"),
])
def test_bad_signatures_get_401_and_change_nothing(pen: Gateway, redis: Redis, page_png: bytes, kind: str,
                                                   code: str) -> None:
    before = snapshot(pen, redis)
    body, headers = signed_upload(pen.station, pen.secret, page_png, "image/png", "PEN-1")
    headers = _tamper(kind, pen, body, headers)
    if kind == "body-changed":
        body = body.replace(b"PEN-1", b"PEN-2")
    answer = pen.client.send("POST", "/api/v1/uploads", body, headers)
    assert_error(answer, 401, code)
    assert answer.headers["www-authenticate"].startswith("Remontee-HMAC")
    assert snapshot(pen, redis) == before


def test_a_clock_299_s_off_is_accepted_and_301_s_is_refused_saying_why(pen: Gateway, redis: Redis,
                                                                        page_png: bytes) -> None:
    for offset in (299, -299):
        answer = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", timestamp=int(time.time()) + offset)
        assert answer.status == 202, answer.json
    before = snapshot(pen, redis)
    ahead = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", timestamp=int(time.time()) + 301)
    assert_error(ahead, 401, "STALE_TIMESTAMP")
    # Not "-300 s off" while 300 s is accepted: how far, which way, and what to do.
    assert "301 s ahead of the gateway's clock" in ahead.json["message"], ahead.json
    # A retry of a request signed more than 300 s ago: the station's clock may be right, the signature is old.
    body, headers = signed_upload(pen.station, pen.secret, page_png, "image/png", "PEN-1", idempotency_key="late",
                                  timestamp=int(time.time()) - 320)
    late = pen.client.send("POST", "/api/v1/uploads", body, headers)
    assert_error(late, 401, "STALE_TIMESTAMP")
    assert "s behind the gateway's clock" in late.json["message"], late.json
    assert "sign the request again" in late.json["message"], late.json
    assert snapshot(pen, redis) == before
    retry = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", idempotency_key="late")
    assert retry.status == 202, retry.json


def _stations(var_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "REMONTEE_VAR_DIR": str(var_dir)}
    return subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "stations", *args], env=environ,
                          capture_output=True, text=True, cwd=ROOT)


def test_a_revoked_station_is_refused_and_its_revocation_audited(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    upload_id = pen.client.upload(page_png, "image/png", pen_serial="PEN-1").json["upload_id"]
    other = PenClient(pen.server.url, "station-02", pen.gateway.stations.add("station-02"))

    revoked = _stations(pen.settings.var_dir, "revoke", pen.station)
    assert revoked.returncode == 0, revoked.stderr
    assert pen.station in revoked.stdout
    # A running gateway knows a station's secret for a few seconds (StationRegistry's cache), then refuses it.
    deadline = time.monotonic() + 30
    while (answer := pen.client.status(upload_id)).status == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert_error(answer, 401, "UNKNOWN_STATION")
    before = snapshot(pen, redis)
    assert_error(pen.client.upload(page_png, "image/png", pen_serial="PEN-1"), 401, "UNKNOWN_STATION")
    assert snapshot(pen, redis) == before
    assert other.upload(page_png, "image/png", pen_serial="PEN-2").status == 202  # the other stations go on

    listed = _stations(pen.settings.var_dir, "list")
    assert listed.stdout.split() == ["station-02"]
    with pen.gateway.journal.read() as conn:
        trail = conn.execute(select(audit.c.actor, audit.c.action, audit.c.subject).order_by(audit.c.id)).all()
    assert ("cli", "station_revoke", pen.station) in [tuple(row) for row in trail]

    # Revoking again, or a station never registered: an error, and nothing else changes.
    for station in (pen.station, "station-99"):
        again = _stations(pen.settings.var_dir, "revoke", station)
        assert again.returncode == 1 and station in again.stderr and again.stdout == ""
    with pen.gateway.journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(audit)).scalar_one() == len(trail)


@pytest.mark.parametrize("window", [0, REPLAY_MEMORY // 2 + 1])
def test_a_signature_window_longer_than_replays_are_remembered_is_refused(tmp_path: Path, window: int) -> None:
    """A signature is good for 2 x window (its timestamp may be off either way): used at the start, it must
    still be remembered at the end, or it could be replayed."""
    with pytest.raises(ValueError, match="remembered"):
        PenGateway(Settings(var_dir=tmp_path / "var"), signature_window=window)
    assert not (tmp_path / "var").exists()  # refused before anything was opened


def test_a_replayed_upload_gets_401_and_changes_nothing(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    body, headers = signed_upload(pen.station, pen.secret, page_png, "image/png", "PEN-1")
    assert pen.client.send("POST", "/api/v1/uploads", body, headers).status == 202
    after_first = snapshot(pen, redis)
    assert_error(pen.client.send("POST", "/api/v1/uploads", body, headers), 401, "REPLAYED_SIGNATURE")
    assert snapshot(pen, redis) == after_first


def test_a_replay_that_wrote_the_shared_bytes_leaves_them_to_the_original(pen: Gateway, redis: Redis,
                                                                          page_png: bytes) -> None:
    """Identical bytes share one file: a replay racing its original may be the request that wrote it.

    Reproduced in order: the original is journaled, its file is gone from under it (as when the
    replay's write came first and the original found the file already there), the replay writes
    it again and is refused; refusing it must not remove the bytes the original's row points at."""
    body, headers = signed_upload(pen.station, pen.secret, page_png, "image/png", "PEN-1")
    first = pen.client.send("POST", "/api/v1/uploads", body, headers)
    assert first.status == 202
    with pen.gateway.journal.read() as conn:
        [path] = conn.execute(select(uploads.c.path)).scalars().all()
    Path(path).unlink()
    assert_error(pen.client.send("POST", "/api/v1/uploads", body, headers), 401, "REPLAYED_SIGNATURE")
    assert Path(path).read_bytes() == page_png


def test_a_replay_is_refused_with_redis_down(pen: Gateway, redis: Redis, redis_server: Any, page_png: bytes) -> None:
    body, headers = signed_upload(pen.station, pen.secret, page_png, "image/png", "PEN-1")
    redis_server.stop()
    try:
        first = pen.client.send("POST", "/api/v1/uploads", body, headers)
        assert first.status == 202
        after_first = snapshot(pen)
        assert_error(pen.client.send("POST", "/api/v1/uploads", body, headers), 401, "REPLAYED_SIGNATURE")
        assert snapshot(pen) == after_first
        # Status reads fall back to the journal for their replay memory.
        status_headers = signature_headers(pen.station, pen.secret, b"")
        upload_id = first.json["upload_id"]
        assert pen.client.send("GET", f"/api/v1/uploads/{upload_id}", b"", status_headers).status == 200
        answer = pen.client.send("GET", f"/api/v1/uploads/{upload_id}", b"", status_headers)
        assert_error(answer, 401, "REPLAYED_SIGNATURE")
    finally:
        redis_server.start()


# --- idempotency ---

def test_a_retry_with_the_same_key_gets_the_first_answer(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    first = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", bureau="750120", idempotency_key="page-1")
    after_first = snapshot(pen, redis)
    # A retry is signed afresh (new signature, maybe a new timestamp) under the same key.
    retry = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", bureau="750120", idempotency_key="page-1",
                              timestamp=int(time.time()) + 2)
    assert (retry.status, retry.json) == (first.status, first.json) == (202, first.json)
    after_retry = snapshot(pen, redis)
    assert after_retry["rows"] == after_first["rows"] == 1
    assert after_retry["files"] == after_first["files"] and after_retry["jobs"] == after_first["jobs"] == 1

    # The same key with another page is a client bug: 409, nothing changes.
    other_page = scribbled_page(600, 800, strokes=50, seed=3)
    conflict = pen.client.upload(other_page, "image/png", pen_serial="PEN-1", bureau="750120",
                                 idempotency_key="page-1")
    assert_error(conflict, 409, "IDEMPOTENCY_KEY_REUSED")
    assert snapshot(pen, redis)["rows"] == 1 and snapshot(pen, redis)["files"] == after_first["files"]


def test_idempotency_keys_are_scoped_per_station(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    other = PenClient(pen.server.url, "station-02", pen.gateway.stations.add("station-02"))
    a = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", idempotency_key="page-1")
    b = other.upload(page_png, "image/png", pen_serial="PEN-1", idempotency_key="page-1")
    assert a.status == b.status == 202 and a.json["upload_id"] != b.json["upload_id"]


def test_concurrent_retries_make_one_upload(pen: Gateway, redis: Redis, page_png: bytes) -> None:
    answers: list[Answer] = []
    lock = threading.Lock()

    def send(i: int) -> None:
        client = PenClient(pen.server.url, pen.station, pen.secret)
        answer = client.upload(page_png, "image/png", pen_serial="PEN-1", idempotency_key="same-page",
                               timestamp=int(time.time()) - i)  # distinct signatures
        client.close()
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {a.status for a in answers} == {202}
    assert len({a.json["upload_id"] for a in answers}) == 1
    assert snapshot(pen, redis)["rows"] == 1 and ocr_queue(redis).count == 1


# --- bad input: a clear JSON error, nothing changes ---

def _corrupt(data: bytes) -> bytes:
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]


def _jpeg(data: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


BAD_PAGES = {
    "pdf": (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "application/pdf", 415, "UNSUPPORTED_MEDIA_TYPE"),
    "text-as-png": (b"hello, this is not an image at all", "image/png", 415, "UNSUPPORTED_MEDIA_TYPE"),
    "jpeg-declared-png": ("jpeg", "image/png", 415, "CONTENT_TYPE_MISMATCH"),
    "corrupt-png": ("corrupt-png", "image/png", 422, "CORRUPT_IMAGE"),
    "truncated-png": ("truncated-png", "image/png", 422, "CORRUPT_IMAGE"),
    "truncated-jpeg": ("truncated-jpeg", "image/jpeg", 422, "CORRUPT_IMAGE"),
    "decompression-bomb": ("bomb", "image/png", 422, "IMAGE_TOO_LARGE"),
    "huge-dimensions": ("huge", "image/png", 422, "IMAGE_TOO_LARGE"),
    "billion-laughs": (BILLION_LAUGHS, "application/inkml+xml", 422, "XML_FORBIDDEN"),
    "external-entity": (EXTERNAL_ENTITY, "application/inkml+xml", 422, "XML_FORBIDDEN"),
    "external-dtd": (EXTERNAL_DTD, "application/inkml+xml", 422, "XML_FORBIDDEN"),
    "broken-xml": (b"<?xml version='1.0'?><ink><trace>1 2, 3", "application/inkml+xml", 422, "BAD_INKML"),
    "empty": (b"", "image/png", 422, "EMPTY_FILE"),
    "two-page-tiff": ("two-page-tiff", "image/tiff", 422, "MULTIPLE_PAGES"),
    "too-many-traces": ("too-many-traces", "application/inkml+xml", 422, "INKML_TOO_LARGE"),
    "too-many-points": ("too-many-points", "application/inkml+xml", 422, "INKML_TOO_LARGE"),
}


def _two_page_tiff(page_png: bytes) -> bytes:
    page = Image.open(io.BytesIO(page_png))
    buffer = io.BytesIO()
    flipped = page.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    page.save(buffer, "TIFF", compression="tiff_lzw", save_all=True, append_images=[flipped])
    return buffer.getvalue()


@pytest.mark.parametrize("name", list(BAD_PAGES))
def test_bad_pages_get_a_clear_error_and_change_nothing(pen: Gateway, redis: Redis, page_png: bytes,
                                                        name: str) -> None:
    data, content_type, status, code = BAD_PAGES[name]
    made = {
        "jpeg": lambda: _jpeg(page_png),
        "corrupt-png": lambda: _corrupt(page_png),
        "truncated-png": lambda: page_png[: len(page_png) * 2 // 3],
        "truncated-jpeg": lambda: _jpeg(page_png)[:-2000],
        "bomb": bomb_png,
        "huge": lambda: huge_png_header(200_000, 200_000),
        "two-page-tiff": lambda: _two_page_tiff(page_png),
        "too-many-traces": lambda: inkml_page([[(10.0, 20.0)]] * (MAX_INK_TRACES + 1)),
        "too-many-points": lambda: b"<ink><trace>" + b", ".join([b"10 20"] * (MAX_INK_POINTS + 1)) + b"</trace></ink>",
    }
    if isinstance(data, str):
        data = made[data]()
    before = snapshot(pen, redis)
    answer = pen.client.upload(data, content_type, pen_serial="PEN-1")
    assert_error(answer, status, code)
    assert snapshot(pen, redis) == before


@pytest.mark.parametrize(("change", "code"), [
    ({"station_field": "station-02"}, "STATION_MISMATCH"),
    ({"pen_serial": ""}, "BAD_PEN_SERIAL"),
    ({"bureau": "75-012"}, "BAD_BUREAU"),
    ({"bureau": "\u0667\u0665\u0660\u0661\u0662\u0660"}, "BAD_BUREAU"),  # 750120 in Arabic-Indic digits
    ({"bureau": "\uff17\uff15\uff10\uff11\uff12\uff10"}, "BAD_BUREAU"),  # 750120 in full-width digits
    ({"idempotency_key": "with space"}, "BAD_IDEMPOTENCY_KEY"),
])
def test_bad_fields_get_422_and_change_nothing(pen: Gateway, redis: Redis, page_png: bytes, change: dict[str, str],
                                               code: str) -> None:
    before = snapshot(pen, redis)
    kwargs: dict[str, Any] = {"pen_serial": "PEN-1", **change}
    assert_error(pen.client.upload(page_png, "image/png", **kwargs), 422, code)
    assert snapshot(pen, redis) == before


def test_a_missing_file_part_is_422(pen: Gateway, redis: Redis) -> None:
    body = b"--x\r\nContent-Disposition: form-data; name=\"station_id\"\r\n\r\nstation-01\r\n--x--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=x", **signature_headers(pen.station, pen.secret, body)}
    assert_error(pen.client.send("POST", "/api/v1/uploads", body, headers), 422, "MISSING_FILE")


def test_too_large_an_upload_is_413(pen: Gateway, redis: Redis) -> None:
    before = snapshot(pen, redis)
    big = scribbled_page(2000, 2000, strokes=10, seed=1)
    big = big[:-12] + b"\x00" * (3 * 1024 * 1024) + big[-12:]  # over the 2 MiB limit of this gateway
    assert_error(pen.client.upload(big, "image/png", pen_serial="PEN-1"), 413, "TOO_LARGE")
    assert snapshot(pen, redis) == before


def test_unknown_routes_and_methods_answer_json(pen: Gateway, redis: Redis) -> None:
    assert_error(pen.client.send("GET", "/api/v1/nothing-here", b"", {}), 404, "NOT_FOUND")
    assert_error(pen.client.send("DELETE", "/api/v1/uploads", b"", {}), 405, "METHOD_NOT_ALLOWED")
    index = pen.client.send("GET", "/api/v1/", b"", {})
    assert index.status == 200 and "application/inkml+xml" in index.json["formats"]


# --- durability: Redis down between the 202 and the job; the gateway restarted ---

def test_upload_while_redis_is_down_is_enqueued_when_it_is_back(pen: Gateway, redis_server: Any,
                                                                page_png: bytes) -> None:
    redis_server.stop()
    try:
        answer = pen.client.upload(page_png, "image/png", pen_serial="PEN-1", bureau="750120")
        assert answer.status == 202, answer.json
        upload_id = answer.json["upload_id"]
        assert get_upload(pen.gateway.journal, upload_id) is not None
        assert pen.client.status(upload_id).json["status"] == "queued"  # readable with Redis down
    finally:
        redis_server.start()
    client = redis_server.client()
    assert not client.exists(Job.key_for(ocr_job_id(upload_id)))
    relay = pen.gateway.start_relay()  # the thread `run_gateway.py pen` runs in every worker
    relay.wakeup.set()
    deadline = time.monotonic() + 20
    while not client.exists(Job.key_for(ocr_job_id(upload_id))) and time.monotonic() < deadline:
        time.sleep(0.1)
    job = Job.fetch(ocr_job_id(upload_id), connection=client)
    assert job.func_name == OCR_JOB and job.args == (upload_id,)
    assert ocr_queue(client).job_ids == [ocr_job_id(upload_id)]
    # Relaying again never enqueues twice.
    assert relay.relay_once(now=time.time() + 60) == 0
    assert ocr_queue(client).count == 1


def test_an_ocr_job_lost_or_stranded_at_a_redis_restart_is_enqueued_again(pen: Gateway, redis: Redis,
                                                                          page_png: bytes) -> None:
    from pen_gateway.ocr_relay import OcrRelay

    ids = [pen.client.upload(page_png, "image/png", pen_serial="PEN-1", bureau=bureau).json["upload_id"]
           for bureau in ("750120", "750121", "750122")]
    relay = OcrRelay(pen.gateway.journal, redis, OCR_JOB, grace=0.0)
    relay.relay_once(now=time.time() + 1)  # marks the jobs the API enqueued as seen
    queue = ocr_queue(redis)
    # What a Redis kill can leave: one job gone (lost in the fsync window), one popped by a worker
    # that recorded nothing before Redis died (queued in no queue), one waiting as it should.
    lost, stranded, waiting = (ocr_job_id(u) for u in ids)
    redis.lrem(queue.key, 0, lost)
    redis.delete(Job.key_for(lost))
    redis.lrem(queue.key, 0, stranded)
    redis.hset(Job.key_for(stranded), "enqueued_at", "2011-10-09T20:14:03.000000Z")
    assert relay.reconcile(now=time.time() + 120) == 2
    assert sorted(queue.job_ids) == sorted([lost, stranded, waiting])
    assert relay.reconcile(now=time.time() + 120) == 0


def test_an_upload_survives_a_restart_of_the_gateway_and_of_redis(tmp_path: Path, redis: Redis, redis_server: Any,
                                                                  page_png: bytes) -> None:
    var_dir = tmp_path / "var"
    first = start_gateway(var_dir, redis_server.url)
    redis_server.stop()
    try:
        answer = first.client.upload(page_png, "image/png", pen_serial="PEN-1", idempotency_key="page-9")
        assert answer.status == 202
    finally:
        first.stop()  # the gateway goes away with the job not enqueued
        redis_server.start()
    upload_id = answer.json["upload_id"]
    client = redis_server.client()
    assert not client.exists(Job.key_for(ocr_job_id(upload_id)))

    # A new gateway on the same var/ and journal: same station secret (encrypted under var/), same upload.
    second = start_gateway(var_dir, redis_server.url, relay=True, station=first.station, secret=first.secret)
    try:
        deadline = time.monotonic() + 20
        while not client.exists(Job.key_for(ocr_job_id(upload_id))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert Job.fetch(ocr_job_id(upload_id), connection=client).args == (upload_id,)
        assert second.client.status(upload_id).json["status"] == "queued"
        retry = second.client.upload(page_png, "image/png", pen_serial="PEN-1", idempotency_key="page-9")
        assert (retry.status, retry.json) == (202, answer.json)
        upload = get_upload(second.gateway.journal, upload_id)
        assert upload is not None and upload.path.read_bytes() == page_png
    finally:
        second.stop()
