#!/usr/bin/env python3
"""What the telemetry costs: one observation in memory and in multiprocess mode, one scrape, folding a horse's files.

    .venv/bin/python bench/telemetry.py [--workers 2] [--returns 10000] [--uploads 5000]

Runs in fresh processes (prometheus_client picks its storage at import): the in-memory figures as
the IVR pays them, the multiprocess ones as a gunicorn worker or an RQ horse pays them. The scrape
of the review UI's /metrics reads a journal of `--returns` returns (a tenth in review) and
`--uploads` upload rows, and Redis queues; it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OBSERVE = """
import json, os, sys, time
sys.path.insert(0, {root!r})
if {multiprocess}:
    from telemetry import multiprocess
    multiprocess.enable(__import__("pathlib").Path({directory!r}), wipe=True)
from telemetry import metrics
from telemetry.ivr import observe_turnaround
n = 200_000
t = time.perf_counter()
for i in range(n):
    observe_turnaround(0.0004, False)
turnaround = (time.perf_counter() - t) / n
child = metrics.HTTP_SECONDS.labels("pen", "api.create_upload", "202")
t = time.perf_counter()
for i in range(n):
    child.observe(0.012)
request = (time.perf_counter() - t) / n
counter = metrics.UPLOADS.labels("queued")
t = time.perf_counter()
for i in range(n):
    counter.inc()
inc = (time.perf_counter() - t) / n
print(json.dumps({{"turnaround_observe_us": turnaround * 1e6, "request_observe_us": request * 1e6,
                  "counter_inc_us": inc * 1e6}}))
"""


def observe_costs(directory: str) -> dict[str, dict[str, float]]:
    figures = {}
    for mode, flag in (("in memory (IVR)", False), ("multiprocess (gunicorn, RQ)", True)):
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        code = OBSERVE.format(root=str(ROOT), multiprocess=flag, directory=directory)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        figures[mode] = json.loads(out.stdout)
    return figures


SCRAPE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from telemetry import multiprocess
directory = multiprocess.enable(Path({directory!r}), wipe=False)
from redis import Redis
from returns_queue.journal import Journal
from telemetry.exposition import render
from telemetry.state import StateCollector
journal, redis = Journal({db_url!r}), Redis.from_url({redis_url!r})
state = StateCollector(journal, redis)
timings = {{}}
for name, collectors in (("files only", []), ("files + state (review UI)", [state])):
    render(collectors)
    samples = []
    for _ in range(20):
        t = time.perf_counter()
        body, _ = render(collectors)
        samples.append(time.perf_counter() - t)
    samples.sort()
    timings[name] = {{"median_ms": samples[10] * 1000, "max_ms": samples[-1] * 1000, "bytes": len(body)}}
t = time.perf_counter()
folded = multiprocess.absorb_dead_processes(directory)
timings["absorb"] = {{"processes": folded, "ms": (time.perf_counter() - t) * 1000}}
print(json.dumps(timings))
"""

HORSE = """
import sys
from pathlib import Path
sys.path.insert(0, {root!r})
from telemetry import multiprocess
multiprocess.enable(Path({directory!r}), wipe=False)
from telemetry import metrics
for status in ("review", "accepted"):
    metrics.OCR_SECONDS.labels(status).observe(2.5)
    metrics.UPLOADS.labels(status).inc()
    metrics.JOB_SECONDS.labels("ocr", "ok").observe(2.5)
for code in ("202", "401", "422"):
    metrics.HTTP_SECONDS.labels("pen", "api.create_upload", code).observe(0.02)
"""


def scrape_costs(args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    import shutil

    from redis import Redis

    from forms import load_election
    from pen_gateway.uploads import Upload, create_tables, record_upload
    from returns_queue.journal import Journal
    from validation import check_return, new_return

    directory = tmp / "metrics"
    directory.mkdir()
    # `--workers` processes that wrote metrics and exited, as gunicorn workers or RQ horses leave them.
    for _ in range(args.workers):
        subprocess.run([sys.executable, "-c", HORSE.format(root=str(ROOT), directory=str(directory))], check=True)
    socket_path = tmp / "redis.sock"
    redis_server = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", "0", "--unixsocket",
                                     str(socket_path), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        while not socket_path.exists():
            time.sleep(0.05)
        redis_url = f"unix://{socket_path}"
        db_url = f"sqlite:///{tmp / 'journal.sqlite3'}"
        journal = Journal(db_url)
        create_tables(journal)
        election = load_election("primaire-2011-t1")
        good = {"votants": 250, "blancs_nuls": 5, "exprimes": 245, "aubry": 70, "baylet": 5, "hollande": 90,
                "montebourg": 40, "royal": 25, "valls": 15}
        for i in range(args.returns):
            counts = good if i % 10 else {**good, "votants": 251}
            ret = new_return(election, f"{i:06d}", counts, "ivr", {"call_id": str(i), "caller_id": "anonymous"})
            journal.submit(ret, check_return(ret, election, None) if i % 10 == 0 else [])
        with journal.write() as conn:
            for i in range(args.uploads):
                record_upload(conn, Upload(f"U{i:025d}", "0" * 64, Path("/x"), "image/png", 1, "s", "p", None, None,
                                           ("queued", "accepted", "review")[i % 3], None, None, None, time.time()))
        redis = Redis.from_url(redis_url)
        for _ in range(500):
            redis.rpush("rq:queue:ocr", "x")
        code = SCRAPE.format(root=str(ROOT), directory=str(directory), db_url=db_url, redis_url=redis_url)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        journal.dispose()
        return json.loads(out.stdout)
    finally:
        redis_server.terminate()
        redis_server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="processes whose metric files a scrape reads")
    parser.add_argument("--returns", type=int, default=10_000)
    parser.add_argument("--uploads", type=int, default=5_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("cost of one observation, µs:")
        for mode, figures in observe_costs(str(Path(tmp) / "observe")).items():
            print(f"  {mode:<28} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
        figures = scrape_costs(args, Path(tmp))
        print(f"scrape ({args.workers} processes' files, journal of {args.returns} returns, "
              f"{args.uploads} uploads):")
        for name, value in figures.items():
            print(f"  {name:<28} " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in value.items()))


if __name__ == "__main__":
    main()
