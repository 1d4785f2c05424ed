"""The pen gateway's operations: `/metrics` of a real gunicorn (two workers, multiprocess mode) after real signed
uploads, the scrape-time state checked against the real journal and Redis, and the upload id on its log lines."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pen_helpers import LiveServer, PenClient, scribbled_page
from pen_server import RunningPen, running_pen
from redis import Redis
from rq import Queue
from telemetry_helpers import fields_of, scrape, value

from conftest import free_port
from pen_gateway.app import create_app, gateway_of
from pen_gateway.uploads import ocr_backlog
from returns_queue.journal import Journal
from settings import Settings
from telemetry import logs


@pytest.fixture(scope="module")
def gunicorn_pen(tmp_path_factory: pytest.TempPathFactory, redis_server: Any) -> Iterator[RunningPen]:
    with running_pen(tmp_path_factory.mktemp("pen-metrics"), redis_server.url, "dock-metrics", "--threads", "4",
                     "--access-log", env={"REMONTEE_LOG_FORMAT": "json"}) as pen:
        yield pen


def _upload_in_parallel(pen: RunningPen, count: int, first_seed: int) -> list[str]:
    """`count` uploads at once, each on its own connection: the two workers share them."""
    ids: list[str] = []
    lock = threading.Lock()

    def one(seed: int) -> None:
        client = pen.client()
        answer = client.upload(scribbled_page(620, 877, strokes=60, seed=seed), "image/png", pen_serial="PEN-9",
                               bureau="750120")
        client.close()
        assert answer.status == 202, answer.json
        with lock:
            ids.append(answer.json["upload_id"])

    threads = [threading.Thread(target=one, args=(first_seed + i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == count
    return ids


def test_metrics_of_every_worker_in_one_scrape(gunicorn_pen: RunningPen, redis: Redis) -> None:
    pen = gunicorn_pen
    journal = Journal(f"sqlite:///{(pen.var_dir / 'journal.sqlite3').resolve()}")
    uploaded: list[str] = []
    # Until both workers have answered uploads (the access lines say which pid did): the counts of
    # one scrape, served by either worker, must then be everyone's.
    while len(uploaded) < 48:
        uploaded += _upload_in_parallel(pen, 8, len(uploaded))
        served_by = {line["pid"] for line in pen.log_lines()
                     if line["logger"] == "gunicorn.access" and "POST /api/v1/uploads" in line["msg"]}
        if len(served_by) >= 2:
            break
    assert len(served_by) == 2, "the uploads all went to one worker"
    n = len(uploaded)

    deadline = time.monotonic() + 10
    while ocr_backlog(journal) and time.monotonic() < deadline:  # the workers' OCR relays mark what they enqueued
        time.sleep(0.1)
    for _ in range(6):  # fresh connections: either worker answers the scrape
        samples = scrape(pen.url + "/metrics")
        assert value(samples, "remontee_uploads_total", status="queued") == n
        assert value(samples, "remontee_http_request_seconds_count", service="pen", endpoint="api.create_upload",
                     code="202") == n
        assert value(samples, "remontee_http_request_seconds_bucket", service="pen", endpoint="api.create_upload",
                     code="202", le="+Inf") == n
        # Read at scrape time from the real journal and Redis (no RQ worker runs: the jobs wait).
        assert value(samples, "remontee_uploads_in_status", default=None, status="queued") == n
        assert value(samples, "remontee_rq_queued_jobs", default=None, queue="ocr") == Queue(
            "ocr", connection=redis).count == n
        assert value(samples, "remontee_ocr_outbox_backlog", default=None) == ocr_backlog(journal) == 0
        assert value(samples, "remontee_http_requests_in_progress", default=None, service="pen") == 1  # this scrape
    # The access line of each upload carries its upload id, though gunicorn writes it after the app returned.
    posted = [line for line in pen.log_lines()
              if line["logger"] == "gunicorn.access" and "POST /api/v1/uploads" in line["msg"]]
    assert sorted(line.get("upload_id") for line in posted) == sorted(uploaded)
    assert all(line["part"] == "pen" for line in pen.log_lines())
    journal.dispose()


def test_a_dead_workers_counts_stay_and_its_live_gauges_go(gunicorn_pen: RunningPen) -> None:
    pen = gunicorn_pen
    before = value(scrape(pen.url + "/metrics"), "remontee_uploads_total", status="queued")
    victim = min(pen.workers())
    directory = pen.var_dir / "metrics" / "pen"
    assert (directory / f"gauge_livesum_{victim}.db").exists()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (victim in pen.workers() or len(pen.workers()) < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim not in pen.workers() and len(pen.workers()) == 2  # gunicorn started another
    while (directory / f"gauge_livesum_{victim}.db").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (directory / f"gauge_livesum_{victim}.db").exists()  # child_exit: mark_process_dead
    samples = scrape(pen.url + "/metrics")
    assert value(samples, "remontee_uploads_total", status="queued") == before
    assert value(samples, "remontee_http_requests_in_progress", default=None, service="pen") == 1


def test_log_lines_of_an_upload_carry_its_id(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Redis unreachable: the API journals the upload and says so, in a line that names the upload."""
    closed = free_port()
    settings = Settings(var_dir=tmp_path / "var", redis_url=f"redis://127.0.0.1:{closed}/0")
    app = create_app({"SETTINGS": settings, "TESTING": True})
    secret = gateway_of(app).stations.add("dock-logs")
    server = LiveServer(app)
    caplog.handler.addFilter(logs.ContextFilter("pen"))
    caplog.set_level(logging.INFO)
    try:
        client = PenClient(server.url, "dock-logs", secret)
        answer = client.upload(scribbled_page(620, 877, strokes=40, seed=3), "image/png", pen_serial="PEN-1")
        assert answer.status == 202, answer.json
        upload_id = answer.json["upload_id"]
        ours = [r for r in caplog.records if r.name.startswith("pen_gateway")]
        assert any("Redis unavailable" in r.getMessage() for r in ours)
        assert fields_of(ours, "upload_id") == [upload_id] * len(ours)
        # The request's context ends with it: the server thread's next request starts without the id.
        assert client.send("GET", "/api/v1/", b"", {}).status == 200
        client.close()
    finally:
        server.stop()
        gateway_of(app).close()
