"""The OCR relay: makes sure every acknowledged upload gets its `ocr` job, even if Redis was down at the 202.

The upload API enqueues the job itself right after the journal commit. When that fails (Redis
down, the process killed in between), the upload stays `queued` with `ocr_enqueued_at` NULL;
this relay finds such uploads once they are `grace` seconds old, enqueues the missing jobs
(never one that exists: the job id is derived from the upload id) and marks them. An upload a
supervisor sends back to be read again (the review UI assigns the bureau its page did not name)
is `queued` and unmarked again while its first job, ended, still holds the job id: that job is
replaced by a new one. Every so often it also reconciles: an upload still `queued` a minute
after its job was seen on RQ gets its job again if Redis has lost it, holds it as queued in
no queue (`returns_queue.jobs.stranded_jobs`), holds its retry as scheduled long past its time
(RQ's scheduler died, with Redis say, and is started again only every ten minutes), holds it as
started by a worker that died (handed to RQ's retries: `returns_queue.jobs.retry_abandoned`), or holds it
as ended: a job that could not write the upload's row (the journal or Redis away through all its
retries, its work horse killed on its last attempt) has its ended job replaced, so no outage during
the job strands an acknowledged upload. It also marks the uploads whose job the API did enqueue,
in batches, so the API pays no second journal write per upload. It forgets used signatures
once they are too old to be replayed, and removes the temporary files a process killed in the middle
of a write left under var/uploads/ (`storage.remove_stale_temporaries`), at start and every few minutes.

It runs as a thread in every pen gateway process (the app factory starts it when
`OCR_RELAY` is set, which `run_gateway.py pen` does); a Redis lock lets one work at a time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from sqlalchemy import Connection, select
from sqlalchemy.exc import SQLAlchemyError

from pen_gateway.signing import purge_seen_signatures_in
from pen_gateway.storage import ROOM_WAIT_SECONDS, remove_stale_temporaries
from pen_gateway.uploads import fail_queued_in, mark_ocr_enqueued_in, ocr_outbox, queued_among, uploads
from returns_queue.jobs import ocr_job_id, ocr_queue, retry_abandoned, stranded_jobs
from returns_queue.journal import Journal
from returns_queue.relay import RelayLoop

log = logging.getLogger(__name__)
LOCK_NAME = "remontee:ocr-relay:lock"
OCR_JOB = "pen_gateway.recognition.job.recognize_upload"
# The statuses of a job that will not run again, as RQ writes them in the job's hash.
ENDED = frozenset(s.value for s in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED))


# Retried: a work horse killed in the middle of a job (or a worker lost with Redis) leaves it failed or
# abandoned, and what broke it (the journal, Redis, a full disk) is often back minutes later. The retries
# are spread over about eight minutes, so that a short outage does not use them all up in a second (RQ's
# scheduler, which `run_gateway.py worker` runs for the `ocr` queue, enqueues each when due). A retry is
# safe: the job re-reads the upload's status and journals at most one return per upload.
OCR_RETRY = Retry(max=5, interval=[15, 30, 60, 120, 240])
# The work itself (decode, read, journal) takes seconds; RQ's timeout adds that margin to the job's wait
# for room on a full disk, so the wait ends (and the job says why) before RQ kills it.
OCR_WORK_SECONDS = 120
OCR_JOB_TIMEOUT = int(ROOM_WAIT_SECONDS) + OCR_WORK_SECONDS
# How many times reconciliation gives an upload a new job after one ended without writing its row (each
# after all its retries). A page whose work horse dies every time (out of memory) would loop for ever; past
# this, the upload is marked `failed`, which lists it for supervisors, with the reason.
MAX_JOB_REPLACEMENTS = 3
# A retry waits in RQ's scheduled registry until RQ's scheduler enqueues it. That scheduler runs in one
# worker's process, can die with a Redis restart, and is started again only at a worker's maintenance (every
# ten minutes): a retry overdue by this much is enqueued by the reconciliation itself.
RETRY_OVERDUE_SECONDS = 30.0
REPLACED_KEY = "remontee:ocr:replaced:{}"  # how many times, per upload (kept a day)
TEMPORARY_SWEEP_SECONDS = 300.0  # how often var/uploads/ is looked through for temporary files left behind
GAVE_UP = ("la lecture n'a abouti à aucun des {} essais, ni à leurs reprises (le processus meurt-il sur cette "
           "page ?) : à saisir à la main")


def ocr_job_data(queue: Queue, upload_id: str, job_path: str = OCR_JOB) -> object:
    # Keep results a day and failures a week: a supervisor may want to see why a page failed.
    return Queue.prepare_data(
        job_path, args=(upload_id,), job_id=ocr_job_id(upload_id), result_ttl=86400, failure_ttl=7 * 86400,
        timeout=OCR_JOB_TIMEOUT, retry=OCR_RETRY, description=f"recognize upload {upload_id}",
    )


def enqueue_ocr(redis: Redis, upload_id: str, job_path: str = OCR_JOB) -> None:
    """Put the upload's `ocr` job on RQ (raises RedisError when Redis is away)."""
    queue = ocr_queue(redis)
    queue.enqueue_many([ocr_job_data(queue, upload_id, job_path)])


