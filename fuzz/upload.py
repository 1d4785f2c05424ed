"""Fuzz target: the upload endpoint (`POST /api/v1/uploads`) through Flask's test client, correctly signed.

Each input becomes one request from a registered docking station: the multipart body (its
boundary, part headers, field values, the page's bytes and declared type, extra or duplicated
parts, raw byte flips in the encoded body), the request's Content-Type and Idempotency-Key, and
sometimes a broken signature (stale, wrong, missing, another station). The body is signed after
it is built, so the signature is right unless the input chose to break it.

Invariants (`UploadTarget.check` raises `AssertionError` when one breaks):
- the status is one of 202, 401, 409, 413, 415, 422, 507 (never a 500, nor anything else);
- the body is JSON; an error is `{"code", "message"}`, a 202 is `{"upload_id", "status": "queued", ...}`;
- a non-202 changes nothing: no upload row, no stored file, no `ocr` job, no remembered signature;
- a 202 for a new upload adds exactly its row, its file (holding the bytes its sha256 names) and its
  `ocr` job; a 202 for a retry (same Idempotency-Key, same page) adds no row, file or job.

The gateway is a real one (`create_app`) with its SQLite journal under a temporary var/ (on
/dev/shm when there is one: fsyncs are free there) and a real redis-server on a free port.

Run: `.venv/bin/python fuzz/run.py --target upload --seconds 600`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fuzz._harness import ByteReader, fuzz_main, instrumenting
from fuzz.seeds import seed_images, seed_inkml

with instrumenting(__name__ == "__main__", ["pen_gateway", "werkzeug.formparser", "werkzeug.sansio.multipart",
                                            "werkzeug.http", "werkzeug.datastructures"]):
    from redis import Redis
    from sqlalchemy import func, select

    from pen_gateway.app import create_app, gateway_of
    from pen_gateway.signing import seen_signatures, sign
    from pen_gateway.uploads import get_upload, uploads
    from returns_queue.jobs import ocr_job_id, ocr_queue
    from settings import Settings

DOCUMENTED = {202, 401, 409, 413, 415, 422, 507}
STATION = "station-fuzz"
MAX_UPLOAD_BYTES = 48 * 1024  # small, so that the 413 paths are within a fuzzer's reach

FILE_TYPES = ("image/png", "image/jpeg", "image/tiff", "application/inkml+xml", "application/octet-stream", "",
              "text/plain", "image/png; charset=binary", "multipart/mixed", "image/jpg", "\x7f", "image/png\r\nX: y")
FILENAMES = ('"page"', '"page.png"', '""', '"../../etc/passwd"', '"a\\"b"', "page", '"été.png"',
             "\"x\"; filename*=UTF-8''%C3%A9t%C3%A9", '"a\r\nb"')
PEN_SERIALS = ("PEN-0042", "", " PEN-1 ", "pen:7.a_b", "P" * 64, "P" * 65, "-bad", "é", "PEN 1", "0")
BUREAUX = (None, "750120", "", " 750120 ", "abc", "12345678901", "0", "٣", "1e3")
KEYS = (None, None, "page-1", "page-2", "page-3", "", " ", "k" * 128, "k" * 129, "a b", "\x7f", "é")
REQUEST_TYPES = ("multipart/form-data; boundary={b}", "multipart/form-data; boundary=\"{b}\"",
                 "multipart/form-data", "multipart/form-data; boundary=other", "application/x-www-form-urlencoded",
                 "text/plain", "", "multipart/mixed; boundary={b}", "multipart/form-data; boundary={b}; charset=x",
                 "MULTIPART/FORM-DATA; BOUNDARY={b}")
BOUNDARIES = ("remontee-fuzz", "x", "a" * 70, "a" * 200, "--", "with space", "ü", "b\"q", "")


@dataclass
class Request:
    body: bytes
    headers: dict[str, str]
    page: bytes  # the page as built (the server may parse another one from a mutated body)


def _page(reader: ByteReader) -> bytes:
    images, ink = seed_images(), seed_inkml()
    pages = [images[k] for k in sorted(images)] + [ink[k] for k in sorted(ink)]
    kind = int(reader.mostly(0, range(8)))
    if kind <= 3:
        data = pages[reader.int_in(0, len(pages) - 1)]
    elif kind == 4:
        data = reader.take(reader.int_in(0, 64))
    elif kind == 5:
        data = b""
    elif kind == 6:  # over the limit, or just under it
        data = images["float.tif"] * (MAX_UPLOAD_BYTES // len(images["float.tif"]) + reader.int_in(0, 1))
    else:
        data = pages[reader.int_in(0, len(pages) - 1)]
        data = data[: reader.int_in(0, len(data))]
    if reader.int_in(0, 7) == 7 and data:  # a few flipped bytes in the page itself
        mutable = bytearray(data)
        for _ in range(reader.int_in(1, 4)):
            mutable[reader.int_in(0, len(mutable) - 1)] = reader.byte()
        data = bytes(mutable)
    return data


def request_from_bytes(data: bytes, secret: str, now: int | None = None) -> Request:
    reader = ByteReader(data)
    # Each choice is the well-formed one unless the input says otherwise, so that a good share of
    # requests get through to the deep end (decode, store, journal, enqueue).
    boundary = str(reader.mostly("remontee-fuzz", BOUNDARIES))
    fields: list[tuple[str, str]] = []
    station_field = reader.mostly(STATION, (None, "other-station", f" {STATION} ", STATION * 20))
    if station_field is not None:
        fields.append(("station_id", str(station_field)))
    fields.append(("pen_serial", str(reader.mostly("PEN-0042", PEN_SERIALS))))
    bureau = reader.mostly(None, BUREAUX)
    if bureau is not None:
        fields.append(("bureau", str(bureau)))
    if reader.int_in(0, 7) == 7:
        fields.append((str(reader.pick(("file", "station_id", "other", "", "fi\"le"))), "extra"))
    page = _page(reader)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields]
    file_type = str(reader.mostly("application/octet-stream", FILE_TYPES))
    disposition = f'form-data; name="file"; filename={reader.mostly(FILENAMES[0], FILENAMES)}'
    if reader.int_in(0, 7) == 7:
        disposition = str(reader.pick(("form-data; name=file", "form-data", 'attachment; name="file"',
                                       'form-data; name="file"', 'form-data;name="file";filename="p"')))
    file_headers = f"Content-Disposition: {disposition}\r\n" + (f"Content-Type: {file_type}\r\n" if file_type else "")
    file_part = f"--{boundary}\r\n{file_headers}\r\n".encode() + page + b"\r\n"
    position = reader.int_in(0, len(parts))
    parts.insert(position, file_part)
    if reader.int_in(0, 7) == 7:
        parts.insert(reader.int_in(0, len(parts)), file_part)  # the page twice
    ending = f"--{boundary}--\r\n".encode() if reader.int_in(0, 7) != 7 else reader.pick((b"", b"--", b"\r\n"))
    body = bytearray(b"".join(parts) + ending)  # type: ignore[operator]
    for _ in range(reader.int_in(1, 3) if reader.int_in(0, 3) == 3 else 0):  # raw flips in the envelope
        if body:
            body[reader.int_in(0, len(body) - 1)] = reader.byte()
    body_bytes = bytes(body)

    timestamp = int(time.time()) if now is None else now
    headers = {"Content-Type": str(reader.mostly(REQUEST_TYPES[0], REQUEST_TYPES)).format(b=boundary)}
    key = reader.mostly(None, KEYS)
    if key is not None:
        headers["Idempotency-Key"] = str(key)
    signing = int(reader.mostly(0, range(16)))
    station, stamp, secret_used = STATION, timestamp, secret
    if signing == 1:
        stamp = timestamp - 301  # stale
    elif signing == 2:
        secret_used = "0" * 64  # wrong secret
    elif signing == 3:
        station = "unknown-station"
    signature = sign(secret_used, stamp, hashlib.sha256(body_bytes).hexdigest())
    if signing == 4:
        signature = signature.upper()  # hex digits in capitals: still the same signature
    headers.update({"X-Remontee-Station": station, "X-Remontee-Timestamp": str(stamp),
                    "X-Remontee-Signature": signature})
    if signing == 5:
        del headers["X-Remontee-Signature"]
    elif signing == 6:
        headers["X-Remontee-Timestamp"] = f"{stamp}.0"
    return Request(body_bytes, headers, page)


class _LastError(logging.Handler):
    """Keeps the last exception the app logged, so that a 500 comes with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.last: logging.LogRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record


