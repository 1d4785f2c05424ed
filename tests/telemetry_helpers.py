"""Reading a Prometheus scrape in tests: fetch over real HTTP and parse with prometheus_client's own parser."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())


def value(samples: Samples, name: str, default: float | None = 0.0, **labels: str) -> float:
    """One sample's value (`default` when absent: a labelled counter appears at its first increment)."""
    found = samples.get((name, frozenset(labels.items())))
    if found is None:
        if default is None:
            raise KeyError(f"no sample {name}{labels}")
        return default
    return found


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def fields_of(records: Iterable[logging.LogRecord], field: str) -> list[str | None]:
    from telemetry.logs import record_fields

    return [record_fields(r).get(field) for r in records]
