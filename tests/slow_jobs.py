"""Jobs that run long enough for a test to kill their worker in the middle of one: a return's consolidation that
waits first (on its first attempt only), and an `ocr` job that only waits. The worker, RQ and Redis are real."""

from __future__ import annotations

import time
from typing import Any

from rq import get_current_job

from returns_queue.consolidation import consolidate
from returns_queue.jobs import RETRY


def consolidate_after_a_wait(ret: dict[str, Any]) -> bool:
    job = get_current_job()
    if job is not None and job.retries_left == RETRY.max:  # the first attempt: the one the test kills
        time.sleep(300)
    return consolidate(ret)


def recognize_after_a_wait(upload_id: str) -> None:
    time.sleep(300)
