"""No RQ work horse outlives its worker (returns_queue/worker.py): a real `run_gateway.py worker` on the real
redis-server, a job that sleeps, then the worker SIGKILLed, or its supervisor stopped: the horse is gone too.
Nor does the scheduler an `ocr` worker runs for its jobs' retries. And the job a killed worker leaves behind is
run again without waiting for RQ's maintenance."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry
from test_run_gateway import ROOT, alive, descendants

from forms import Election
from pen_gateway.ocr_relay import OcrRelay
from pen_gateway.uploads import Upload, create_tables, record_upload
from registry import Registry
from returns_queue.consolidation import latest_returns
from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE, ocr_job_id, return_job_id
from returns_queue.journal import Journal
from returns_queue.relay import Relay
from validation import check_return, new_return


def _env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
    env.update({"REMONTEE_REDIS_URL": redis_url, "REMONTEE_VAR_DIR": str(tmp_path / "var"),
                "REMONTEE_WORKER_METRICS_PORT": "0", "REMONTEE_LOG_FORMAT": "text"})
    return env


def _leads_its_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def _horse_of(worker_pid: int, timeout: float = 30.0) -> int:
    """The work horse the worker forked for the sleeping job (a process group of its own, unlike RQ's scheduler)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        horses = [pid for pid in descendants(worker_pid) if alive(pid) and _leads_its_group(pid)]
        if horses:
            return horses[0]
        time.sleep(0.1)
    raise AssertionError("the worker forked no work horse")


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def _kill_all(process: subprocess.Popen, family: set[int]) -> None:
    """What a failed test leaves running: the process, its descendants, and those seen before it died."""
    if process.poll() is None:
        family |= descendants(process.pid)
        process.kill()
        process.wait()
    for pid in family:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def _sleeping_job(redis: Redis) -> None:
    Queue(RETURNS_QUEUE, connection=redis).enqueue("time.sleep", 300, job_timeout=600)


def test_a_worker_killed_mid_job_takes_its_work_horse_with_it(tmp_path: Path, redis: Redis, redis_server) -> None:
    worker = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "worker", "--queues", RETURNS_QUEUE],
                              cwd=ROOT, env=_env(tmp_path, redis_server.url), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    horse = None
    try:
        _sleeping_job(redis)
        horse = _horse_of(worker.pid)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        assert _gone(horse), f"work horse {horse} outlived its worker"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        if horse is not None and alive(horse):
            os.kill(horse, signal.SIGKILL)


def test_an_ocr_worker_runs_retries_when_due_and_its_scheduler_dies_with_it(
    tmp_path: Path, redis: Redis, redis_server
) -> None:
    """An `ocr` job's retry waits minutes in RQ's scheduled registry (pen_gateway/ocr_relay.py): only RQ's scheduler
    enqueues it when due, and a worker that ran none left it there for good. The scheduler is a process of the
    worker's own, which must not outlive it any more than a work horse."""
    worker = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "worker", "--queues", OCR_QUEUE],
                              cwd=ROOT, env=_env(tmp_path, redis_server.url), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    family: set[int] = set()
    try:
        Queue(OCR_QUEUE, connection=redis).enqueue_in(timedelta(seconds=1), "time.sleep", 300, job_timeout=600)
        horse = _horse_of(worker.pid, timeout=60)  # the scheduled job was enqueued when due, and runs
        family = {pid for pid in descendants(worker.pid) if alive(pid)}
        assert len(family) >= 2, "a work horse and RQ's scheduler"
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(10)
        assert _gone(horse)
        assert not [pid for pid in family if not _gone(pid)], "RQ's scheduler outlived its worker"
    finally:
        _kill_all(worker, family)


