"""What is read at scrape time rather than counted: queue depths, relay backlogs, table counts.

`StateCollector` asks Redis and the journal when Prometheus scrapes, so the figures are the
system's, whichever process serves them, and nothing has to be kept in step. Each service
reports the state it owns (`parts`): the IVR the returns relay and the `returns` queue, the pen
API the uploads and the `ocr` queue, the review UI the open review items and both queues.

Redis or the journal being away never fails a scrape: their figures are left out and
`remontee_state_up{source}` says 0. Only counts leave here, never a bureau, a name or a figure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE
from returns_queue.journal import Journal, review_items

log = logging.getLogger(__name__)

PARTS = frozenset({"returns", "uploads", "review"})
UPLOAD_STATUSES = ("queued", "recognized", "accepted", "review", "rejected", "failed")


class StateCollector(Collector):
    def __init__(self, journal: Journal | None, redis: Redis | None, queues: Iterable[str] = (RETURNS_QUEUE, OCR_QUEUE),
                 parts: Iterable[str] = PARTS) -> None:
        self.journal, self.redis = journal, redis
        self.queues = tuple(queues)
        self.parts = frozenset(parts)
        unknown = self.parts - PARTS
        if unknown:
            raise ValueError(f"unknown state parts: {sorted(unknown)}")
        self._warned: dict[str, float] = {}

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: registering must not query Redis or the journal

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("remontee_state_up", "Whether the last scrape could read this source (1) or not (0)",
                               labels=["source"])
        started = time.perf_counter()
        if self.redis is not None and self.queues:
            families = self._read("redis", self._queues, RedisError)
            up.add_metric(["redis"], 0 if families is None else 1)
            yield from families or ()
        if self.journal is not None and self.parts:
            families = self._read("journal", self._journal, SQLAlchemyError)
            up.add_metric(["journal"], 0 if families is None else 1)
            yield from families or ()
        yield up
        took = GaugeMetricFamily("remontee_state_read_seconds", "Time this scrape spent reading Redis and the journal")
        took.add_metric([], time.perf_counter() - started)
        yield took

    def _read(self, source: str, read: Callable[[], list[Any]], errors: type[Exception]) -> list[Any] | None:
        try:
            return read()
        except (errors, OSError, TimeoutError) as exc:
            # Once a minute at most: Prometheus scrapes every few seconds and the outage is said elsewhere.
            if time.monotonic() - self._warned.get(source, -1e9) > 60:
                self._warned[source] = time.monotonic()
                log.warning("metrics: %s unreadable at scrape time: %s", source, exc)
            return None

    def _queues(self) -> list[Any]:
        assert self.redis is not None
        queued = GaugeMetricFamily("remontee_rq_queued_jobs", "Jobs waiting on an RQ queue", labels=["queue"])
        started = GaugeMetricFamily("remontee_rq_started_jobs", "Jobs being worked on, by queue", labels=["queue"])
        failed = GaugeMetricFamily("remontee_rq_failed_jobs", "Jobs in the failed registry (kept a week), by queue",
                                   labels=["queue"])
        for name in self.queues:
            queue = Queue(name, connection=self.redis)
            queued.add_metric([name], queue.count)
            started.add_metric([name], StartedJobRegistry(name, connection=self.redis).get_job_count(cleanup=False))
            failed.add_metric([name], FailedJobRegistry(name, connection=self.redis).get_job_count(cleanup=False))
        return [queued, started, failed]

    def _journal(self) -> list[Any]:
        assert self.journal is not None
        families: list[Any] = []
        if "returns" in self.parts:
            backlog = GaugeMetricFamily("remontee_returns_outbox_backlog",
                                        "Accepted returns journaled but not yet put on the returns queue (relay to do)")
            backlog.add_metric([], self.journal.outbox_backlog())
            families.append(backlog)
        if "review" in self.parts:
            with self.journal.read() as conn:
                open_items = conn.execute(
                    select(func.count()).select_from(review_items).where(review_items.c.state == "open")
                ).scalar_one()
            gauge = GaugeMetricFamily("remontee_review_items_open", "Review items waiting for a supervisor")
            gauge.add_metric([], open_items)
            families.append(gauge)
        if "uploads" in self.parts:
            families.extend(self._uploads())
        return families

    def _uploads(self) -> list[Any]:
        from pen_gateway.uploads import ocr_backlog, uploads

        assert self.journal is not None
        with self.journal.read() as conn:
            if not conn.dialect.has_table(conn, uploads.name):
                return []  # no pen gateway has run against this journal yet
            rows = conn.execute(select(uploads.c.status, func.count()).group_by(uploads.c.status)).all()
        by_status = dict.fromkeys(UPLOAD_STATUSES, 0) | {status: count for status, count in rows}
        gauge = GaugeMetricFamily("remontee_uploads_in_status", "Pen uploads now in each status", labels=["status"])
        for status, count in sorted(by_status.items()):
            gauge.add_metric([status], count)
        backlog = GaugeMetricFamily("remontee_ocr_outbox_backlog",
                                    "Uploads acknowledged whose ocr job is not yet seen on RQ (OCR relay to do)")
        backlog.add_metric([], ocr_backlog(self.journal))
        return [gauge, backlog]
