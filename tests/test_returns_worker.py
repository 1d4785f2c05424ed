"""`run_gateway.py all` keeps a worker for the `returns` queue alone: with OCR jobs holding both general workers
(as on a full upload disk, where an OCR job waits minutes for room), a phone return's job still runs. Real
workers, started by the real supervisor from `SERVICES`, on the real redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from test_run_gateway import ROOT, alive, descendants
from test_worker_horse import _env

import run_gateway
from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE


def test_all_runs_a_worker_of_the_returns_queue_alone() -> None:
    queues = [s.argv[s.argv.index("--queues") + 1] if "--queues" in s.argv else f"{RETURNS_QUEUE},{OCR_QUEUE}"
              for s in run_gateway.SERVICES if s.argv[0] == "worker"]
    assert RETURNS_QUEUE in queues and queues.count(f"{RETURNS_QUEUE},{OCR_QUEUE}") == 2


def test_a_return_is_consolidated_while_ocr_jobs_hold_the_general_workers(
    tmp_path: Path, redis: Redis, redis_server
) -> None:
    # The workers of `all`, as SERVICES lists them, under the real supervisor.
    script = textwrap.dedent("""
        import sys
        import run_gateway
        from settings import Settings
        workers = [s for s in run_gateway.SERVICES if s.argv[0] == "worker"]
        sys.exit(run_gateway.Supervisor(Settings.from_env(), workers, stop_grace=1.0).run())
    """)
    ocr, returns = Queue(OCR_QUEUE, connection=redis), Queue(RETURNS_QUEUE, connection=redis)
    # Two OCR jobs stuck for minutes, as on a full disk: each general worker takes one.
    stuck = [ocr.enqueue("time.sleep", 300, job_timeout=600) for _ in range(2)]
    supervisor = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path, redis_server.url),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while {j.get_status(refresh=True) for j in stuck} != {JobStatus.STARTED}:
            assert time.monotonic() < deadline, "the general workers did not take the OCR jobs"
            time.sleep(0.2)
        phone_return = returns.enqueue("os.getpid")
        deadline = time.monotonic() + 60
        while phone_return.get_status(refresh=True) != JobStatus.FINISHED:
            assert time.monotonic() < deadline, "the return's job waited behind the OCR jobs"
            time.sleep(0.2)
        assert all(Job.fetch(j.id, connection=redis).get_status() == JobStatus.STARTED for j in stuck)
        family = descendants(supervisor.pid)
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
    finally:
        if supervisor.poll() is None:
            family |= descendants(supervisor.pid)
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(30)
            except subprocess.TimeoutExpired:
                supervisor.kill()
                supervisor.wait()
        deadline = time.monotonic() + 15
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
