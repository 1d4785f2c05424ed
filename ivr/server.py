"""The phone channel as one running service: the FastAGI listener, the results line and the relay.

`PhoneService` loads the election once and the registry whenever its file changes (a bureau added on
the night, as the pen and review parts do), opens the journal and Redis, starts the
relay thread (woken after each accepted return), and listens for FastAGI connections. `cli.py`
runs it under the reactor; the tests run it on a reactor in a background thread.
`start_metrics()` adds the Prometheus listener (`REMONTEE_IVR_METRICS_PORT`, telemetry/).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from twisted.internet import defer, reactor, threads
from twisted.internet.interfaces import IListeningPort
from twisted.python.threadpool import ThreadPool

from forms import load_election
from ivr.agi import AGIStats, FastAGIFactory
from ivr.call_flow import ResultsLine
from ivr.call_state import CallState
from registry import Registry, RegistryFile
from returns_queue.jobs import RETURNS_QUEUE
from returns_queue.journal import Journal
from returns_queue.relay import Relay
from settings import Settings
from telemetry.exposition import MetricsListener
from telemetry.ivr import AGIStatsCollector, observe_turnaround, observe_work
from telemetry.state import StateCollector

log = logging.getLogger(__name__)
SCRIPT = "results"  # agi://host:port/results (DESIGN.md)


@dataclass
class PhoneService:
    settings: Settings
    relay: bool = True  # tests that watch the outbox turn it off
    command_timeout: float = 15.0
    playback_timeout: float = 180.0
    stats: AGIStats = field(default_factory=lambda: AGIStats(observer=observe_turnaround, work_observer=observe_work))

    def __post_init__(self) -> None:
        s = self.settings
        self.election = load_election(s.election)
        self.registry_file = RegistryFile(s.registry_path)
        if self.registry_file.get() is None:  # a registry that does not load raises here, and stops the start
            raise FileNotFoundError(f"no registry at {s.registry_path}")
        self.journal = Journal(s.db_url_resolved)
        # A short socket timeout: a Redis that hangs must not hold a thread (and a call) for long.
        self.redis = Redis.from_url(s.redis_url_resolved, socket_timeout=5, socket_connect_timeout=5)
        self.state = CallState(self.redis)
        self._stop = threading.Event()
        self._relay: Relay | None = None
        if self.relay:
            self._relay = Relay(self.journal, Redis.from_url(s.redis_url_resolved), s.consolidate_job)
        self.pin_checker = ThreadPool(1, os.cpu_count() or 2, name="pin-check")
        self.line = ResultsLine(
            self.election, self.registry_file, self.journal, self.state, on_accepted=self.wake_relay,
            run_pin_check=lambda f, *a: threads.deferToThreadPool(reactor, self.pin_checker, f, *a),
        )
        self.factory = FastAGIFactory({SCRIPT: self.line}, command_timeout=self.command_timeout,
                                      playback_timeout=self.playback_timeout, stats=self.stats)
        self.port: IListeningPort | None = None
        self.metrics: MetricsListener | None = None

    def start_metrics(self, port: int | None = None) -> MetricsListener:
        """The Prometheus listener, on its own thread; `port` 0 picks a free one, None the configured one.

        Besides the calls it serves the returns relay's backlog and the `returns` queue: the state
        this server's relay owns."""
        state = StateCollector(self.journal, self.redis, queues=(RETURNS_QUEUE,), parts={"returns"})
        listen_port = self.settings.ivr_metrics_port if port is None else port
        self.metrics = MetricsListener(self.settings.bind, listen_port, [AGIStatsCollector(self.stats), state])
        log.info("ivr: metrics on %s", self.metrics.url)
        return self.metrics

    def wake_relay(self) -> None:
        if self._relay is not None:
            self._relay.wakeup.set()

    def start(self, port: int | None = None) -> IListeningPort:
        """Listen (call in the reactor thread); `port` 0 picks a free one, None the configured one."""
        if self._relay is not None:
            self._relay.start(self._stop)
        self.pin_checker.start()
        listen_port = self.settings.agi_port if port is None else port
        self.port = reactor.listenTCP(listen_port, self.factory, backlog=1024,  # type: ignore[attr-defined]
                                      interface=self.settings.bind)
        log.info("ivr: FastAGI on agi://%s:%d/%s, election %s, %d bureaux", self.settings.bind,
                 self.port.getHost().port, SCRIPT, self.election.id, len(self.registry))
        return self.port

    @property
    def registry(self) -> Registry:
        return self.line.registry

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"agi://{self.settings.bind}:{self.port.getHost().port}/{SCRIPT}"

    async def stop(self, drain_seconds: float = 8.0) -> None:
        """Stop listening (Asterisk then falls back to the operators), let calls in progress end, stop the relay."""
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
        if self.factory.channels:
            log.info("ivr: waiting up to %.0f s for %d call(s) in progress", drain_seconds, len(self.factory.channels))
            idle = self.factory.when_idle()
            timeout = reactor.callLater(drain_seconds, idle.cancel)  # type: ignore[attr-defined]
            try:
                await idle
            except defer.CancelledError:
                log.warning("ivr: %d call(s) still in progress at stop", len(self.factory.channels))
            if timeout.active():
                timeout.cancel()
        self._stop.set()
        self.wake_relay()
        await threads.deferToThread(self.pin_checker.stop)  # lets a check in progress finish

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        self.journal.dispose()
        self.redis.close()

    def stats_line(self) -> str:
        return json.dumps({"ivr_stats": self.stats.snapshot()}, sort_keys=True)

    def describe(self) -> dict[str, Any]:
        return {"election": self.election.id, "bureaux": len(self.registry), "url": self.url}
