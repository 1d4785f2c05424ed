"""The run loop both relays share (returns_queue.relay.RelayLoop): the OCR relay's thread, like the returns
relay's (tests/test_journal.py), outlives a journal it cannot read and Redis going away, and relays what was
journaled meanwhile once both are back."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from redis import Redis
from rq import Queue

from pen_gateway.ocr_relay import OcrRelay
from pen_gateway.uploads import Upload, create_tables, get_upload, record_upload
from returns_queue.jobs import OCR_QUEUE, ocr_job_id
from returns_queue.journal import Journal
from returns_queue.relay import Relay, RelayLoop


def _journal_upload(journal: Journal, upload_id: str) -> None:
    with journal.write() as conn:
        record_upload(conn, Upload(upload_id, "0" * 64, Path("/nonexistent"), "image/png", 10, "dock-1", "PEN-1",
                                   "750120", None, "queued", None, None, None, time.time() - 60))


def _wait(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_both_relays_run_the_one_loop() -> None:
    assert issubclass(OcrRelay, RelayLoop) and issubclass(Relay, RelayLoop)
    assert OcrRelay.run is RelayLoop.run and Relay.run is RelayLoop.run


def test_the_ocr_relay_thread_outlives_an_unreadable_journal_and_redis_going_away(
    tmp_path: Path, redis: Redis, redis_server
) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite3'}")
    create_tables(journal)
    relay = OcrRelay(journal, Redis.from_url(redis_server.url, socket_timeout=2), "builtins.str", grace=0.0)
    with journal.write() as conn:
        conn.exec_driver_sql("ALTER TABLE uploads RENAME TO uploads_away")  # every outbox read now fails
    stop = threading.Event()
    thread = relay.start(stop)
    try:
        time.sleep(1.5)
        assert thread.is_alive()
        with journal.write() as conn:
            conn.exec_driver_sql("ALTER TABLE uploads_away RENAME TO uploads")
        redis_server.stop()
        _journal_upload(journal, "01JLOOPUPLOAD0000000000000A")  # acknowledged while Redis is away
        time.sleep(1.5)
        assert thread.is_alive()
        redis_server.start()
        relay.wakeup.set()
        _wait(lambda: ocr_job_id("01JLOOPUPLOAD0000000000000A") in Queue(OCR_QUEUE, connection=redis).job_ids)
        assert get_upload(journal, "01JLOOPUPLOAD0000000000000A").status == "queued"
    finally:
        stop.set()
        relay.wakeup.set()
        thread.join(5)
        journal.dispose()
    assert not thread.is_alive()