class OcrRelay(RelayLoop):
    name = "ocr relay"
    waiting = "uploads"
    interval = 1.0
    lock_name = LOCK_NAME

    def __init__(self, journal: Journal, redis: Redis, job_path: str = OCR_JOB, *, grace: float = 5.0,
                 batch: int = 500, write: Callable[[Callable[[Connection], Any]], Any] | None = None,
                 max_replacements: int = MAX_JOB_REPLACEMENTS, var_dir: Path | None = None) -> None:
        super().__init__()
        self.journal, self.redis, self.job_path = journal, redis, job_path
        # How to write to the journal: through the gateway's recorder thread when there is one.
        self.write = write or self._write
        self.grace, self.batch, self.max_replacements = grace, batch, max_replacements
        self.queue = ocr_queue(redis)
        self._last_purge = 0.0
        self.var_dir = var_dir  # whose uploads/ to rid of temporary files left behind (None: not this relay's)
        self._last_sweep: float | None = None

    def relay_once(self, now: float | None = None) -> int:
        """Enqueue the missing OCR jobs; the number enqueued. Raises RedisError when Redis is away."""
        with self._lock() as held:
            if not held:
                return 0
            enqueued = 0
            before = (time.time() if now is None else now) - self.grace
            while upload_ids := ocr_outbox(self.journal, before, self.batch):
                statuses = self._job_statuses(upload_ids)
                missing = [u for u, s in zip(upload_ids, statuses, strict=True) if s is None]
                again = self._replace_ended([u for u, s in zip(upload_ids, statuses, strict=True) if s in ENDED])
                if again:
                    log.info("ocr relay: %d upload(s) sent back to be read again", len(again))
                missing += again
                if missing:
                    self.queue.enqueue_many([ocr_job_data(self.queue, u, self.job_path) for u in missing])
                    log.info("ocr relay: enqueued %d upload(s) acknowledged without a job", len(missing))
                self.write(lambda conn, ids=upload_ids: mark_ocr_enqueued_in(conn, ids))
                enqueued += len(missing)
                if len(upload_ids) < self.batch:
                    break
            return enqueued

    def _job_statuses(self, upload_ids: list[str]) -> list[str | None]:
        """The status RQ holds for each upload's job, None where Redis has no such job; one round trip."""
        with self.redis.pipeline() as pipe:
            for upload_id in upload_ids:
                pipe.hget(Job.key_for(ocr_job_id(upload_id)), "status")
            return [s.decode() if isinstance(s, bytes) else s for s in pipe.execute()]

    def _replace_ended(self, upload_ids: list[str]) -> list[str]:
        """Of the uploads whose job has ended, those still `queued`, to be enqueued again; their old job is deleted.

        The rows are read after the jobs' statuses, and a job writes its upload's row before it
        ends: an upload whose first job has just finished is no longer `queued`, and is not read twice.
        """
        again = sorted(queued_among(self.journal, upload_ids))
        for upload_id in again:
            with contextlib.suppress(NoSuchJobError):  # expired meanwhile: nothing to replace
                Job.fetch(ocr_job_id(upload_id), connection=self.redis).delete()
        return again

    def reconcile(self, now: float | None = None, older_than: float = 60.0) -> int:
        """Enqueue again the jobs of uploads still queued long after their job was seen on RQ; the number.

        Redis may have lost the job, or hold it queued in no queue; or the job may have ended without
        writing the upload's row: the journal (or Redis) away through all its retries, its work horse
        killed on its last attempt. Under the relay's lock, as `relay_once`, so that two gateway
        processes never replace the same job at once.
        """
        now = time.time() if now is None else now
        with self._lock() as held:
            return self._reconcile(now - older_than, now) if held else 0

    def _reconcile(self, marked_before: float, now: float) -> int:
        # First, so that the uploads below see those jobs as RQ's retries have them (scheduled, or failed).
        abandoned = retry_abandoned(self.queue)
        if abandoned:
            log.warning("ocr relay: %d job(s) left started by a worker that died: handed to RQ's retries", abandoned)
        with self.journal.read() as conn:
            upload_ids = [r.upload_id for r in conn.execute(
                select(uploads.c.upload_id)
                .where(uploads.c.status == "queued", uploads.c.ocr_enqueued_at < marked_before)
                .order_by(uploads.c.received_at).limit(10 * self.batch))]
        if not upload_ids:
            return abandoned
        statuses = self._job_statuses(upload_ids)
        lost = [u for u, s in zip(upload_ids, statuses, strict=True) if s is None]
        ended = self._replace_ended([u for u, s in zip(upload_ids, statuses, strict=True) if s in ENDED])
        ended = self._unless_given_up(ended)
        if lost or ended:
            self.queue.enqueue_many([ocr_job_data(self.queue, u, self.job_path) for u in lost + ended])
        stranded = stranded_jobs(self.queue, [ocr_job_id(u) for u, s in zip(upload_ids, statuses, strict=True)
                                              if s is not None and s not in ENDED])
        for job in stranded:
            self.queue.enqueue_job(job)
        overdue = self._enqueue_overdue([u for u, s in zip(upload_ids, statuses, strict=True)
                                         if s == JobStatus.SCHEDULED.value], now)
        if lost or ended or stranded or overdue:
            log.warning("ocr relay: %d upload(s) whose job Redis had lost, %d whose job ended with the upload "
                        "still queued, %d whose job was in no queue, %d whose retry was overdue: enqueued again",
                        len(lost), len(ended), len(stranded), overdue)
        return abandoned + len(lost) + len(ended) + len(stranded) + overdue

    def _enqueue_overdue(self, upload_ids: list[str], now: float) -> int:
        """Enqueue the scheduled retries of these uploads that RQ's scheduler left overdue; the number.

        Should the scheduler enqueue one at the same moment, the job runs twice: it reads its upload once."""
        registry = self.queue.scheduled_job_registry
        with self.redis.pipeline() as pipe:
            for upload_id in upload_ids:
                pipe.zscore(registry.key, ocr_job_id(upload_id))
            due = pipe.execute()
        overdue = [ocr_job_id(u) for u, at in zip(upload_ids, due, strict=True)
                   if at is not None and at < now - RETRY_OVERDUE_SECONDS]
        jobs = [job for job in Job.fetch_many(overdue, connection=self.redis) if job is not None]
        for job in jobs:
            registry.remove(job)
            self.queue.enqueue_job(job)
        return len(jobs)

    def _unless_given_up(self, upload_ids: list[str]) -> list[str]:
        """Of the uploads whose job ended with them still `queued`, those to give a new job; the others
        (given one `max_replacements` times already) are marked `failed`, for a supervisor."""
        with self.redis.pipeline() as pipe:
            for upload_id in upload_ids:
                pipe.incr(REPLACED_KEY.format(upload_id))
                pipe.expire(REPLACED_KEY.format(upload_id), 86_400)
            counts = pipe.execute()[::2]
        again = [u for u, n in zip(upload_ids, counts, strict=True) if n <= self.max_replacements]
        given_up = [u for u in upload_ids if u not in again]
        if given_up:
            attempts = (self.max_replacements + 1) * ((OCR_RETRY.max or 0) + 1)
            self.write(lambda conn: fail_queued_in(conn, given_up, GAVE_UP.format(attempts)))
            log.error("ocr relay: %d upload(s) whose every job ended without a word, %d times: marked failed, "
                      "for a supervisor: %s", len(given_up), self.max_replacements + 1, ", ".join(given_up))
        return again

    def _write(self, fn: Callable[[Connection], Any]) -> Any:
        with self.journal.write() as conn:
            return fn(conn)

    def each_pass(self) -> None:
        """Forget used signatures once a minute (they cannot be replayed any more); remove temporary files left
        behind at start and every TEMPORARY_SWEEP_SECONDS."""
        self._sweep_temporaries()
        if time.monotonic() - self._last_purge < 60:
            return
        self._last_purge = time.monotonic()
        try:
            self.write(purge_seen_signatures_in)
        except (SQLAlchemyError, TimeoutError) as exc:
            log.warning("ocr relay: could not purge old signatures: %s", exc)

    def _sweep_temporaries(self) -> None:
        if self.var_dir is None or (self._last_sweep is not None
                                    and time.monotonic() - self._last_sweep < TEMPORARY_SWEEP_SECONDS):
            return
        self._last_sweep = time.monotonic()
        try:
            removed = remove_stale_temporaries(self.var_dir)
        except OSError as exc:
            log.warning("ocr relay: could not look for temporary files left under %s: %s", self.var_dir, exc)
            return
        if removed:
            log.warning("ocr relay: removed %d temporary file(s) left by a process killed in the middle of a write: "
                        "%s", len(removed), ", ".join(str(path) for path in removed))
