#!/usr/bin/env python3
"""Load on the phone channel: N concurrent scripted calls against one `run_gateway.py ivr` process.

Starts a private redis-server (a real one, on a free loopback port), generates a registry of N
bureaux, starts the FastAGI server as a subprocess, then places N calls at once with the scripted
Asterisk peer (tests/agi_peer.py), each reporting a whole first-round return. Prints:
- completed calls per second (wall clock, first connect to last close);
- the server's own per-command turnaround, p50/p99 (from its SIGUSR1 stats line): commands that
  followed the previous answer directly, and those the result of work in a thread decided (PIN
  check, journal read and write, Redis lookups), apart and together;
- per kind of work: how long it took, and how long callers were held (silences, "Veuillez
  patienter.") past the speech that covered it: the wait a caller hears when work queues;
- the turnaround the peers saw (answer sent → next command read, including both kernels);
- memory per call: the server's peak RSS during the run minus its RSS before, over the number
  of calls in progress at that peak;
- correctness: every call accepted with its own receipt and journaled, no sound outside the
  catalog, no protocol violation.

    .venv/bin/python bench/ivr_load.py --calls 1000
    .venv/bin/python bench/ivr_load.py --calls 1000 --answer-delay 0.05   # calls held open ~4 s each
    .venv/bin/python bench/ivr_load.py --calls 1000 --rate 15 --answer-delay 0.05  # a steady arrival

`--answer-delay` makes the peer wait before answering each playing command, as a caller listens
to a prompt, so that all calls are in progress at once (for the memory figure).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from agi_peer import AsteriskPeer, CallRecord, press  # noqa: E402

from ivr import prompts  # noqa: E402
from registry.demo import generate  # noqa: E402
from returns_queue.journal import Journal  # noqa: E402

COUNTS = [250, 5, 245, 70, 5, 90, 40, 25, 15]  # primaire-2011-t1, in the form's order; they add up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(port: int, process: subprocess.Popen[bytes] | None, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class RSSWatcher(threading.Thread):
    """Samples the server's RSS and how many calls are connected, every 50 ms."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.process, self.port = psutil.Process(pid), port
        self.samples: list[tuple[int, int]] = []  # (rss, connections)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                rss = self.process.memory_info().rss
                connections = sum(1 for c in self.process.net_connections("tcp")
                                  if c.status == "ESTABLISHED" and c.laddr.port == self.port)
            except psutil.Error:
                return
            self.samples.append((rss, connections))
            self.stop.wait(0.05)


