"""The relay: moves accepted returns from the journal's outbox onto the RQ `returns` queue.

Several relays may run (one per IVR or worker process, on several machines): a Redis lock
lets one work at a time, and a job that already exists is never enqueued again.

Redis acknowledges an enqueue before its append-only file reaches the disk (appendfsync
everysec), so a Redis crash can lose the last second of jobs after the relay has marked them.
The relay therefore reconciles: every so often it looks up the jobs of the returns it relayed
within the last hour, and enqueues again any that Redis no longer has, or holds as queued in no
queue (popped by a worker just as Redis died: see `returns_queue.jobs.stranded_jobs`), and hands
to RQ's retries the jobs left started by a worker that died (`returns_queue.jobs.retry_abandoned`). It also
enqueues again, under the configured function path, the return jobs that failed under another one
(a REMONTEE_CONSOLIDATE_JOB that did not import, since fixed).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq.job import Job
from sqlalchemy.exc import SQLAlchemyError

from returns_queue.jobs import (
    jobs_exist,
    prepare_return_job,
    retry_abandoned,
    return_job_id,
    returns_queue,
    stranded_jobs,
)
from returns_queue.journal import Journal

log = logging.getLogger(__name__)
LOCK_NAME = "remontee:relay:lock"


class RelayLoop:
    """The run loop of a relay from a journal outbox to RQ: this one and the pen gateway's OCR relay.

    Each pass relays once (under the relay's Redis lock), reconciles every `reconcile_every`
    seconds, then sleeps until `interval` has passed or `wakeup` is set. Neither Redis going away
    nor a journal briefly locked or unreachable ends the loop: what is journaled stays there until
    a later pass relays it. A subclass says what it relays and may do more on each pass.
    """

    name = "relay"  # the log lines' prefix and the thread's name
    waiting = "returns"  # what stays journaled while Redis is away, for the log
    interval = 0.25  # seconds between passes
    interval_redis_down = 1.0
    lock_name = LOCK_NAME  # one relay of a kind works at a time, whichever process it runs in
    redis: Redis

    def __init__(self) -> None:
        self.wakeup = threading.Event()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[bool]:
        """The Redis lock of this kind of relay, if no other relay holds it: whether this one does."""
        lock = self.redis.lock(self.lock_name, timeout=30, blocking=False)
        if not lock.acquire():
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(RedisError):  # the lock expires by itself
                lock.release()

    def relay_once(self) -> int:
        raise NotImplementedError

    def reconcile(self) -> int:
        raise NotImplementedError

    def each_pass(self) -> None:
        """Work a subclass does on every pass besides relaying; must not raise."""

    def run(self, stop: threading.Event, interval: float | None = None, reconcile_every: float = 30.0) -> None:
        """Relay until `stop` is set; wakes early when `wakeup` is set after a submission."""
        interval = self.interval if interval is None else interval
        log = logging.getLogger(type(self).__module__)  # the lines name the relay's own module
        redis_down = False
        next_reconcile = time.monotonic() + reconcile_every
        while not stop.is_set():
            self.each_pass()
            try:
                self.relay_once()
                if time.monotonic() >= next_reconcile:
                    self.reconcile()
                    next_reconcile = time.monotonic() + reconcile_every
                if redis_down:
                    log.warning("%s: Redis is back, pending %s relayed", self.name, self.waiting)
                redis_down = False
            except RedisError as exc:
                if not redis_down:
                    log.warning("%s: Redis unavailable (%s); %s stay journaled until it is back",
                                self.name, exc, self.waiting)
                redis_down = True
            except (SQLAlchemyError, TimeoutError) as exc:
                # A journal briefly locked or unreachable must not end the relay thread: try again.
                log.warning("%s: journal unavailable: %s", self.name, exc)
            self.wakeup.wait(max(interval, self.interval_redis_down) if redis_down else interval)
            self.wakeup.clear()

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run, args=(stop,), name=self.name.replace(" ", "-"), daemon=True)
        thread.start()
        return thread


class Relay(RelayLoop):
    def __init__(self, journal: Journal, redis: Redis, job_path: str, batch: int = 500) -> None:
        super().__init__()
        self.journal, self.redis, self.job_path, self.batch = journal, redis, job_path, batch
        self.queue = returns_queue(redis)

    def relay_once(self) -> int:
        """Enqueue what the outbox holds; the number enqueued. Raises RedisError when Redis is away."""
        with self._lock() as held:
            if not held:
                return 0
            relayed = 0
            while payloads := self.journal.outbox(self.batch):
                # A job that exists was enqueued by a relay that died before marking the outbox.
                exists = jobs_exist(self.redis, [return_job_id(p["return_id"]) for p in payloads])
                fresh = [p for p, e in zip(payloads, exists, strict=True) if not e]
                if fresh:
                    self.queue.enqueue_many([prepare_return_job(self.queue, self.job_path, p) for p in fresh])
                self.journal.mark_enqueued([p["return_id"] for p in payloads])
                relayed += len(fresh)
                if len(payloads) < self.batch:
                    break
            return relayed

    def reconcile(self, window: float = 3600.0) -> int:
        """Enqueue again the recently relayed returns whose job Redis has lost or stranded, or whose worker died
        during it; the number re-enqueued."""
        with self._lock() as held:  # two relays would both retry them
            abandoned = retry_abandoned(self.queue) if held else 0
        if abandoned:
            log.warning("relay: %d return jobs were left started by a worker that died; handed to RQ's retries",
                        abandoned)
        lost, kept = [], []
        for chunk in _chunks(self.journal.relayed_since(time.time() - window), self.batch):
            exists = jobs_exist(self.redis, [return_job_id(p["return_id"]) for p in chunk])
            lost += [p for p, e in zip(chunk, exists, strict=True) if not e]
            kept += [return_job_id(p["return_id"]) for p, e in zip(chunk, exists, strict=True) if e]
        if lost:
            log.warning("relay: %d relayed returns were missing from Redis; enqueued again", len(lost))
            self.queue.enqueue_many([prepare_return_job(self.queue, self.job_path, p) for p in lost])
        stranded = stranded_jobs(self.queue, kept)
        for job in stranded:
            self.queue.enqueue_job(job)
        if stranded:
            log.warning("relay: %d return jobs were queued in no queue (lost at a Redis restart); enqueued again",
                        len(stranded))
        return abandoned + len(lost) + len(stranded) + self._redirect_failed()

    def replay(self) -> int:
        """Enqueue again every return the journal has relayed, in the journal's order; the number enqueued.

        For a Redis that lost its data (no AOF, a disk replaced): the consolidation's totals went with it, and
        the reconciliation looks back one hour only. The consolidation counts a return once and keeps each
        bureau's latest, so a return counted already changes nothing."""
        replayed = 0
        for chunk in _chunks(self.journal.relayed_since(0.0), self.batch):
            self.queue.enqueue_many([prepare_return_job(self.queue, self.job_path, p) for p in chunk])
            replayed += len(chunk)
        log.warning("relay: %d relayed returns enqueued again (replay)", replayed)
        return replayed

    def _redirect_failed(self) -> int:
        """Enqueue again, under the configured function path, the return jobs that failed under another one.

        A REMONTEE_CONSOLIDATE_JOB that does not import (a typo) fails every job, whose path RQ keeps:
        once the setting is fixed, neither the outbox (marked) nor `rq requeue` (the old path) would
        bring those returns to the back office. A job that failed under the configured path is left
        to the back office, as RQ leaves it."""
        failed = self.queue.failed_job_registry
        with self._lock() as held:  # two relays would both enqueue them
            if not held:
                return 0
            ids = [i for i in failed.get_job_ids() if i.startswith(return_job_id(""))]
            jobs = [j for j in Job.fetch_many(ids, connection=self.redis)
                    if j is not None and j.func_name != self.job_path]
            if not jobs:
                return 0
            # Enqueued before they leave the failed registry: a relay dying in between leaves them there, not nowhere.
            self.queue.enqueue_many([prepare_return_job(self.queue, self.job_path, j.args[0]) for j in jobs])
            for job in jobs:
                failed.remove(job.id)
        log.warning("relay: %d return jobs had failed under another job path than %s; enqueued again under it",
                    len(jobs), self.job_path)
        return len(jobs)

def _chunks(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
