"""The RQ workers' operations: `run_gateway.py worker` for real (forking a work horse per job), its metrics
listener scraped after real jobs, the horses' metric files folded away, and each job's ids on its log lines."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from rq import Queue
from telemetry_helpers import scrape

from conftest import ROOT, RedisServer, free_port
from forms import Election
from registry import Registry
from returns_queue.jobs import ocr_job_id
from returns_queue.journal import Journal
from returns_queue.relay import Relay
from validation import check_return, new_return

GOOD_T1 = {"votants": 250, "blancs_nuls": 5, "exprimes": 245, "aubry": 70, "baylet": 5, "hollande": 90,
           "montebourg": 40, "royal": 25, "valls": 15}


def test_worker_metrics_and_log_lines(tmp_path: Path, redis: Redis, redis_server: Any, registry: Registry,
                                      election_t1: Election) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    codes = sorted(registry.bureaux)[:3]
    for code in codes:
        ret = new_return(election_t1, code, GOOD_T1, "ivr", {"call_id": f"c-{code}", "caller_id": "anonymous"})
        assert journal.submit(ret, check_return(ret, election_t1, registry.get(code))).status == "accepted"
    assert Relay(journal, redis, "returns_queue.consolidation.consolidate").relay_once() == 3
    ocr = Queue("ocr", connection=redis)
    for upload_id in ("01JWORKERUPLOADA00000000000", "01JWORKERUPLOADB00000000000"):
        ocr.enqueue("telemetry_jobs.recognized_for_review", upload_id, job_id=ocr_job_id(upload_id))
    broken = "01JWORKERUPLOADC00000000000"
    ocr.enqueue("telemetry_jobs.broken", broken, job_id=ocr_job_id(broken))

    port = free_port()
    env = {**os.environ, "REMONTEE_VAR_DIR": str(tmp_path), "REMONTEE_REDIS_URL": redis_server.url,
           "REMONTEE_DB_URL": journal.url, "REMONTEE_WORKER_METRICS_PORT": str(port), "REMONTEE_BIND": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "worker"], env=env, cwd=tmp_path,
                                  stdout=log, stderr=log)
        try:
            # A horse writes its job's figures one after another: wait until every one is there, not the first.
            expected = {
                ("remontee_rq_job_seconds_count", (("outcome", "ok"), ("queue", "returns"))): 3,
                ("remontee_rq_job_seconds_count", (("outcome", "ok"), ("queue", "ocr"))): 2,
                ("remontee_rq_job_seconds_count", (("outcome", "failed"), ("queue", "ocr"))): 1,
                ("remontee_ocr_seconds_count", (("status", "review"),)): 2,
                ("remontee_ocr_seconds_count", (("status", "failed"),)): 1,
                ("remontee_ocr_seconds_bucket", (("le", "+Inf"), ("status", "review"))): 2,
                ("remontee_uploads_total", (("status", "review"),)): 2,
                ("remontee_uploads_total", (("status", "failed"),)): 1,
                # Queue state read from the real Redis at scrape time.
                ("remontee_rq_failed_jobs", (("queue", "ocr"),)): 1,
                ("remontee_rq_queued_jobs", (("queue", "ocr"),)): 0,
                ("remontee_rq_queued_jobs", (("queue", "returns"),)): 0,
            }
            got: dict[Any, float | None] = {}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    samples = scrape(f"http://127.0.0.1:{port}/metrics")
                except (urllib.error.URLError, ConnectionError):
                    samples = {}
                got = {key: samples.get((key[0], frozenset(key[1]))) for key in expected}
                if got == expected:
                    break
                assert worker.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.2)
            assert got == expected
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(20)
    # Six horses, six exits: their files were folded into the archive after each job, or as the worker stopped.
    files = sorted(p.name for p in (tmp_path / "metrics" / "worker").glob("*.db"))
    assert files == ["counter_archive.db", "histogram_archive.db"], files

    lines = [json.loads(raw) for raw in log_path.read_text().splitlines() if raw.startswith("{")]
    assert lines and all(line["part"] == "worker" for line in lines)
    read = [line for line in lines if line["logger"] == "pen_gateway.recognition.job"]
    assert sorted(line["upload_id"] for line in read) == [
        "01JWORKERUPLOADA00000000000", "01JWORKERUPLOADB00000000000", "01JWORKERUPLOADC00000000000"]
    assert all(line["msg"].startswith(f"upload {line['upload_id']}:") for line in read)
    assert all(line["job_id"] == ocr_job_id(line["upload_id"]) for line in read)
    # RQ's own lines about a job, from the worker and its horse, carry the job's ids too.
    about_ocr = [line for line in lines if line["logger"].startswith("rq") and "ocr-01JWORKERUPLOAD" in line["msg"]
                 and "upload_id" in line]
    assert about_ocr and all(ocr_job_id(line["upload_id"]) in line["msg"] for line in about_ocr)
    consolidated = [line for line in lines if line.get("return_id")]
    assert {line["bureau"] for line in consolidated} == set(codes)
    journal.dispose()


def test_a_stop_during_the_fold_waits_for_it(tmp_path: Path) -> None:
    """SIGTERM while the finished horses' files are folded runs RQ's handler after the fold, not halfway through it.

    The fold here waits for a scrape's shared lock, held by another thread, while the signal arrives."""
    from telemetry import multiprocess

    horse = ("import os; os.environ['PROMETHEUS_MULTIPROC_DIR'] = os.environ['DIR']\n"
             "from prometheus_client import Counter\n"
             "Counter('remontee_folded', 'a finished horse').inc(3)\n")
    subprocess.run([sys.executable, "-c", horse], env={**os.environ, "DIR": str(tmp_path)}, check=True)
    [left] = [p.name for p in tmp_path.glob("counter_*.db")]

    class Stop(Exception):
        pass

    def stop(signum: int, frame: Any) -> None:
        raise Stop

    scrape_holds_lock = threading.Event()

    def fold_is_waiting(inode: int) -> bool:
        """/proc/locks lists a blocked request as "N: -> FLOCK ADVISORY WRITE pid maj:min:inode ..."."""
        lines = Path("/proc/locks").read_text().splitlines()
        return any("->" in line and any(f.endswith(f":{inode}") for f in line.split()) for line in lines)

    def scrape_then_signal() -> None:
        with open(tmp_path / multiprocess.LOCK, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            scrape_holds_lock.set()
            deadline = time.monotonic() + 10
            while not fold_is_waiting(os.fstat(lock.fileno()).st_ino) and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGTERM)  # the fold is waiting for the lock
            time.sleep(0.1)
            fcntl.flock(lock, fcntl.LOCK_UN)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        scraper = threading.Thread(target=scrape_then_signal)
        scraper.start()
        assert scrape_holds_lock.wait(5)
        with pytest.raises(Stop):
            multiprocess.absorb_dead_processes(tmp_path)
        scraper.join(5)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (tmp_path / left).exists()
    # Folded once: what a scrape reads is the horse's 3, from the archive alone.
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["counter_archive.db"]
    samples = [(s.name, s.value) for metric in multiprocess.LockedMultiProcessCollector(tmp_path).collect()
               for s in metric.samples]
    assert samples == [("remontee_folded_total", 3.0)]


