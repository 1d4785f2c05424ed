"""The RQ worker, measured: job durations and outcomes, OCR time and upload statuses, the job's ids on its log lines.

`MeasuredJob.perform` runs in the work horse around the job's function only (not RQ's
bookkeeping): it binds the job's ids for the log (`upload_id` for an `ocr` job, `return_id` and
`bureau` for a `returns` job) and observes `remontee_rq_job_seconds`; for an `ocr` job also
`remontee_ocr_seconds` by the status the upload reached and `remontee_uploads_total` for that
status when the upload entered it (not when an earlier job had, nor `failed` while a retry
remains). `MeasuredWorker` binds the same ids in the worker around the job (so RQ's own lines
about it carry them too) and, after each job and once more as it stops, folds the finished horses'
metric files into the archive (telemetry.multiprocess): a stop requested just as a job ended can
cut the fold after that job short.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq import Worker
from rq.job import Job

from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE
from telemetry import logs, metrics, multiprocess

log = logging.getLogger(__name__)


def job_fields(job: Job) -> dict[str, str | None]:
    """The log ids of a job, from its queue and its argument (DESIGN.md: an upload id, or a return dict)."""
    fields: dict[str, str | None] = {"job_id": job.id}
    try:
        argument = job.args[0] if job.args else None
    except Exception:  # an argument that cannot be unpickled: RQ says so itself
        argument = None
    if job.origin == OCR_QUEUE and isinstance(argument, str):
        fields["upload_id"] = argument
    elif job.origin == RETURNS_QUEUE and isinstance(argument, dict):
        fields["return_id"] = argument.get("return_id")
        fields["bureau"] = argument.get("bureau")
    return fields


class MeasuredJob(Job):
    def perform(self) -> Any:
        started = time.perf_counter()
        outcome, status = "failed", "failed"
        with logs.bound(**job_fields(self)):
            # An upload enters a status once: not again when a job finds it already recognized (a job run twice,
            # the OCR relay's reconciliation), and not `failed` while RQ will try again (it stays queued).
            entered = True
            try:
                result = super().perform()
                outcome = "ok"
                if isinstance(result, dict) and isinstance(result.get("status"), str):
                    status = result["status"]
                    entered = result.get("changed") is not False
                return result
            except BaseException:
                entered = not self.retries_left
                raise
            finally:
                seconds = time.perf_counter() - started
                metrics.JOB_SECONDS.labels(self.origin, outcome).observe(seconds)
                if self.origin == OCR_QUEUE:
                    metrics.OCR_SECONDS.labels(status).observe(seconds)
                    if entered:
                        metrics.UPLOADS.labels(status).inc()


class MeasuredWorker(Worker):
    job_class = MeasuredJob

    def execute_job(self, job: Job, queue: Any) -> None:
        with logs.bound(**job_fields(job)):
            try:
                super().execute_job(job, queue)
            finally:
                self.fold_finished_horses()

    def teardown(self) -> None:
        super().teardown()
        if not self.is_horse:
            self.fold_finished_horses()

    def fold_finished_horses(self) -> None:
        directory = multiprocess.enabled()
        if directory is not None:
            try:
                multiprocess.absorb_dead_processes(directory)
            except OSError as exc:  # metrics must never stop the work
                log.warning("metrics: could not fold the finished horses' files: %s", exc)
