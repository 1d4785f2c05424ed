"""Every Prometheus metric Remontée's processes count or time, in one place (names prefixed `remontee_`).

Importing this module creates the metrics, so under gunicorn or in an RQ worker it must come
after `telemetry.multiprocess.enable()` (which `run_gateway.py pen|review|worker` call first):
prometheus_client picks its per-process storage at import time.

Multiprocess rules followed here (prometheus_client's "Multiprocess Mode" page): no `set_function`,
no Info or Enum, and every gauge says how the processes' values combine (`livesum`: the sum over
the processes alive). State that lives outside a process (queues, backlogs, table counts) is not
a metric object at all but read at scrape time by `telemetry.state.StateCollector`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

# Seconds. The AGI turnaround is the server's own work between an answer and the next command.
TURNAROUND_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OCR_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)

# --- the phone channel (one process per FastAGI server: no multiprocess concerns) ---

IVR_CALLS = Counter("remontee_ivr_calls", "Calls ended, by outcome (accepted, operator, declined, hangup, error)",
                    ["outcome"])
IVR_HANDOFFS = Counter("remontee_ivr_handoffs", "Calls handed to an operator, by reason", ["reason"])
IVR_PIN_CHECKS = Counter("remontee_ivr_pin_checks", "PINs checked, by result (right, wrong)", ["result"])
IVR_PIN_LOCKOUTS = Counter("remontee_ivr_pin_lockouts",
                           "Lockouts set by wrong PINs (kind: bureau or caller id)", ["kind"])
IVR_RETURNS = Counter("remontee_ivr_returns", "Returns journaled by phone, by journal status", ["status"])
IVR_TURNAROUND = Histogram(
    "remontee_ivr_agi_turnaround_seconds",
    "Server-side time from an AGI answer to the next command (after: reply, or thread for work done in a thread)",
    ["after"], buckets=TURNAROUND_BUCKETS,
)
IVR_WORK = Histogram(
    "remontee_ivr_work_seconds",
    "Work a call waits on (pin, journal, history, resume, bureau-lock, caller-lock): from its start to its result",
    ["work"], buckets=REQUEST_BUCKETS,
)
IVR_HELD = Histogram(
    "remontee_ivr_held_seconds",
    "How long callers were held (silence, then 'Veuillez patienter') past the speech covering that work",
    ["work"], buckets=REQUEST_BUCKETS,
)

# --- HTTP services (gunicorn workers: multiprocess) ---

# Labelled by service (pen, review) so that a process that serves no HTTP exports none of them.
HTTP_SECONDS = Histogram("remontee_http_request_seconds", "HTTP request duration, by Flask endpoint and status code",
                         ["service", "endpoint", "code"], buckets=REQUEST_BUCKETS)
HTTP_IN_PROGRESS = Gauge("remontee_http_requests_in_progress", "HTTP requests being answered", ["service"],
                         multiprocess_mode="livesum")

# --- pen uploads and their recognition ---

UPLOADS = Counter("remontee_uploads", "Upload status changes, by the status entered "
                  "(queued at the 202; recognition and supervisors' decisions after)", ["status"])
OCR_SECONDS = Histogram("remontee_ocr_seconds", "Time to recognize one upload (the ocr job), by the status it led to",
                        ["status"], buckets=OCR_BUCKETS)
OCR_STAGE_SECONDS = Histogram("remontee_ocr_stage_seconds", "Time of one stage of the recognition of an upload",
                              ["stage"], buckets=OCR_BUCKETS)

# --- RQ jobs (work horses of the RQ workers: multiprocess) ---

JOB_SECONDS = Histogram("remontee_rq_job_seconds", "RQ job duration, by queue and outcome (ok, failed)",
                        ["queue", "outcome"], buckets=OCR_BUCKETS)

# --- the review UI ---

REVIEW_DECISIONS = Counter("remontee_review_decisions", "Supervisors' decisions on review items", ["decision"])


@contextlib.contextmanager
def ocr_stage(stage: str) -> Iterator[None]:
    """Time one stage of a recognition (decode, read, assess, artefacts, journal): the OCR job's hook."""
    started = time.perf_counter()
    try:
        yield
    finally:
        OCR_STAGE_SECONDS.labels(stage).observe(time.perf_counter() - started)
