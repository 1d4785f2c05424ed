"""`run_gateway.py pen` for real: gunicorn workers answering signed uploads, refusing huge bodies early,
and their OCR relay threads catching up after Redis comes back."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pen_helpers import PenClient, scribbled_page, signed_upload
from pen_server import RunningPen, running_pen
from redis import Redis
from rq.job import Job

from pen_gateway.signing import signature_headers
from returns_queue.jobs import ocr_job_id

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def gunicorn_pen(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[RunningPen]:
    with running_pen(tmp_path_factory.mktemp("pen-var"), redis_server.url, "dock-17", "--threads", "4",
                     "--ocr-relay-grace", "0.5", env={"REMONTEE_MAX_UPLOAD_BYTES": str(MAX_UPLOAD)}) as pen:
        yield pen


def stored_files(var_dir: Path) -> list[Path]:
    raw = var_dir / "uploads" / "raw"
    return sorted(p for p in raw.rglob("*") if p.is_file()) if raw.exists() else []


def test_gunicorn_answers_a_signed_upload(gunicorn_pen: RunningPen, redis: Redis) -> None:
    client = gunicorn_pen.client()
    page = scribbled_page(1240, 1754, strokes=300, seed=11)
    answer = client.upload(page, "image/png", pen_serial="PEN-17", bureau="750120", idempotency_key="p1")
    assert answer.status == 202, answer.json
    upload_id = answer.json["upload_id"]
    assert Job.fetch(ocr_job_id(upload_id), connection=redis).args == (upload_id,)
    assert client.status(upload_id).json["status"] == "queued"
    retry = client.upload(page, "image/png", pen_serial="PEN-17", bureau="750120", idempotency_key="p1")
    assert (retry.status, retry.json) == (202, answer.json)
    index = client.send("GET", "/api/v1/", b"", {})
    assert index.status == 200 and index.json["max_upload_bytes"] == MAX_UPLOAD


def _raw_request(port: int, head: str, body_chunks: Iterator[bytes], budget: int) -> tuple[bytes, int]:
    """Send `head`, then body chunks until the server answers or closes, or `budget` bytes are sent.

    Returns (what the server answered, how many body bytes it let us send)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode())
        sock.setblocking(False)
        answer = b""
        for chunk in body_chunks:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer or sent >= budget:
                break
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except BlockingIOError:
                time.sleep(0.01)  # the server is not reading: wait for its answer
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer:
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0:
                length = int(next((line.split(b":")[1] for line in answer[:head_end].split(b"\r\n")
                                   if line.lower().startswith(b"content-length:")), b"0"))
                while len(answer) < head_end + 4 + length:
                    more = sock.recv(65536)
                    if not more:
                        break
                    answer += more
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


def _endless(chunk: bytes) -> Iterator[bytes]:
    while True:
        yield chunk


def _head(pen: RunningPen, extra: str, station: str | None = None) -> str:
    headers = signature_headers(station or pen.station, pen.secret, b"not the body")
    lines = ["POST /api/v1/uploads HTTP/1.1", f"Host: 127.0.0.1:{pen.port}",
             "Content-Type: multipart/form-data; boundary=x", *(f"{k}: {v}" for k, v in headers.items()), extra]
    return "\r\n".join(lines) + "\r\n\r\n"


def test_a_10_gb_upload_is_refused_before_its_body_is_read(gunicorn_pen: RunningPen, redis: Redis) -> None:
    before = stored_files(gunicorn_pen.var_dir)
    budget = 200 * 1024 * 1024
    answer, sent = _raw_request(gunicorn_pen.port, _head(gunicorn_pen, f"Content-Length: {10 * 1024**3}"),
                                _endless(b"\0" * 65536), budget)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"code":"TOO_LARGE"' in answer.replace(b" ", b"")
    assert sent < budget  # it answered (and stopped reading) long before 200 MB, let alone 10 GB
    assert stored_files(gunicorn_pen.var_dir) == before


def test_an_endless_chunked_upload_is_cut_at_the_limit(gunicorn_pen: RunningPen, redis: Redis) -> None:
    before = stored_files(gunicorn_pen.var_dir)
    budget = 200 * 1024 * 1024
    chunk = b"10000\r\n" + b"\0" * 0x10000 + b"\r\n"
    answer, sent = _raw_request(gunicorn_pen.port, _head(gunicorn_pen, "Transfer-Encoding: chunked"),
                                _endless(chunk), budget)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < budget
    assert stored_files(gunicorn_pen.var_dir) == before


