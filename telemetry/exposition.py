"""Serving the metrics: `/metrics` on the Flask apps, a listener thread for the IVR and the RQ workers.

A scrape builds its registry afresh: this process's metrics (or, in multiprocess mode, every
process's files under the directory), the service's `StateCollector`, and any collector the
service adds (the IVR's reading of its `AGIStats`). Nothing is registered globally beyond the
metric objects themselves, so tests may build as many apps as they like.

Who may read `/metrics`: it carries counts and durations only (no bureau, no name, no figure,
no id), so it needs no login: Prometheus scrapes it without credentials. The services bind to
loopback unless told otherwise; behind nginx, `/metrics` is not proxied (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from telemetry import logs, metrics, multiprocess

log = logging.getLogger(__name__)


class _ThisProcess(Collector):
    """The metrics of this process (the global registry), read through a per-scrape registry."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()


def scrape_registry(collectors: Iterable[Collector] = ()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess.enabled()
    registry.register(multiprocess.LockedMultiProcessCollector(directory) if directory else _ThisProcess())
    for collector in collectors:
        registry.register(collector)
    return registry


def render(collectors: Iterable[Collector], accept: str = "") -> tuple[bytes, str]:
    """(body, Content-Type) of a scrape, in the text format or OpenMetrics as the scraper asks."""
    encoder, content_type = choose_encoder(accept)
    return encoder(scrape_registry(collectors)), content_type


# --- Flask ---

def install_flask(app: Any, service: str, collectors: Iterable[Collector] = ()) -> None:
    """`/metrics`, request durations by endpoint and status code, and a fresh log context per request."""
    from flask import Response, g, request

    scraped = list(collectors)
    in_progress = metrics.HTTP_IN_PROGRESS.labels(service)

    @app.before_request
    def _started() -> None:
        g.remontee_started = time.perf_counter()
        g.remontee_log_token = logs.bind()  # whatever the request binds (an upload id) ends with it
        in_progress.inc()

    @app.after_request
    def _status(response: Any) -> Any:
        g.remontee_status = response.status_code
        return response

    @app.teardown_request
    def _finished(exc: BaseException | None) -> None:
        started = g.pop("remontee_started", None)
        if started is None:
            return  # a before_request above ours answered first
        in_progress.dec()
        rule = request.url_rule
        endpoint = rule.endpoint if rule is not None else "unmatched"
        code = str(g.pop("remontee_status", 500))
        metrics.HTTP_SECONDS.labels(service, endpoint, code).observe(time.perf_counter() - started)
        request.environ[logs.ENVIRON_KEY] = dict(logs.current())  # for gunicorn's access line (access_log.py)
        token = g.pop("remontee_log_token", None)
        if token is not None:
            # ValueError: bound in another context (a streamed response finished elsewhere): nothing to undo.
            with contextlib.suppress(ValueError):
                logs.unbind(token)

    def metrics_view() -> Any:
        body, content_type = render(scraped, request.headers.get("Accept", ""))
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])


# --- a listener of its own (IVR, RQ workers) ---

class _Scrape(Collector):
    """Everything a listener serves, gathered anew at each scrape."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Any]:
        yield from scrape_registry(self.collectors).collect()


class MetricsListener:
    """prometheus_client's HTTP server on its own thread: scrapes (and their Redis and journal reads)
    never run on the Twisted reactor that serves the calls."""

    def __init__(self, bind: str, port: int, collectors: Iterable[Collector] = ()) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Scrape(collectors))
        self.server, self.thread = start_http_server(port, addr=bind, registry=registry)
        self.port = self.server.server_port
        self.url = f"http://{bind}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class RetryingListener:
    """A listener on a port several processes may want (the RQ workers of one machine share their
    metrics directory): whoever binds it serves them all; the others try again now and then."""

    def __init__(self, bind: str, port: int, collectors: Iterable[Collector] = (), retry_seconds: float = 10.0) -> None:
        self.bind, self.port, self.collectors, self.retry_seconds = bind, port, list(collectors), retry_seconds
        self.listener: MetricsListener | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        said = False
        while not self._stop.is_set():
            try:
                self.listener = MetricsListener(self.bind, self.port, self.collectors)
                log.info("metrics on %s", self.listener.url)
                return
            except OSError as exc:
                if not said:
                    log.info("metrics port %s:%d taken (%s): another process serves it; retrying every %.0f s",
                             self.bind, self.port, exc.strerror, self.retry_seconds)
                    said = True
            self._stop.wait(self.retry_seconds)

    def close(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.close()
