#!/usr/bin/env python3
"""Load benchmark of the pen upload API: concurrent signed uploads of ~300 KB PNG pages against gunicorn.

Starts everything itself on loopback: a private redis-server (AOF, everysec, like `run_gateway.py
all`), a temporary var/ (journal SQLite with synchronous=FULL, raw storage fsynced), a registered
docking station, and `run_gateway.py pen` on a free port. Then client processes (each with
several threads, one keep-alive connection per thread) send unique signed uploads as fast as the
gateway answers, for a bounded count and time. Prints accepted uploads per second, latency
percentiles, CPU seconds per upload on each side, and checks afterwards that every 202 is in the
journal, on disk and on the `ocr` queue.

    .venv/bin/python bench/upload_load.py                      # defaults: 3000 uploads, 64 connections
    .venv/bin/python bench/upload_load.py --uploads 6000 --connections 96 --workers 2 --threads 32

The client runs on the same 2 cores as the gateway: its CPU is reported so you can see how much
of the machine it took.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pen_helpers import PenClient, encode_multipart, scribbled_page  # noqa: E402

from pen_gateway.signing import sign  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_of_about(target: int) -> bytes:
    """A synthetic A4 scan at 300 dpi whose PNG is about `target` bytes."""
    strokes = 1500
    for _ in range(8):
        data = scribbled_page(2480, 3508, strokes=strokes, seed=42)
        if abs(len(data) - target) < target * 0.08:
            return data
        strokes = max(50, int(strokes * target / len(data)))
    return data


def unique_variant(png: bytes, tag: str) -> bytes:
    """The same page with a tEXt chunk before IEND: a valid PNG with its own SHA-256 (no dedup)."""
    payload = b"remontee-bench\x00" + tag.encode()
    chunk = struct.pack(">I", len(payload)) + b"tEXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + payload) & 0xFFFFFFFF)
    return png[:-12] + chunk + png[-12:]


def client_process(url: str, station: str, secret: str, png: bytes, count: int, threads: int, offset: int,
                   deadline: float, out: Any) -> None:
    """Send `count` uploads over `threads` connections; put (status, latency) pairs on `out`."""
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    counter = iter(range(count))

    def worker() -> None:
        client = PenClient(url, station, secret, timeout=60)
        local: list[tuple[int, float]] = []
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            n = offset + i
            page = unique_variant(png, f"{n}")
            body, content_type = encode_multipart({"station_id": station, "pen_serial": f"PEN-{n % 997:04d}",
                                                   "bureau": f"{750000 + n % 9000}"}, "page.png", "image/png", page)
            timestamp = int(time.time())
            headers = {"Content-Type": content_type, "X-Remontee-Station": station,
                       "X-Remontee-Timestamp": str(timestamp), "Idempotency-Key": f"bench-{n}",
                       "X-Remontee-Signature": sign(secret, timestamp, hashlib.sha256(body).hexdigest())}
            started = time.perf_counter()
            try:
                status = client.send("POST", "/api/v1/uploads", body, headers).status
            except OSError:
                status = 0
            local.append((status, time.perf_counter() - started))
        client.close()
        with lock:
            results.extend(local)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    usage = os.times()
    out.put((results, usage.user + usage.system))


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def gunicorn_pids(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children")
    kids = [int(p) for p in children.read_text().split()] if children.exists() else []
    return [master, *kids]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=3000, help="uploads to send (default 3000)")
    parser.add_argument("--seconds", type=float, default=60, help="stop sending after this long (default 60)")
    parser.add_argument("--connections", type=int, default=64, help="concurrent connections (default 64)")
    parser.add_argument("--client-processes", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--threads", type=int, default=24, help="threads per gunicorn worker (default 24)")
    parser.add_argument("--page-bytes", type=int, default=300_000, help="PNG size to aim for (default 300000)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line")
    parser.add_argument("--keep-log", type=Path, help="copy the gateway's log there before cleaning up")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed (make setup installs it)")

    work = Path(tempfile.mkdtemp(prefix="remontee-upload-bench-", dir=ROOT / "var" if (ROOT / "var").is_dir()
                                 else None))
    var_dir = work / "var"
    var_dir.mkdir()
    redis_port, pen_port = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(work), "--appendonly", "yes",
         "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--logfile", str(work / "redis.log")])
    env = {**os.environ, "REMONTEE_VAR_DIR": str(var_dir), "REMONTEE_REDIS_URL": redis_url,
           "REMONTEE_PEN_PORT": str(pen_port), "REMONTEE_BIND": "127.0.0.1"}
    pen_proc = None
    try:
        added = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "stations", "add", "bench-station"],
                               env=env, capture_output=True, text=True, check=True)
        secret = added.stdout.strip().splitlines()[-1]
        log = open(work / "pen.log", "wb")  # noqa: SIM115  (lives as long as the server)
        pen_proc = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "pen", "--workers",
                                     str(args.workers), "--threads", str(args.threads)], env=env, stdout=log,
                                    stderr=log)
        url = f"http://127.0.0.1:{pen_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", pen_port), timeout=1):
                    break
            except OSError:
                if pen_proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the gateway did not start; see {work / 'pen.log'}") from None
                time.sleep(0.1)
        time.sleep(1.0)  # let every worker finish loading the app

        png = page_of_about(args.page_bytes)
        # Warm-up: a few uploads so each worker has imported and connected everything.
        warm = PenClient(url, "bench-station", secret)
        for i in range(8):
            warm.upload(unique_variant(png, f"warm-{i}"), "image/png", pen_serial="PEN-WARM")
        warm.close()

        procs = max(1, args.client_processes)
        per_proc = [args.uploads // procs + (1 if i < args.uploads % procs else 0) for i in range(procs)]
        threads = [args.connections // procs + (1 if i < args.connections % procs else 0) for i in range(procs)]
        queue: Any = multiprocessing.get_context("fork").Queue()
        server_pids = gunicorn_pids(pen_proc.pid)
        server_cpu_before = cpu_seconds(server_pids)
        redis_cpu_before = cpu_seconds([redis_proc.pid])
        send_deadline = time.time() + args.seconds
        started = time.perf_counter()
        clients = [multiprocessing.get_context("fork").Process(
            target=client_process,
            args=(url, "bench-station", secret, png, per_proc[i], max(1, threads[i]), sum(per_proc[:i]),
                  send_deadline, queue)) for i in range(procs)]
        for c in clients:
            c.start()
        gathered = [queue.get() for _ in clients]
        elapsed = time.perf_counter() - started
        for c in clients:
            c.join()
        server_cpu = cpu_seconds(server_pids) - server_cpu_before
        redis_cpu = cpu_seconds([redis_proc.pid]) - redis_cpu_before
        client_cpu = sum(cpu for _, cpu in gathered)
        results = [r for rs, _ in gathered for r in rs]

        accepted = [latency for status, latency in results if status == 202]
        statuses: dict[int, int] = {}
        for status, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
        latencies = sorted(accepted) or [0.0]

        # Every 202 must be journaled, stored and queued (the durability the 202 promises).
        from redis import Redis
        from sqlalchemy import func, select

        from pen_gateway.uploads import uploads
        from returns_queue.jobs import ocr_queue
        from returns_queue.journal import Journal

        journal = Journal(f"sqlite:///{var_dir / 'journal.sqlite3'}")
        with journal.read() as conn:
            rows = conn.execute(select(func.count()).select_from(uploads)).scalar_one() - 8
        files = sum(1 for p in (var_dir / "uploads" / "raw").rglob("*") if p.is_file()) - 8
        jobs = ocr_queue(Redis.from_url(redis_url)).count - 8
        journal.dispose()

        figures = {
            "uploads_sent": len(results), "accepted_202": len(accepted), "statuses": statuses,
            "page_bytes": len(png), "seconds": round(elapsed, 2),
            "accepted_per_second": round(len(accepted) / elapsed, 1),
            "mb_per_second": round(len(accepted) * len(png) / elapsed / 1e6, 1),
            "latency_ms": {"p50": round(1000 * statistics.median(latencies), 1),
                           "p90": round(1000 * latencies[int(0.90 * (len(latencies) - 1))], 1),
                           "p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
                           "max": round(1000 * latencies[-1], 1)},
            "cpu_ms_per_upload": {"gateway": round(1000 * server_cpu / max(1, len(results)), 2),
                                  "redis": round(1000 * redis_cpu / max(1, len(results)), 2),
                                  "client": round(1000 * client_cpu / max(1, len(results)), 2)},
            "cpu_share_of_2_cores": {"gateway": round(server_cpu / elapsed / 2, 2),
                                     "client": round(client_cpu / elapsed / 2, 2)},
            "durable": {"journal_rows": rows, "stored_files": files, "ocr_jobs": jobs},
            "config": {"workers": args.workers, "threads": args.threads, "connections": args.connections,
                       "client_processes": procs},
        }
        print(f"pen upload API, gunicorn {args.workers} workers x {args.threads} threads, "
              f"{args.connections} connections from {procs} client processes, pages of {len(png)} bytes")
        print(f"  accepted (202)     {len(accepted)} of {len(results)} in {elapsed:.1f} s: "
              f"{figures['accepted_per_second']} uploads/s ({figures['mb_per_second']} MB/s)")
        print(f"  statuses           {statuses}")
        lat = figures["latency_ms"]
        print(f"  latency ms         p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
        cpu = figures["cpu_ms_per_upload"]
        print(f"  CPU ms per upload  gateway {cpu['gateway']}  redis {cpu['redis']}  client {cpu['client']}  "
              f"(gateway used {100 * figures['cpu_share_of_2_cores']['gateway']:.0f}% and the client "
              f"{100 * figures['cpu_share_of_2_cores']['client']:.0f}% of the 2 cores)")
        print(f"  durable after 202  journal rows {rows}, stored files {files}, ocr jobs {jobs}")
        if args.json:
            print(json.dumps(figures))
        return 0 if rows == files == jobs == len(accepted) else 1
    finally:
        if pen_proc is not None:
            pen_proc.terminate()
            pen_proc.wait(20)
        redis_proc.terminate()
        redis_proc.wait(10)
        if args.keep_log is not None and (work / "pen.log").exists():
            shutil.copyfile(work / "pen.log", args.keep_log)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
