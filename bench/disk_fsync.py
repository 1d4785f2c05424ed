#!/usr/bin/env python3
"""The raw disk's rate of durable ~300 KB files, without the gateway: the ceiling for `bench/upload_load.py`.

Each mode writes unique files of `--bytes` bytes into 256 subdirectories of a fresh directory
next to var/ (same filesystem and the same layout as the gateway's raw store) and makes each file
durable, bytes and name, before counting it:

- `fsync-1-thread`: write, fsync, rename, fsync the directory; one file after the other;
- `fsync-threads`: the same from `--threads` threads at once (the gateway before group commit);
- `serial-batch`: `--threads` threads write; one thread fdatasyncs a batch's files one after the
  other, renames them, fsyncs their directories (rejected: every fdatasync costs a disk flush);
- `gateway`: `--threads` threads write, fdatasync and rename; one thread fsyncs each batch's
  directories, all at once on a pool (what `RawStore.write` + `make_durable` do, without SQLite);
- `syncfs-batch`: `--threads` threads write and rename; one syncfs(2) and the batch is durable
  (for reference only: syncfs flushes every file of the filesystem, other programs' too).

    .venv/bin/python bench/disk_fsync.py --seconds 4
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBC = ctypes.CDLL(None, use_errno=True)  # syncfs(2): not in Python's os module


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Files:
    """Unique file names spread over 256 directories, as the raw store spreads SHA-256 names."""

    def __init__(self, root: Path, data: bytes) -> None:
        self.root, self.data = root, data
        for i in range(256):
            (root / f"{i:02x}").mkdir()
        self._counter = iter(range(10**9))
        self._lock = threading.Lock()

    def next_path(self) -> Path:
        with self._lock:
            n = next(self._counter)
        name = hashlib.sha256(str(n).encode()).hexdigest()
        return self.root / name[:2] / name

    def write(self, sync: str | None, rename: bool) -> tuple[Path, Path, int | None]:
        """(final path, temporary path, open fd or None); renamed when `rename`."""
        final = self.next_path()
        temporary = final.parent / f".{final.name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        os.write(fd, self.data)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
        if rename:
            os.close(fd)
            os.replace(temporary, final)
            return final, temporary, None
        return final, temporary, fd


def per_file(files: Files, seconds: float, threads: int) -> float:
    done = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        while time.monotonic() < deadline:
            final, _, _ = files.write("fsync", rename=True)
            fsync_dir(final.parent)
            with lock:
                done[0] += 1

    return _timed([threading.Thread(target=worker) for _ in range(threads)], lambda: done[0])


def batched(files: Files, seconds: float, threads: int, batch: int, how: str) -> float:
    """Writers hand what they wrote to one syncer, which makes a batch durable at once."""
    written: queue.SimpleQueue[tuple[Path, Path, int | None]] = queue.SimpleQueue()
    deadline = time.monotonic() + seconds
    durable = [0]
    writers_done = threading.Event()
    pool = ThreadPoolExecutor(16)

    def writer() -> None:
        while time.monotonic() < deadline:
            if how == "serial":
                written.put(files.write(None, rename=False))
            elif how == "gateway":
                written.put(files.write("fdatasync", rename=True))
            else:
                written.put(files.write(None, rename=True))

    def syncer() -> None:
        while not (writers_done.is_set() and written.empty()):
            try:
                items = [written.get(timeout=0.05)]
            except queue.Empty:
                continue
            while len(items) < batch:
                try:
                    items.append(written.get_nowait())
                except queue.Empty:
                    break
            directories = {final.parent for final, _, _ in items}
            if how == "serial":
                for final, temporary, fd in items:
                    assert fd is not None
                    os.fdatasync(fd)
                    os.close(fd)
                    os.replace(temporary, final)
                for directory in directories:
                    fsync_dir(directory)
            elif how == "gateway":
                list(pool.map(fsync_dir, directories))
            elif LIBC.syncfs(os.open(items[0][0], os.O_RDONLY)) != 0:  # the fd leaks: a benchmark, short
                raise OSError(ctypes.get_errno(), "syncfs failed")
            durable[0] += len(items)

    sync_thread = threading.Thread(target=syncer)
    writers = [threading.Thread(target=writer) for _ in range(threads)]
    started = time.perf_counter()
    sync_thread.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    writers_done.set()
    sync_thread.join()
    pool.shutdown()
    return durable[0] / (time.perf_counter() - started)


def _timed(pool: list[threading.Thread], count: Callable[[], int]) -> float:
    started = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return count() / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, default=300_000)
    parser.add_argument("--seconds", type=float, default=4.0, help="per mode (default 4)")
    parser.add_argument("--threads", type=int, default=48, help="writers (default 48: the gateway's 2 x 24)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--modes", default="fsync-1-thread,fsync-threads,serial-batch,gateway,syncfs-batch")
    args = parser.parse_args()
    base = ROOT / "var" if (ROOT / "var").is_dir() else None
    data = os.urandom(args.bytes)
    modes: dict[str, Callable[[Files], float]] = {
        "fsync-1-thread": lambda f: per_file(f, args.seconds, 1),
        "fsync-threads": lambda f: per_file(f, args.seconds, args.threads),
        "serial-batch": lambda f: batched(f, args.seconds, args.threads, args.batch, "serial"),
        "gateway": lambda f: batched(f, args.seconds, args.threads, args.batch, "gateway"),
        "syncfs-batch": lambda f: batched(f, args.seconds, args.threads, args.batch, "syncfs"),
    }
    print(f"durable files of {args.bytes} bytes per second ({args.threads} writer threads, batches of up to "
          f"{args.batch})")
    for name in args.modes.split(","):
        directory = Path(tempfile.mkdtemp(prefix="remontee-disk-bench-", dir=base))
        try:
            rate = modes[name](Files(directory, data))
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        print(f"  {name:15} {rate:7.0f} files/s  ({rate * args.bytes / 1e6:5.0f} MB/s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
