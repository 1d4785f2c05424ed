"""The review UI's `/metrics`: no login asked (Prometheus scrapes it), counts only, the state read from the real
journal and Redis at scrape time, supervisors' decisions counted, and the return's id on a decision's log lines."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import request
from redis import Redis
from review_support import GOOD_T1, ReviewEnv, build_env, bureau_codes, item_id_for, login, submit
from rq import Queue
from telemetry_helpers import Samples, fields_of, parse, value

from conftest import free_port
from forms import Election
from pen_gateway.uploads import Upload, create_tables, record_upload
from registry import Registry
from returns_queue.journal import Journal
from telemetry import logs


@pytest.fixture
def renv(tmp_path: Path, redis: Redis, redis_server: Any, demo_registry_files: tuple[Path, Path],
         registry: Registry, election_t1: Election) -> Iterator[ReviewEnv]:
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    yield build_env(tmp_path, journal, redis, demo_registry_files[0], registry, election_t1, redis_server.url)
    journal.dispose()


def _upload(journal: Journal, upload_id: str, status: str) -> None:
    with journal.write() as conn:
        record_upload(conn, Upload(upload_id, "0" * 64, Path("/nowhere"), "image/png", 10, "station-1", "PEN-1",
                                   None, None, status, None, None, None, time.time()))


def _metrics(client: Any) -> tuple[Samples, str]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    body = response.get_data(as_text=True)
    return parse(body), body


def test_metrics_need_no_login_and_hold_counts_only(renv: ReviewEnv, redis: Redis) -> None:
    codes = bureau_codes(renv.registry)
    by_phone = submit(renv.journal, renv.election, renv.registry, codes[0], {**GOOD_T1, "votants": 251})
    by_pen = submit(renv.journal, renv.election, renv.registry, codes[1], {**GOOD_T1, "aubry": 61}, "pen",
                    source={"upload_id": "01JMETRICSPENUPLOAD000000", "station_id": "station-1"})
    accepted = [submit(renv.journal, renv.election, renv.registry, c, GOOD_T1) for c in codes[2:5]]
    assert (by_phone.status, by_pen.status, {a.status for a in accepted}) == ("review", "review", {"accepted"})
    create_tables(renv.journal)
    for i, status in enumerate(["queued", "queued", "review"]):
        _upload(renv.journal, f"01JMETRICSUPLOAD{i:09d}", status)
    for _ in range(2):
        Queue("ocr", connection=redis).enqueue("os.getcwd")
    Queue("returns", connection=redis).enqueue("os.getcwd")

    client = renv.client()
    samples, body = _metrics(client)
    assert value(samples, "remontee_review_items_open", default=None) == 2
    assert value(samples, "remontee_returns_outbox_backlog", default=None) == renv.journal.outbox_backlog() == 3
    assert value(samples, "remontee_uploads_in_status", default=None, status="queued") == 2
    assert value(samples, "remontee_uploads_in_status", default=None, status="review") == 1
    assert value(samples, "remontee_uploads_in_status", default=None, status="accepted") == 0
    assert value(samples, "remontee_rq_queued_jobs", default=None, queue="ocr") == 2
    assert value(samples, "remontee_rq_queued_jobs", default=None, queue="returns") == 1
    assert value(samples, "remontee_rq_failed_jobs", default=None, queue="ocr") == 0
    assert value(samples, "remontee_state_up", default=None, source="redis") == 1
    # Nothing a scraper should not know: no bureau, receipt, return, upload, account or election.
    for secret in [*codes[:5], by_phone.receipt, by_phone.return_id, "01JMETRICSPENUPLOAD", "alice",
                   renv.election.id, str(renv.settings.var_dir)]:
        # A number (a bureau code, a receipt) as a number of its own: 010101 may well be digits of a duration.
        pattern = rf"(?<![\d.]){secret}(?!\d)" if secret.isdigit() else re.escape(secret)
        assert not re.search(pattern, body), secret
    assert client.get("/items").status_code == 302  # every other page still asks for a login

    token = login(client, "alice")
    item = item_id_for(renv.journal, by_pen.return_id)
    response = client.post(f"/items/{item}/reject", data={"csrf_token": token, "reason": "PV illisible"})
    assert response.status_code == 303
    after, _ = _metrics(client)
    assert value(after, "remontee_review_decisions_total", decision="reject") == value(
        samples, "remontee_review_decisions_total", decision="reject") + 1
    assert value(after, "remontee_uploads_total", status="rejected") == value(
        samples, "remontee_uploads_total", status="rejected") + 1
    assert value(after, "remontee_review_items_open", default=None) == 1
    assert value(after, "remontee_http_request_seconds_count", service="review", endpoint="items.reject",
                 code="303") >= 1


def test_a_decisions_log_lines_carry_the_return_and_upload(renv: ReviewEnv, caplog: pytest.LogCaptureFixture) -> None:
    codes = bureau_codes(renv.registry)
    by_pen = submit(renv.journal, renv.election, renv.registry, codes[7], {**GOOD_T1, "aubry": 61}, "pen",
                    source={"upload_id": "01JLOGSPENUPLOAD000000000", "station_id": "station-1"})
    app = renv.app

    @app.after_request
    def _say(response: Any) -> Any:  # a line logged by the request's code, after it looked the item up
        logging.getLogger("review.items").info("answered %s %s", request.path, response.status_code)
        return response

    client = renv.client()
    token = login(client, "alice")
    item = item_id_for(renv.journal, by_pen.return_id)
    caplog.handler.addFilter(logs.ContextFilter("review"))
    caplog.set_level(logging.INFO)
    # The login's lines too were captured if an earlier test left the root logger at INFO (run_gateway.main
    # configures logging in process, as tests/test_paper.py calls it): only the decision's lines are looked at.
    caplog.clear()
    assert client.post(f"/items/{item}/reject", data={"csrf_token": token, "reason": "PV illisible"}).status_code == 303
    lines = [r for r in caplog.records if r.name == "review.items"]
    assert [r.getMessage() for r in lines] == [f"answered /items/{item}/reject 303"]
    assert fields_of(lines, "return_id") == [by_pen.return_id]
    assert fields_of(lines, "upload_id") == ["01JLOGSPENUPLOAD000000000"]
    assert fields_of(lines, "bureau") == [codes[7]]


def test_metrics_answer_while_redis_is_away(tmp_path: Path, redis: Redis, demo_registry_files: tuple[Path, Path],
                                             registry: Registry, election_t1: Election) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    away = build_env(tmp_path, journal, redis, demo_registry_files[0], registry, election_t1,
                     f"redis://127.0.0.1:{free_port()}/0")
    submit(journal, election_t1, registry, bureau_codes(registry)[0], GOOD_T1)
    samples, _ = _metrics(away.client())
    assert value(samples, "remontee_state_up", default=None, source="redis") == 0
    assert value(samples, "remontee_state_up", default=None, source="journal") == 1
    assert value(samples, "remontee_returns_outbox_backlog", default=None) == 1
    assert ("remontee_rq_queued_jobs", frozenset({("queue", "ocr")})) not in samples
    journal.dispose()