def test_stopping_the_supervisor_leaves_no_work_horse_behind(tmp_path: Path, redis: Redis, redis_server) -> None:
    # The supervisor of `run_gateway.py all`, with one worker and a short grace: the worker's warm shutdown waits
    # for the sleeping job, the grace runs out, the worker is killed, and its horse must go with it.
    script = textwrap.dedent("""
        import sys
        from run_gateway import Service, Supervisor
        from settings import Settings
        service = Service("worker-returns", ("worker", "--queues", "returns"), "")
        sys.exit(Supervisor(Settings.from_env(), [service], stop_grace=1.0).run())
    """)
    supervisor = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path, redis_server.url),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: set[int] = set()
    try:
        _sleeping_job(redis)
        deadline = time.monotonic() + 30
        while not (workers := [p for p in descendants(supervisor.pid) if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert workers, "the supervisor started no worker"
        horse = _horse_of(min(workers))
        family = descendants(supervisor.pid)
        assert horse in family
        supervisor.send_signal(signal.SIGTERM)
        assert supervisor.wait(30) == 0
        assert _gone(horse), f"work horse {horse} outlived the stopped supervisor"
        assert not [pid for pid in family if alive(pid)]
    finally:
        _kill_all(supervisor, family)


def test_the_jobs_of_a_worker_killed_mid_job_run_again_at_the_next_reconciliation(
    tmp_path: Path, redis: Redis, redis_server, registry: Registry, election_t1: Election
) -> None:
    """A worker killed in the middle of a job (SIGKILL, the OOM killer, a power cut) takes its horse with it and leaves
    the job `started`. RQ retries such a job once its execution's heartbeat has expired (about 90 s), but only at a
    worker's maintenance, every ten minutes, and the worker restarted in its place ran its own at start, before then:
    an acknowledged return went uncounted and an upload stayed `queued` for up to ten minutes more. Each relay's
    reconciliation now hands them back to RQ's retries."""
    journal = Journal(f"sqlite:///{tmp_path / 'journal.sqlite3'}")
    create_tables(journal)
    code = sorted(registry.bureaux)[0]
    counts = {"votants": 250, "blancs_nuls": 5, "exprimes": 245, "aubry": 70, "baylet": 5, "hollande": 90,
              "montebourg": 40, "royal": 25, "valls": 15}
    ret = new_return(election_t1, code, counts, "ivr", {"call_id": "c-1", "caller_id": "anonymous"})
    assert journal.submit(ret, check_return(ret, election_t1, registry.get(code))).status == "accepted"
    upload_id = "01JKILLEDWORKERUPLOAD000000"
    with journal.write() as conn:
        record_upload(conn, Upload(upload_id, "0" * 64, Path("/nonexistent"), "image/png", 10, "dock-1", "PEN-1",
                                   code, None, "queued", None, None, None, time.time() - 60))
    returns_relay = Relay(journal, redis, "slow_jobs.consolidate_after_a_wait")
    ocr_relay = OcrRelay(journal, redis, "slow_jobs.recognize_after_a_wait")
    env = {**_env(tmp_path, redis_server.url),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}

    def worker(queue: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "worker", "--queues", queue],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    workers = [worker(RETURNS_QUEUE), worker(OCR_QUEUE)]
    family: set[int] = set()
    try:
        assert returns_relay.relay_once() == 1 and ocr_relay.relay_once() == 1
        horses = [_horse_of(w.pid, timeout=60) for w in workers]
        family = {pid for w in workers for pid in descendants(w.pid)}
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)
            w.wait(10)
        assert all(_gone(h) for h in horses)
        workers = [worker(RETURNS_QUEUE), worker(OCR_QUEUE)]  # restarted, as the supervisor does
        jobs = {RETURNS_QUEUE: return_job_id(ret.return_id), OCR_QUEUE: ocr_job_id(upload_id)}
        # Read without RQ's cleanup (which `count` and `get_job_ids` would run): until both executions have expired.
        deadline = time.monotonic() + 180
        while not all(job_id in StartedJobRegistry(queue, connection=redis).get_expired_job_ids()
                      for queue, job_id in jobs.items()):
            assert time.monotonic() < deadline, "the killed workers' executions never expired"
            time.sleep(1)
        returns_relay.reconcile()
        ocr_relay.reconcile()
        deadline = time.monotonic() + 60
        while code not in latest_returns(redis, election_t1.id):
            assert time.monotonic() < deadline, "the return of the killed worker's job was never counted"
            time.sleep(0.2)
        # The OCR job waits for its retry's interval (pen_gateway/ocr_relay.py), no longer as started.
        assert Job.fetch(jobs[OCR_QUEUE], connection=redis).get_status() == JobStatus.SCHEDULED
    finally:
        for w in workers:
            _kill_all(w, family)
