"""The RQ contracts with the back office: queue names, job ids, the job's function path and argument."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.job import Job, JobStatus

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


# A job is not stranded before this many seconds: a worker sets its status a few milliseconds after popping it.
STRANDED_AFTER = 30.0


def stranded_jobs(queue: Queue, job_ids: Sequence[str], older_than: float = STRANDED_AFTER) -> list[Job]:
    """Jobs Redis holds as `queued` that are in no queue: lost between a worker's pop and its start.

    RQ pops a job off its queue, then records it as started in a second step; when Redis (or the
    worker) dies in between, the job stays `queued` in no queue and no registry, and no worker
    will ever see it again. Seen in the election-night simulation with Redis killed mid-run.
    A job popped at the very moment of the check may be taken for stranded and run twice: the
    jobs are idempotent (the consolidation counts a return once, the OCR makes one return an upload).
    """
    candidates = _queued(queue.connection, job_ids)
    if not candidates:
        return []
    in_queue = set(queue.get_job_ids())
    now = datetime.now(UTC)
    stranded = []
    for job in Job.fetch_many([j for j in candidates if j not in in_queue], connection=queue.connection):
        if job is None:
            continue
        enqueued = job.enqueued_at or now
        if enqueued.tzinfo is None:
            enqueued = enqueued.replace(tzinfo=UTC)
        if (now - enqueued).total_seconds() >= older_than:
            stranded.append(job)
    # Checked again now that the queue was read: one a worker has started since is not stranded.
    still = set(_queued(queue.connection, [job.id for job in stranded]))
    return [job for job in stranded if job.id in still]


def retry_abandoned(queue: Queue) -> int:
    """Hand the jobs whose worker died in the middle of them back to RQ's retries; how many had expired.

    A worker killed during a job (SIGKILL, the OOM killer, a power cut) takes its work horse with it
    (returns_queue/worker.py) and leaves the job `started`. RQ retries such a job (or fails it, its retries
    spent) once its execution's heartbeat has expired, about 90 s later, but only at a worker's maintenance,
    every ten minutes; the worker restarted in its place runs its own at start, before the expiry. Meanwhile
    a return with a receipt is not counted and an upload with its 202 stays `queued`. RQ's own cleanup, so
    a job is retried or failed exactly as RQ would have done it.
    """
    registry = queue.started_job_registry
    expired = registry.get_expired_job_ids()
    if expired:
        registry.cleanup()
    return len(expired)


def _queued(connection: Redis, job_ids: Sequence[str]) -> list[str]:
    with connection.pipeline() as pipe:
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
        statuses = pipe.execute()
    return [job_id for job_id, status in zip(job_ids, statuses, strict=True)
            if status is not None and status.decode() == JobStatus.QUEUED.value]
