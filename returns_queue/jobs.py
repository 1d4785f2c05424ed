"""The RQ contracts with the back office: queue names, job ids, the job's function path and argument."""

from __future__ import annotations

from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.job import Job

RETURNS_QUEUE = "returns"
OCR_QUEUE = "ocr"


def return_job_id(return_id: str) -> str:
    """Derived from the return id, so a relay retry finds the job it already made."""
    return f"return-{return_id}"


def ocr_job_id(upload_id: str) -> str:
    return f"ocr-{upload_id}"


def jobs_exist(redis: Redis, job_ids: list[str]) -> list[bool]:
    """Whether RQ still holds each job, in one round trip: what a relay checks before enqueueing again."""
    with redis.pipeline() as pipe:
        for job_id in job_ids:
            pipe.exists(Job.key_for(job_id))
        return [bool(e) for e in pipe.execute()]


def returns_queue(connection: Redis) -> Queue:
    return Queue(RETURNS_QUEUE, connection=connection)


def ocr_queue(connection: Redis) -> Queue:
    return Queue(OCR_QUEUE, connection=connection)


# A worker killed in the middle of a job leaves it "abandoned": RQ retries it while retries
# are left (the consolidation is idempotent, so a retry never counts twice).
RETRY = Retry(max=5)
RESULT_TTL = 86400  # keep finished jobs a day: the relay's reconciliation looks them up


def prepare_return_job(queue: Queue, job_path: str, payload: dict[str, Any]) -> Any:
    return Queue.prepare_data(
        job_path,
        args=(payload,),
        job_id=return_job_id(payload["return_id"]),
        timeout=60,
        result_ttl=RESULT_TTL,
        failure_ttl=7 * 86400,
        retry=RETRY,
        description=f"consolidate {payload['election']}/{payload['bureau']} {payload['return_id']}",
    )