def test_a_scrape_answers_while_redis_does_not(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (stopped, overloaded) leaves the scrape its own figures
    and state_up{source="redis"} 0 within seconds, as the other services' scrapes do; it used to hang with it."""
    server = RedisServer(tmp_path / "redis-dir")
    (tmp_path / "redis-dir").mkdir()
    server.start()
    port = free_port()
    env = {**os.environ, "REMONTEE_VAR_DIR": str(tmp_path / "var"), "REMONTEE_REDIS_URL": server.url,
           "REMONTEE_WORKER_METRICS_PORT": str(port), "REMONTEE_BIND": "127.0.0.1"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "worker", "--queues", "returns"],
                              env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert server.process is not None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                samples = scrape(f"http://127.0.0.1:{port}/metrics")
                break
            except (urllib.error.URLError, ConnectionError):
                assert worker.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        assert samples[("remontee_state_up", frozenset({("source", "redis")}))] == 1
        server.process.send_signal(signal.SIGSTOP)
        # scrape() gives up after 10 s, Prometheus's default: the old listener, waiting on Redis, timed out here.
        samples = scrape(f"http://127.0.0.1:{port}/metrics")
        assert samples[("remontee_state_up", frozenset({("source", "redis")}))] == 0
    finally:
        server.process.send_signal(signal.SIGCONT)
        worker.send_signal(signal.SIGTERM)
        worker.wait(20)
        server.stop()


def test_an_upload_is_counted_once_per_status_it_enters(redis: Redis) -> None:
    """uploads_total counts the statuses uploads enter: not again for a job that finds its upload already
    recognized, not `failed` for an attempt RQ will retry (the upload stays queued), `failed` at the last one."""
    from rq import Retry

    from telemetry import metrics
    from telemetry.worker import MeasuredJob

    def counted(status: str) -> float:
        return metrics.UPLOADS.labels(status)._value.get()

    accepted, failed = counted("accepted"), counted("failed")
    queue = Queue("ocr", connection=redis, job_class=MeasuredJob)
    rerun = queue.enqueue("telemetry_jobs.already_accepted", "01JWORKERUPLOADD00000000000")
    assert rerun.perform()["status"] == "accepted"
    assert counted("accepted") == accepted

    broken = queue.enqueue("telemetry_jobs.broken", "01JWORKERUPLOADE00000000000", retry=Retry(max=1))
    with pytest.raises(ValueError):
        broken.perform()  # RQ will run it again
    assert counted("failed") == failed
    broken.retries_left = 0
    with pytest.raises(ValueError):
        broken.perform()  # the last attempt: the job marks the upload failed
    assert counted("failed") == failed + 1
