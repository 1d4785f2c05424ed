"""The figures of the progress dashboard, computed from the journal, the registry and Redis.

A bureau has reported when it has an accepted return in the journal (the journal, not the
consolidation, is the record of what was acknowledged). Its channel is the one of its latest
accepted return, so a bureau corrected by a supervisor counts under `review`. What waits for a
supervisor is the open review items plus the pen uploads the OCR could attach to no bureau.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from sqlalchemy import select

from registry import Registry
from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE
from returns_queue.journal import Journal, returns
from returns_queue.journal import review_items as items_table

CHANNELS = ("ivr", "pen", "review")
MAX_POINTS = 120
MIN_SPAN = 30 * 60


@dataclass(frozen=True)
class Department:
    code: str
    registered: int
    reported: int

    @property
    def percent(self) -> float:
        return 100.0 * self.reported / self.registered if self.registered else 0.0


@dataclass(frozen=True)
class Point:
    """One step of the chart: the end of a time bucket, returns journaled in it, bureaux reported by then."""

    at: float
    returns: int
    reported: int


# The RQ queues as a supervisor reads them on the dashboard (their names, DESIGN.md's, beside).
QUEUE_LABELS = {RETURNS_QUEUE: "retours vers la consolidation", OCR_QUEUE: "envois à lire"}


@dataclass(frozen=True)
class QueueDepth:
    name: str
    waiting: int | None  # None: Redis did not answer
    started: int | None
    failed: int | None

    @property
    def label(self) -> str:
        return QUEUE_LABELS.get(self.name, self.name)


@dataclass
class Progress:
    election: str
    at: float
    registered: int
    reported: int
    by_channel: dict[str, int]
    departments: list[Department]
    returns_last_minute: int
    returns_total: int
    items_open: int
    items_claimed: int
    uploads_waiting: int  # pen uploads with no bureau and no return (review/unassigned_uploads.py)
    uploads_failed: int  # pen uploads whose recognition broke, waiting for counts typed by hand (same module)
    queues: list[QueueDepth]
    outbox_backlog: int
    redis_ok: bool
    bucket_seconds: int
    series: list[Point] = field(default_factory=list)

    @property
    def percent(self) -> float:
        return 100.0 * self.reported / self.registered if self.registered else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["percent"] = round(self.percent, 2)
        for d, dep in zip(data["departments"], self.departments, strict=True):
            d["percent"] = round(dep.percent, 2)
        return data


def queue_depths(redis: Redis) -> tuple[list[QueueDepth], bool]:
    depths = []
    ok = True
    for name in (RETURNS_QUEUE, OCR_QUEUE):
        try:
            q = Queue(name, connection=redis)
            depths.append(QueueDepth(name, q.count, q.started_job_registry.count, q.failed_job_registry.count))
        except (RedisError, OSError):
            ok = False
            depths.append(QueueDepth(name, None, None, None))
    return depths, ok


def bucket_size(span: float) -> int:
    """Whole minutes, so that the chart has at most MAX_POINTS steps."""
    return 60 * max(1, math.ceil(span / 60 / MAX_POINTS))


def compute_progress(
    journal: Journal, registry: Registry | None, redis: Redis, election: str, now: float | None = None,
    uploads_waiting: int = 0,
    uploads_failed: int = 0,
) -> Progress:
    now = time.time() if now is None else now
    with journal.read() as conn:
        rows = conn.execute(
            select(returns.c.bureau, returns.c.channel, returns.c.status, returns.c.journaled_at)
            .where(returns.c.election == election)
            .order_by(returns.c.seq)
        ).all()
        open_items = conn.execute(  # this election's, like every other figure of the panel
            select(items_table.c.claimed_until).where(items_table.c.state == "open",
                                                      items_table.c.election == election)
        ).all()
    first_accepted: dict[str, float] = {}
    latest_channel: dict[str, str] = {}
    received: list[float] = []
    for r in rows:
        if r.status == "duplicate":  # answered with the first one's receipt: not a new return
            continue
        received.append(r.journaled_at)
        if r.status == "accepted" and (registry is None or r.bureau in registry):
            first_accepted.setdefault(r.bureau, r.journaled_at)
            latest_channel[r.bureau] = r.channel
    by_channel = dict.fromkeys(CHANNELS, 0)
    for channel in latest_channel.values():
        by_channel[channel] = by_channel.get(channel, 0) + 1
    departments: list[Department] = []
    if registry is not None:
        reported_by_dep: dict[str, int] = {}
        for code in first_accepted:
            bureau = registry.get(code)
            if bureau is not None:
                reported_by_dep[bureau.department] = reported_by_dep.get(bureau.department, 0) + 1
        departments = [Department(d, n, reported_by_dep.get(d, 0)) for d, n in registry.departments().items()]
    queues, redis_ok = queue_depths(redis)
    # The chart runs from the first return to now, in whole-minute steps.
    series: list[Point] = []
    step = 60
    if received:
        # At least the last half hour, so that the first returns of the night are not one fat bar.
        start = math.floor(min(min(received), now - MIN_SPAN) / 60) * 60
        step = bucket_size(now - start)
        n = max(1, math.ceil((now - start) / step))
        per_bucket = [0] * n
        for at in received:
            per_bucket[min(n - 1, int((at - start) // step))] += 1
        reported_at = sorted(first_accepted.values())
        i = 0
        for b in range(n):
            end = start + (b + 1) * step
            while i < len(reported_at) and reported_at[i] < end:
                i += 1
            series.append(Point(min(end, now), per_bucket[b], i))
    return Progress(
        election=election,
        at=now,
        registered=len(registry) if registry is not None else 0,
        reported=len(first_accepted),
        by_channel=by_channel,
        departments=departments,
        returns_last_minute=sum(1 for at in received if at > now - 60),
        returns_total=len(received),
        items_open=len(open_items),
        items_claimed=sum(1 for r in open_items if r.claimed_until and r.claimed_until > now),
        uploads_waiting=uploads_waiting,
        uploads_failed=uploads_failed,
        queues=queues,
        outbox_backlog=journal.outbox_backlog(),
        redis_ok=redis_ok,
        bucket_seconds=step,
        series=series,
    )