async def place_calls(port: int, scripts: list[list[object]], answer_delay: float, catalog: frozenset[str],
                      rate: float) -> tuple[list[CallRecord | BaseException], float]:
    async def one(i: int, script: list[object]) -> CallRecord:
        peer = AsteriskPeer(script, sounds=catalog, callerid=f"06{i:08d}", answer_delay=answer_delay,
                            io_timeout=120.0)
        if rate > 0:  # calls arriving at `rate` per second rather than all in the same instant
            await asyncio.sleep(i / rate)
        return await peer.call("127.0.0.1", port)

    started = time.perf_counter()
    results = await asyncio.gather(*(one(i, s) for i, s in enumerate(scripts)), return_exceptions=True)
    return list(results), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--answer-delay", type=float, default=0.0, help="seconds per prompt (default 0)")
    parser.add_argument("--scrypt-n", type=int, default=2**14, help="PIN hash cost (default: production, 2**14)")
    parser.add_argument("--threads", type=int, default=32, help="the server's thread pool")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="calls arriving per second (default 0: all at once)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # both ends hold a socket per call
    work = Path(tempfile.mkdtemp(prefix="ivr-load-"))
    redis_port, agi_port = free_port(), free_port()
    redis_process = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(work), "--appendonly", "yes",
         "--appendfsync", "everysec", "--save", "", "--logfile", str(work / "redis.log")])
    server: subprocess.Popen[bytes] | None = None
    try:
        wait_for(redis_port, None)
        started = time.perf_counter()
        generate(args.calls, work / "registry.csv", work / "pins.csv", scrypt_n=args.scrypt_n)
        pins = dict(line.split(",") for line in (work / "pins.csv").read_text().splitlines()[1:])
        print(f"registry: {args.calls} bureaux, scrypt n={args.scrypt_n} ({time.perf_counter() - started:.1f} s)")
        db_url = f"sqlite:///{work / 'journal.sqlite3'}"
        env = {**os.environ, "REMONTEE_VAR_DIR": str(work), "REMONTEE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "REMONTEE_DB_URL": db_url, "REMONTEE_REGISTRY": str(work / "registry.csv"),
               "REMONTEE_ELECTION": "primaire-2011-t1", "REMONTEE_AGI_PORT": str(agi_port)}
        argv = [sys.executable, str(ROOT / "run_gateway.py"), "ivr", "--threads", str(args.threads)]
        with (work / "ivr.log").open("wb") as server_log:
            server = subprocess.Popen(argv, env=env, cwd=work, stdout=subprocess.PIPE, stderr=server_log)
        wait_for(agi_port, server)
        time.sleep(0.5)
        baseline = psutil.Process(server.pid).memory_info().rss
        watcher = RSSWatcher(server.pid, agi_port)
        watcher.start()

        scripts = [[press(code + "#"), press(pin + "#"), *[press(f"{n}#") for n in COUNTS], press("1")]
                   for code, pin in pins.items()]
        results, elapsed = asyncio.run(place_calls(agi_port, scripts, args.answer_delay,
                                                   frozenset(prompts.catalog()), args.rate))
        watcher.stop.set()
        watcher.join()

        cpu = psutil.Process(server.pid).cpu_times()
        server.send_signal(signal.SIGUSR1)
        assert server.stdout is not None
        stats = json.loads(server.stdout.readline())["ivr_stats"]
        records = [r for r in results if isinstance(r, CallRecord)]
        failures = [r for r in results if not isinstance(r, CallRecord)]
        accepted = [r for r in records if r.outcome == "accepted" and not r.missing]
        receipts = {r.receipt for r in accepted}
        journal = Journal(db_url)
        journaled = {e.receipt for e in journal.entries("primaire-2011-t1") if e.status == "accepted"}
        journal.dispose()
        client_turnaround = [t for r in records for t in r.turnarounds]
        # Memory per call: the RSS when the most calls were connected at once, over that number.
        busiest_rss, most_calls = max(watcher.samples, key=lambda s: (s[1], s[0])) if watcher.samples else (baseline, 0)
        peak_rss = max((r for r, _ in watcher.samples), default=baseline)

        arrival = f"arriving at {args.rate:g}/s" if args.rate else "placed at once"
        print(f"calls: {args.calls} {arrival}, answer delay {args.answer_delay * 1000:.0f} ms per prompt, "
              f"{args.threads} server threads")
        print(f"  completed and accepted : {len(accepted)} / {args.calls}  (exceptions {len(failures)}, "
              f"other outcomes {len(records) - len(accepted)})")
        print(f"  distinct receipts      : {len(receipts)}; all in the journal as accepted: {receipts <= journaled}")
        print(f"  protocol violations    : {stats['violations']}, timeouts {stats['timeouts']}")
        print(f"  wall time              : {elapsed:.2f} s → {len(accepted) / elapsed:.1f} calls/s; server CPU "
              f"{cpu.user + cpu.system:.1f} s ({(cpu.user + cpu.system) / max(1, len(accepted)) * 1000:.1f} ms a call)")
        per_call = stats["commands"] / max(1, len(records))
        print(f"  commands               : {stats['commands']} ({per_call:.0f} per call)")
        for key, label in (("turnaround", "direct"), ("turnaround_after_thread", "after a thread"),
                           ("turnaround_all", "all")):
            s = stats[key]
            if s.get("count"):
                print(f"  server turnaround {label:<15}: p50 {s['p50_ms']:.2f} ms, p99 {s['p99_ms']:.2f} ms, "
                      f"max {s['max_ms']:.1f} ms  (n={s['count']})")
        for kind, w in stats.get("work", {}).items():
            took, held = w["took"], w["held"]
            if took.get("count"):
                print(f"  work {kind:<18}: took p50 {took['p50_ms']:.1f} ms, p99 {took['p99_ms']:.1f} ms, "
                      f"max {took['max_ms']:.0f} ms; held past its speech: {w['held_calls']} of {took['count']}, "
                      f"p99 {held['p99_ms']:.0f} ms, max {held['max_ms']:.0f} ms")
        print(f"  peer-seen turnaround   : p50 {percentile(client_turnaround, 0.5) * 1000:.2f} ms, "
              f"p99 {percentile(client_turnaround, 0.99) * 1000:.2f} ms")
        print(f"  server RSS             : {baseline / 2**20:.1f} MiB idle, {busiest_rss / 2**20:.1f} MiB with "
              f"{most_calls} calls connected at once, peak {peak_rss / 2**20:.1f} MiB")
        if most_calls:
            print(f"  memory per call        : {(busiest_rss - baseline) / most_calls / 1024:.1f} KiB")
        if failures:
            print(f"  first exception: {failures[0]!r}")
        odd = [r for r in records if r.outcome != "accepted" or r.missing]
        if odd:
            r = odd[0]
            print(f"  first odd call: outcome {r.outcome}, missing {r.missing[:3]}, ended {r.ended}, "
                  f"last commands {r.commands[-3:]}")
        ok = len(accepted) == args.calls and len(receipts) == args.calls and receipts <= journaled
        print(f"  statistics: median call length {statistics.median(len(r.commands) for r in records):.0f} commands")
        return 0 if ok and stats["violations"] == 0 else 1
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
        redis_process.terminate()
        redis_process.wait(10)
        if args.keep:
            print(f"working directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


if __name__ == "__main__":
    sys.exit(main())
