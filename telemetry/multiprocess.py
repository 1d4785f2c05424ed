"""prometheus_client's multiprocess mode, for the processes that fork: gunicorn workers and RQ work horses.

Each process writes its metrics to files under one directory (`var/metrics/<part>/`); whichever
process answers a scrape reads them all (`MultiProcessCollector`). The library chooses between
in-memory and file-backed values when it is imported, so `enable()` runs before anything imports
prometheus_client (and refuses if something already did). The directory is emptied at the start
of a gunicorn service; a worker that exits gives up its live gauges (`child_exit`).

RQ forks a work horse per job, and every horse leaves its own files: thousands a night, which
every scrape would read. After each job the worker folds the files of finished processes into
one archive per metric type (`absorb_dead_processes`), under a lock that scrapes share, and with
SIGTERM and SIGINT held back: a worker told to stop halfway would have left a horse's values both
in the archive and in its own file, counted twice from then on.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
ARCHIVE = "archive"  # the "pid" part of the archive files' names: counter_archive.db, histogram_archive.db
LOCK = ".absorb.lock"


def directory_for(var_dir: Path, part: str) -> Path:
    return (var_dir / "metrics" / part).resolve()


def enable(directory: Path, *, wipe: bool) -> Path:
    """Point prometheus_client at `directory` (created; emptied when `wipe`), before its first import."""
    values = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before multiprocess mode was enabled: "
                           "call telemetry.multiprocess.enable() first")
    if wipe and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = str(directory)
    return directory


def enabled() -> Path | None:
    path = os.environ.get(ENV)
    return Path(path) if path else None


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn's `child_exit` hook: a dead worker's live gauges (requests in progress) stop counting."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


@contextlib.contextmanager
def _locked(directory: Path, kind: int) -> Iterator[None]:
    with open(directory / LOCK, "a+") as lock:
        fcntl.flock(lock, kind)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class LockedMultiProcessCollector:
    """`MultiProcessCollector` read under the absorb lock: a scrape never sees a horse's values twice or not at all."""

    def __init__(self, directory: Path) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.directory = directory
        self._collector = MultiProcessCollector(None, path=str(directory))

    def collect(self) -> Any:
        with _locked(self.directory, fcntl.LOCK_SH):
            return list(self._collector.collect())


@contextlib.contextmanager
def _shutdown_deferred() -> Iterator[None]:
    """SIGTERM and SIGINT received in the block reach their handlers (RQ's warm shutdown) when it ends.

    Python runs signal handlers in the main thread, whichever thread the kernel gave the signal to
    (the worker has a metrics listener and RQ's pub/sub thread): blocking signals with
    pthread_sigmask would not hold them back, so the handlers are swapped for a recorder here."""
    if threading.current_thread() is not threading.main_thread():
        yield  # no handler interrupts a thread other than the main one
        return
    caught: list[tuple[int, FrameType | None]] = []
    # A handler set outside Python (getsignal: None) could not be put back: that signal is left alone.
    previous = {sig: signal.signal(sig, lambda signum, frame: caught.append((signum, frame)))
                for sig in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(sig) is not None}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in caught:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def _pid_of(path: str) -> int | None:
    stem = os.path.basename(path)[:-3]  # counter_1234.db, gauge_livesum_1234.db
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def absorb_dead_processes(directory: Path) -> int:
    """Fold the counter and histogram files of exited processes into the archive; the number of processes.

    Their live gauges are dropped (mark_process_dead); other gauges are kept as they are."""
    from prometheus_client import multiprocess
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    with _shutdown_deferred(), _locked(directory, fcntl.LOCK_EX):
        dead: dict[int, list[str]] = {}
        for path in glob.glob(str(directory / "*.db")):
            pid = _pid_of(path)
            if pid is not None and pid != os.getpid() and not _alive(pid):
                dead.setdefault(pid, []).append(path)
        if not dead:
            return 0
        for kind in ("counter", "histogram"):
            theirs = [p for paths in dead.values() for p in paths if os.path.basename(p).startswith(kind + "_")]
            if not theirs:
                continue
            archive = directory / f"{kind}_{ARCHIVE}.db"
            sources = theirs + ([str(archive)] if archive.exists() else [])
            # accumulate=False: histogram buckets stay per bucket, as the files hold them.
            merged = multiprocess.MultiProcessCollector.merge(sources, accumulate=False)
            fresh = directory / f".{kind}_{ARCHIVE}.new"
            fresh.unlink(missing_ok=True)
            values = MmapedDict(str(fresh))
            try:
                for metric in merged:
                    for sample in metric.samples:
                        labels = dict(sample.labels)
                        key = mmap_key(metric.name, sample.name, list(labels), list(labels.values()),
                                       metric.documentation)
                        values.write_value(key, sample.value, 0.0)
            finally:
                values.close()
            os.replace(fresh, archive)  # readers hold the lock: they see the old files or the new, never both
            for path in theirs:
                os.unlink(path)
        for pid in dead:
            multiprocess.mark_process_dead(pid, str(directory))
        return len(dead)
