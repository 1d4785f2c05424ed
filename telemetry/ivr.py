"""What the FastAGI server adds to its metrics: its own `AGIStats`, read at scrape time, and each turnaround timed.

`AGIStats` (ivr/agi.py) already counts calls, commands, violations and timeouts, and measures
each command's server-side turnaround; `observe_turnaround` feeds the same samples to the
`remontee_ivr_agi_turnaround_seconds` histogram, `observe_work` times the work calls wait on (and
how long a caller was held past the speech covering it), and `AGIStatsCollector` exposes the counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ivr.agi import AGIStats
from telemetry import metrics

_AFTER = {False: metrics.IVR_TURNAROUND.labels("reply"), True: metrics.IVR_TURNAROUND.labels("thread")}


def observe_turnaround(seconds: float, after_thread: bool) -> None:
    _AFTER[after_thread].observe(seconds)


def observe_work(kind: str, seconds: float, held: float) -> None:
    metrics.IVR_WORK.labels(kind).observe(seconds)
    metrics.IVR_HELD.labels(kind).observe(held)


class AGIStatsCollector(Collector):
    def __init__(self, stats: AGIStats) -> None:
        self.stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        s = self.stats
        in_progress = GaugeMetricFamily("remontee_ivr_calls_in_progress", "Calls being served by this FastAGI server")
        in_progress.add_metric([], s.calls_active)
        yield in_progress
        for name, documentation, value in (
            ("remontee_ivr_calls_started", "Calls whose application started", s.calls_started),
            ("remontee_ivr_agi_commands", "AGI commands sent", s.commands),
            ("remontee_ivr_protocol_violations", "Connections closed for not speaking FastAGI", s.violations),
            ("remontee_ivr_agi_timeouts", "Connections closed for an answer or environment that never came",
             s.timeouts),
        ):
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter
