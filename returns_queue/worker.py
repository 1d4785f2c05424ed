"""How `run_gateway.py worker`'s RQ workers stop: the work horse dies with its worker, and the worker stops promptly.

RQ's forking worker runs each job in a work horse it forks and moves to a process group of its own
(`os.setpgrp()` in `rq.worker.Worker.fork_work_horse`), so that the worker can kill the horse's group
on a job timeout. The price: neither a signal to the worker's group nor the worker's death reaches
the horse. A horse stuck in a long job (an OCR job waiting minutes for room on a full upload disk)
outlived its worker when the system was stopped, still holding the job and the journal.

Here the horse asks the kernel for SIGKILL the moment its worker dies, however it dies
(PR_SET_PDEATHSIG): a supervisor that stops a worker (SIGTERM, a warm shutdown that waits for the
job, then SIGKILL after its grace) or kills it leaves no horse behind. The job is then abandoned:
once the execution's heartbeat has expired (about 90 s) the relays' reconciliation hands it to RQ's
cleanup (`returns_queue.jobs.retry_abandoned`; RQ's own maintenance comes only every ten minutes),
and the job's Retry runs it again (both job kinds journal at most once: returns_queue/jobs.py).

The same holds for RQ's scheduler process, which a worker forks when it runs with `with_scheduler`
(`run_gateway.py worker` does for the `ocr` queue, whose retries wait minutes: returns_queue/cli.py).
RQ stops it when the worker stops cleanly, but nothing stops it when the worker is killed.

`StopsPromptly`: the worker's warm shutdown, once its job is done, ends in about a second instead of
waiting up to a minute for RQ's pub/sub thread (see its docstring).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from rq import Worker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.scheduler import RQScheduler

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a forked child: get `sig` when the parent dies; exit now if it died before we asked."""
    if not sys.platform.startswith("linux"):
        return
    if ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # The parent may have died between the fork and the prctl: then nothing will ever signal us.
    if os.getppid() != parent_pid:
        os._exit(1)


class SchedulerDiesWithWorker(RQScheduler):
    """RQ's scheduler, whose process is killed by the kernel when the worker that forked it ends."""

    _worker_pid = 0

    def start(self) -> Any:
        self._worker_pid = os.getpid()  # before the fork: the child inherits it
        return super().start()

    def work(self) -> None:
        # Runs in the scheduler's process.
        die_with_parent(self._worker_pid or os.getppid())
        super().work()


class HorseDiesWithWorker(Worker):
    """An RQ forking worker whose work horse (and scheduler) is killed by the kernel when the worker process ends."""

    def main_work_horse(self, job: Any, queue: Any) -> None:
        # Runs in the horse, just after the fork: `self.pid` is still the worker's.
        die_with_parent(self.pid or os.getppid())
        super().main_work_horse(job, queue)

    def _start_scheduler(self, burst: bool = False, logging_level: str | None = "INFO",
                         date_format: str = DEFAULT_LOGGING_DATE_FORMAT,
                         log_format: str = DEFAULT_LOGGING_FORMAT) -> None:
        # RQ's own (rq 3.0, rq/worker/base.py), with our scheduler class: RQ offers no other way to choose it.
        self.scheduler = SchedulerDiesWithWorker(
            self.queues, connection=self.connection,
            logging_level=logging_level if logging_level is not None else self.log.level,
            date_format=date_format, log_format=log_format, serializer=self.serializer,
        )
        self.scheduler.acquire_locks()
        if not self.scheduler.acquired_locks:
            return
        if burst:
            try:
                self.scheduler.register_birth()
                self.scheduler.enqueue_scheduled_jobs()
            finally:
                self.scheduler.release_locks()
                self.scheduler.register_death()
        else:
            self.scheduler.start()


class StopsPromptly(Worker):
    """An RQ worker whose warm shutdown does not wait a minute for its pub/sub thread.

    RQ's `unsubscribe` stops its pub/sub thread with redis-py's `PubSubWorkerThread.stop()`, which
    waits for the thread with no bound; once unsubscribed, that thread sleeps up to RQ's
    `sleep_time` (60 s) waiting to be subscribed again, so a worker told to stop often hung for that
    minute (seen in tests/test_telemetry_worker.py under load). The thread is a daemon and only
    listens for RQ's "kill the horse" commands: wait a second for it, then go.
    """

    def unsubscribe(self) -> None:
        if self.pubsub_thread:
            self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
            self.pubsub.unsubscribe()
            self.pubsub_thread.stop(timeout=1)
            self.pubsub.close()
