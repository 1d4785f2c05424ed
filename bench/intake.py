#!/usr/bin/env python3
"""Returns per second through normalize → validate → journal (durable) → relay → RQ, on this machine.

Starts a private redis-server (AOF, appendfsync everysec as in production) and a fresh SQLite
journal in a temp dir. Each submitter thread stands for one channel process handling returns one
by one, acknowledging only after its commit is on disk.

    .venv/bin/python bench/intake.py [--returns 3000] [--threads 4]
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis import Redis

from forms import load_election
from registry import Bureau, Registry
from returns_queue.journal import Journal
from returns_queue.relay import Relay
from validation import check_return, new_return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--returns", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="remontee-bench-"))
    port = free_port()
    redis_proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                                   "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                                  stdout=subprocess.DEVNULL)
    try:
        redis = Redis(port=port)
        for _ in range(100):
            try:
                redis.ping()
                break
            except Exception:
                time.sleep(0.05)
        election = load_election("primaire-2011-t1")
        registry = Registry({str(100000 + i): Bureau(str(100000 + i), "B", "C", "D", 1500, "x", (), ())
                             for i in range(args.returns)})
        journal = Journal(f"sqlite:///{tmp / 'journal.sqlite3'}")
        relay = Relay(journal, redis, "returns_queue.consolidation.consolidate")
        stop = threading.Event()
        relay_thread = relay.start(stop)

        rng = random.Random(1)
        raw = []
        for code in registry.bureaux:
            votes = [rng.randint(0, 200) for _ in election.candidates]
            blancs = rng.randint(0, 20)
            counts = {"votants": f"{sum(votes) + blancs:04d}", "blancs_nuls": str(blancs), "exprimes": sum(votes)}
            counts.update(zip(election.candidate_ids, map(str, votes), strict=True))
            raw.append((code, counts))

        latencies: list[float] = []
        lock = threading.Lock()

        def submitter(items: list[tuple[str, dict[str, object]]]) -> None:
            mine = []
            for code, counts in items:
                t0 = time.perf_counter()
                ret = new_return(election, code, counts, "ivr", {"call_id": code})
                submission = journal.submit(ret, check_return(ret, election, registry.get(code)))
                assert submission.status == "accepted", submission
                relay.wakeup.set()
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        chunks = [raw[i :: args.threads] for i in range(args.threads)]
        started = time.perf_counter()
        threads = [threading.Thread(target=submitter, args=(c,)) for c in chunks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        acked = time.perf_counter() - started
        while redis.llen("rq:queue:returns") < args.returns:
            time.sleep(0.01)
        queued = time.perf_counter() - started
        stop.set()
        relay.wakeup.set()
        relay_thread.join()

        latencies.sort()
        print(f"returns: {args.returns}, submitter threads: {args.threads}, journal: SQLite WAL synchronous=FULL")
        print(f"acknowledged (durable) per second: {args.returns / acked:.0f}")
        print(f"on the RQ 'returns' queue per second (end to end): {args.returns / queued:.0f}")
        print(f"ack latency p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99)] * 1000:.1f} ms")
    finally:
        redis_proc.terminate()
        redis_proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