class UploadTarget:
    """A pen gateway app with one registered station, and the check of one request against it."""

    def __init__(self, var_dir: Path, redis_url: str) -> None:
        settings = Settings(var_dir=var_dir, redis_url=redis_url, max_upload_bytes=MAX_UPLOAD_BYTES)
        self.app = create_app({"SETTINGS": settings, "TESTING": True, "OCR_RELAY": False})
        self.gateway = gateway_of(self.app)
        self.secret = self.gateway.stations.add(STATION)
        self.client = self.app.test_client()
        self.redis: Redis = self.gateway.redis
        self.raw_root = self.gateway.store.root
        self._listing: dict[str, tuple[int, frozenset[str]]] = {}
        self.errors = _LastError()
        logging.getLogger("pen_gateway").addHandler(self.errors)
        self.statuses: dict[int, int] = {}

    def close(self) -> None:
        logging.getLogger("pen_gateway").removeHandler(self.errors)
        self.gateway.close()

    def stored_files(self) -> frozenset[str]:
        """Every file under the raw store; directories whose mtime did not move are not listed again."""
        names: set[str] = set()
        if not self.raw_root.is_dir():
            return frozenset()
        with os.scandir(self.raw_root) as entries:
            for entry in entries:
                mtime = entry.stat().st_mtime_ns
                cached = self._listing.get(entry.name)
                if cached is None or cached[0] != mtime:
                    listed = frozenset(os.listdir(entry.path)) if entry.is_dir() else frozenset({""})
                    cached = self._listing[entry.name] = (mtime, listed)
                names.update(f"{entry.name}/{n}" for n in cached[1])
        return frozenset(names)

    def state(self) -> tuple[int, int, int, frozenset[str]]:
        with self.gateway.journal.read() as conn:
            rows = conn.execute(select(func.count()).select_from(uploads)).scalar_one()
            signatures = conn.execute(select(func.count()).select_from(seen_signatures)).scalar_one()
        return rows, signatures, ocr_queue(self.redis).count, self.stored_files()

    def check(self, request: Request) -> int:
        """Send one request; AssertionError names the invariant that broke. Returns the status."""
        before = self.state()
        self.errors.last = None
        response = self.client.post("/api/v1/uploads", data=request.body, headers=request.headers)
        status = response.status_code
        self.statuses[status] = self.statuses.get(status, 0) + 1
        after = self.state()
        crash = ""
        if self.errors.last is not None and self.errors.last.exc_info:
            crash = "\n" + logging.Formatter().formatException(self.errors.last.exc_info)
        assert status in DOCUMENTED, f"status {status}: {response.get_data()[:300]!r}{crash}"
        assert response.mimetype == "application/json", f"{status} answered {response.mimetype}"
        answer = json.loads(response.get_data())
        if status != 202:
            assert isinstance(answer, dict) and isinstance(answer.get("code"), str) and answer["code"], answer
            assert isinstance(answer.get("message"), str), answer
            assert after == before, f"a {status} {answer['code']} changed the state: {before[:3]} -> {after[:3]}, " \
                                    f"files {sorted(after[3] ^ before[3])}"
            return status
        assert answer.get("status") == "queued" and isinstance(answer.get("upload_id"), str), answer
        upload = get_upload(self.gateway.journal, answer["upload_id"])
        assert upload is not None, f"202 for {answer['upload_id']}, which the journal does not have"
        assert hashlib.sha256(upload.path.read_bytes()).hexdigest() == upload.sha256, "stored bytes differ"
        assert upload.size == upload.path.stat().st_size and upload.station_id == STATION
        job_exists = self.redis.exists(f"rq:job:{ocr_job_id(upload.upload_id)}")
        assert job_exists, f"no ocr job for the accepted upload {upload.upload_id}"
        new_row = after[0] == before[0] + 1
        if new_row:  # a new upload: its row, its job, its signature, and its file unless the bytes were known
            assert after[1] == before[1] + 1 and after[2] == before[2] + 1, (before[:3], after[:3])
            assert after[3] >= before[3] and len(after[3] - before[3]) <= 1, sorted(after[3] ^ before[3])
        else:  # a retry under the same Idempotency-Key: the first answer again, nothing new but its signature
            assert after[0] == before[0] and after[2] == before[2] and after[3] == before[3], (before[:3], after[:3])
            key = request.headers.get("Idempotency-Key", "").strip()
            assert after[1] == before[1] + 1 and upload.idempotency_key == key, (before[:3], after[:3])
        return status


