"""The RQ contracts with the back office: queue names, job ids, the job's function path and argument."""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue

RETURNS_QUEUE = "returns"
OCR_QUEUE = "ocr"


def return_job_id(return_id: str) -> str:
    """Derived from the return id, so a relay retry finds the job it already made."""
    return f"return-{return_id}"


def ocr_job_id(upload_id: str) -> str:
    return f"ocr-{upload_id}"


def returns_queue(connection: Redis) -> Queue:
    return Queue(RETURNS_QUEUE, connection=connection)


def ocr_queue(connection: Redis) -> Queue:
    return Queue(OCR_QUEUE, connection=connection)


def prepare_return_job(queue: Queue, job_path: str, payload: dict[str, Any]) -> Any:
    # Keep finished jobs a day and failed ones a week: the back office may want to look.
    return Queue.prepare_data(
        job_path,
        args=(payload,),
        job_id=return_job_id(payload["return_id"]),
        result_ttl=86400,
        failure_ttl=7 * 86400,
        description=f"consolidate {payload['election']}/{payload['bureau']} {payload['return_id']}",
    )