def test_an_unknown_station_is_refused_before_its_body_is_read(gunicorn_pen: RunningPen, redis: Redis) -> None:
    answer, _ = _raw_request(gunicorn_pen.port,
                             _head(gunicorn_pen, f"Content-Length: {10 * 1024**3}", station="dock-99"),
                                _endless(b"\0" * 65536), 200 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"UNKNOWN_STATION" in answer


def test_the_workers_relay_catches_up_after_redis_is_back(gunicorn_pen: RunningPen, redis: Redis,
                                                          redis_server: Any) -> None:
    client = gunicorn_pen.client()
    page = scribbled_page(800, 1000, strokes=100, seed=12)
    redis_server.stop()
    try:
        answer = client.upload(page, "image/png", pen_serial="PEN-17")
        assert answer.status == 202, answer.json
    finally:
        redis_server.start()
    upload_id = answer.json["upload_id"]
    fresh = redis_server.client()
    deadline = time.monotonic() + 30
    while not fresh.exists(Job.key_for(ocr_job_id(upload_id))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert Job.fetch(ocr_job_id(upload_id), connection=fresh).args == (upload_id,)


def test_a_malformed_chunked_body_is_a_clear_400(gunicorn_pen: RunningPen, redis: Redis) -> None:
    before = stored_files(gunicorn_pen.var_dir)
    head = _head(gunicorn_pen, "Transfer-Encoding: chunked")
    answer, _ = _raw_request(gunicorn_pen.port, head, iter([b"zz\r\nnot hex\r\n0\r\n\r\n"]), 1024)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"BAD_REQUEST"' in answer.replace(b" ", b"")
    assert b"chunked" in answer
    assert stored_files(gunicorn_pen.var_dir) == before
    assert not [line for line in gunicorn_pen.log_lines() if line.get("msg") == "unexpected error"]


def test_stations_whose_link_died_mid_body_do_not_hold_the_gateway(tmp_path: Path, redis_server: Any,
                                                                   redis: Redis) -> None:
    # As many stalled uploads as the worker has threads: a link that dies sends no FIN, so the gateway waits.
    with running_pen(tmp_path, redis_server.url, "dock-18", "--threads", "2", "--body-timeout", "1",
                     workers=1) as pen:
        page = scribbled_page(800, 1000, strokes=100, seed=13)
        body, headers = signed_upload(pen.station, pen.secret, page, "image/png", "PEN-18")
        head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Length": str(len(body))}.items())
        stalled = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", pen.port), timeout=30)
            sock.sendall(f"POST /api/v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + body[:1000])
            stalled.append(sock)
        try:
            client = PenClient(pen.url, pen.station, pen.secret, timeout=30)
            answer = client.upload(page, "image/png", pen_serial="PEN-18", idempotency_key="other-station")
            assert answer.status == 202, answer.json
            for sock in stalled:
                reply = b""
                while chunk := sock.recv(65536):
                    reply += chunk
                assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
                assert b'"code":"BODY_TIMEOUT"' in reply.replace(b" ", b"")
        finally:
            for sock in stalled:
                sock.close()
        assert [p.name for p in stored_files(pen.var_dir)] == [hashlib.sha256(page).hexdigest()]
        assert not [line for line in pen.log_lines() if line.get("msg") == "unexpected error"]


@pytest.mark.parametrize("chunked", [False, True], ids=["short-of-its-content-length", "cut-in-its-chunk"])
def test_a_body_cut_short_is_refused_as_incomplete(gunicorn_pen: RunningPen, redis: Redis, chunked: bool) -> None:
    """A station that stops sending before its body's end: 100 bytes short of its Content-Length, or (chunked)
    half-way through the one chunk it announced. Nothing is stored, and the station is told why."""
    before = stored_files(gunicorn_pen.var_dir)
    page = scribbled_page(800, 1000, strokes=100, seed=14)
    body, headers = signed_upload(gunicorn_pen.station, gunicorn_pen.secret, page, "image/png", "PEN-17")
    if chunked:
        headers = {**headers, "Transfer-Encoding": "chunked"}
        sent = f"{len(body):x}\r\n".encode() + body[: len(body) // 2]
    else:
        headers, sent = {**headers, "Content-Length": str(len(body) + 100)}, body
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", gunicorn_pen.port), timeout=30) as sock:
        sock.sendall(f"POST /api/v1/uploads HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode() + sent)
        sock.shutdown(socket.SHUT_WR)  # the station sends no more
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:300]
    assert b'"code":"INCOMPLETE_BODY"' in reply.replace(b" ", b"")
    assert stored_files(gunicorn_pen.var_dir) == before