# --- running it under atheris: a private redis-server and var/ for the whole run ---

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_private_target() -> UploadTarget:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    directory = Path(tempfile.mkdtemp(prefix="remontee-fuzz-upload-", dir=base))
    port = _free_port()
    redis_process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--daemonize", "no", "--logfile", str(directory / "redis.log")])

    def stop() -> None:
        redis_process.terminate()
        redis_process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while True:
        try:
            if Redis.from_url(url).ping():
                break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    return UploadTarget(directory / "var", url)


def seed_inputs() -> dict[str, bytes]:
    """Inputs that decode to a well-formed signed upload of several seed pages (for the committed corpus).

    An all-zero input is the well-formed request; its 7th byte picks the page (kind 0)."""
    return {f"valid-{index}": bytes(6) + bytes([index]) + bytes(11) for index in (0, 3, 7, 10, 16, 18)}


_target: UploadTarget | None = None


def test_one_input(data: bytes) -> None:
    global _target
    if _target is None:
        _target = start_private_target()
    _target.check(request_from_bytes(data, _target.secret))
    seen = sum(_target.statuses.values())
    if seen % 10_000 == 0:  # how deep the inputs get: libFuzzer's log shows no statuses of its own
        print(f"statuses after {seen} requests: {dict(sorted(_target.statuses.items()))}", file=sys.stderr)


if __name__ == "__main__":
    logging.getLogger("pen_gateway").setLevel(logging.ERROR)  # 4xx warnings by the thousand
    seed_images()
    fuzz_main(test_one_input, sys.argv)
