#!/usr/bin/env python3
"""The raw disk's rate of durable ~300 KB files, without the gateway: the ceiling for `bench/upload_load.py`.

Each mode writes unique files of `--bytes` bytes into a fresh directory next to var/ (same
filesystem as the gateway's uploads) and makes them durable a different way:

- `fsync`: one thread, write + fsync + rename + directory fsync per file (what one request costs alone);
- `fsync-threads`: `--threads` threads doing the same at once (what the old gateway did, per request);
- `fdatasync-threads`: the same with fdatasync, and the directory synced once per batch;
- `syncfs-batch`: `--threads` threads write, then one syncfs + one directory fsync for `--batch` files
  (group commit for files);
- `fdatasync-batch`: `--threads` threads write; one thread fdatasyncs the batch's files, then one
  directory fsync for the batch.

    .venv/bin/python bench/disk_fsync.py --seconds 5
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBC = ctypes.CDLL(None, use_errno=True)  # syncfs(2): not in Python's os module


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(directory: Path, name: str, data: bytes, sync: str | None) -> int:
    """Write `data` to a temporary name then rename it; returns the fd if it is to be synced later."""
    temporary = directory / f".{name}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, data)
    if sync == "fsync":
        os.fsync(fd)
    elif sync == "fdatasync":
        os.fdatasync(fd)
    os.rename(temporary, directory / name)
    return fd


def per_file(directory: Path, data: bytes, seconds: float, threads: int, sync: str, dir_each: bool) -> float:
    counter = iter(range(10**9))
    lock = threading.Lock()
    done = [0]
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
            os.close(write_file(directory, f"{n:08d}", data, sync))
            if dir_each:
                fsync_dir(directory)
            with lock:
                done[0] += 1

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return done[0] / (time.perf_counter() - started)


def batched(directory: Path, data: bytes, seconds: float, threads: int, batch: int, how: str) -> float:
    """Writers hand their open files to one syncer, which makes a batch durable at once."""
    written: queue.SimpleQueue[int] = queue.SimpleQueue()
    counter = iter(range(10**9))
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    durable = [0]
    stop = threading.Event()

    def writer() -> None:
        while time.monotonic() < deadline:
            with lock:
                n = next(counter)
            written.put(write_file(directory, f"{n:08d}", data, None))

    def syncer() -> None:
        while not (stop.is_set() and written.empty()):
            try:
                fds = [written.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(fds) < batch:
                try:
                    fds.append(written.get_nowait())
                except queue.Empty:
                    break
            if how == "syncfs":
                if LIBC.syncfs(fds[0]) != 0:
                    raise OSError(ctypes.get_errno(), "syncfs failed")
            else:
                for fd in fds:
                    os.fdatasync(fd)
            fsync_dir(directory)
            for fd in fds:
                os.close(fd)
            durable[0] += len(fds)

    started = time.perf_counter()
    sync_thread = threading.Thread(target=syncer)
    sync_thread.start()
    pool = [threading.Thread(target=writer) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    stop.set()
    sync_thread.join()
    return durable[0] / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per mode (default 5)")
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    base = ROOT / "var" if (ROOT / "var").is_dir() else None
    data = os.urandom(args.bytes)
    modes = {
        "fsync": lambda d: per_file(d, data, args.seconds, 1, "fsync", True),
        "fsync-threads": lambda d: per_file(d, data, args.seconds, args.threads, "fsync", True),
        "fdatasync-threads": lambda d: per_file(d, data, args.seconds, args.threads, "fdatasync", False),
        "syncfs-batch": lambda d: batched(d, data, args.seconds, args.threads, args.batch, "syncfs"),
        "fdatasync-batch": lambda d: batched(d, data, args.seconds, args.threads, args.batch, "fdatasync"),
    }
    print(f"durable files of {args.bytes} bytes per second ({args.threads} threads, batches of up to {args.batch})")
    for name, run in modes.items():
        directory = Path(tempfile.mkdtemp(prefix="remontee-disk-bench-", dir=base))
        try:
            rate = run(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print(f"  {name:18} {rate:7.0f} files/s  ({rate * args.bytes / 1e6:5.0f} MB/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
