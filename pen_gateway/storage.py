"""Raw upload storage: the bytes exactly as the docking station sent them, content-addressed and on disk.

A file lives at `<var>/uploads/raw/<first two hex digits>/<sha256>`. Storing is two steps, so
that many uploads share the directory flushes (group commit for names, as the recorder does for
rows):

- `RawStore.write` (in the request's thread, many at once) writes the bytes to a temporary file
  in the final directory, fdatasyncs it and renames it into place: a file at its final name
  always holds its whole content;
- `RawStore.make_durable` (in the recorder's thread, for a whole batch) fsyncs each directory the
  batch renamed into once, all of them at the same time, so that their flushes overlap.

The recorder does the second step before the commit of the rows that point at the files; the
API answers 202 only after both (and after the journal commit). `put` does both for one file.
Identical bytes are stored once, whoever sent them.

So two requests may share a file, and one may be refused (a replay, a reused key, a journal
error) while the other, with the same bytes, is about to commit a row pointing at it. A file
comes from `write` claimed: a shared flock on its directory, held until `release`, from before
the request looks for the file until after its row is committed or refused. `discard` takes the
lock exclusively, so it waits for every other claim on that directory (gunicorn's workers
included), then removes the file only if nothing journaled holds it.

A full disk (ENOSPC, EDQUOT) raises `StorageFull` and leaves nothing behind: the temporary file
is removed, and a file is never renamed into place unless it was completely written and synced.
A process killed in the middle of a write leaves its temporary file, and so does the OCR job's
artefact writer: `remove_stale_temporaries` removes those (the OCR relay runs it at the gateway's
start and every few minutes).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# A full upload directory is a passing state on the night (the API answers 507 meanwhile): an OCR job
# waits this long for room for its artefacts, rather than failing an acknowledged upload at once.
# Its RQ timeout is derived from it (pen_gateway/ocr_relay.py), so RQ never kills the job mid-wait.
ROOM_WAIT_SECONDS = 300.0
# Directories synced at once by make_durable: one thread each (they wait on the disk, not the CPU).
DIRECTORY_SYNC_THREADS = 16


# The temporary names of the files being written under uploads/: RawStore's, in raw/<xx>/, and the OCR job's
# artefacts' (`.<artefact>.<pid>.tmp`, pen_gateway/recognition/job.py's _write_atomically, the only writer in
# artefacts/<upload id>/: whatever artefacts it is given to write, not a list of them to keep up to date here).
RAW_TEMPORARY = re.compile(r"^\.[0-9a-f]{64}\.[0-9]+\.[0-9a-f]{8}\.tmp$")
ARTEFACT_TEMPORARY = re.compile(r"^\..+\.[0-9]+\.tmp$")
# A writer renames its temporary file into place, or removes it, within seconds: one this old has no writer left.
STALE_TEMPORARY_SECONDS = 900.0


class StorageFull(OSError):
    """No room to store the upload (the disk or the quota is full); nothing was kept."""


@dataclass(eq=False)
class StoredFile:
    sha256: str
    path: Path
    created: bool  # False when identical bytes were already stored
    claim: int | None = None  # the request's claim (its directory, open, shared-locked) until RawStore.release


def fsync_directory(path: Path) -> None:
    """Make a rename or a creation in `path` durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_directory(directory: Path) -> OSError | None:
    try:
        fsync_directory(directory)
    except OSError as exc:
        return exc
    return None


def _claim(directory: Path) -> int:
    """A shared flock on `directory`, on a descriptor of its own: closing it ends the claim."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _full(exc: OSError, what: str) -> OSError:
    if exc.errno in FULL_ERRNOS:
        return StorageFull(exc.errno, f"no room to store {what} ({os.strerror(exc.errno)})")
    return exc


class RawStore:
    """Content-addressed, fsynced storage of raw uploads under `<var>/uploads/raw/`."""

    def __init__(self, var_dir: Path) -> None:
        self.root = (Path(var_dir) / "uploads" / "raw").resolve()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = 0
        self._executor_lock = threading.Lock()

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def _ensure_directory(self, directory: Path) -> None:
        if directory.is_dir():
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # The new directory's own name must survive a crash too.
            fsync_directory(directory.parent)
            fsync_directory(directory.parent.parent)
        except OSError as exc:
            if exc.errno in FULL_ERRNOS:
                raise StorageFull(exc.errno, f"no room to create {directory}") from exc
            raise

    def write(self, data: bytes, sha256: str | None = None) -> StoredFile:
        """Write `data`, sync it and rename it into place; its name is durable once `make_durable` has run.

        The file comes claimed (see the module's docstring): `release` it once its row is committed
        or refused. Raises StorageFull when the disk is full (nothing kept, nothing claimed).
        Identical bytes already stored are not written again; their directory is synced by
        make_durable all the same (the process that renamed them may have died before syncing it)."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        self._ensure_directory(final.parent)
        claim = _claim(final.parent)
        try:
            created = self._write_unless_stored(data, final)
        except BaseException:
            os.close(claim)
            raise
        return StoredFile(digest, final, created, claim)

    @staticmethod
    def _write_unless_stored(data: bytes, final: Path) -> bool:
        """Write the file unless the same bytes are already there; True when this call wrote it."""
        if final.is_file() and final.stat().st_size == len(data):
            return False
        temporary = final.parent / f".{final.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        try:
            # Creating it can fail for a full disk too: no inode left (ENOSPC), or the quota's (EDQUOT).
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                # Data and size only: the name is made durable by the directory's fsync.
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, final)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise _full(exc, "the upload") from exc
        return True

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None or self._executor_pid != os.getpid():  # none yet, or a parent's
            with self._executor_lock:
                if self._executor is None or self._executor_pid != os.getpid():
                    self._executor = ThreadPoolExecutor(DIRECTORY_SYNC_THREADS, thread_name_prefix="raw-dir-sync")
                    self._executor_pid = os.getpid()
        return self._executor

    def make_durable(self, files: Iterable[StoredFile]) -> dict[StoredFile, OSError]:
        """Fsync, all at once, each directory the files were renamed into: their names become durable.

        Returns the files whose directory could not be synced, with why (StorageFull for a full
        disk). Their requests discard them (nothing half-kept): not here, where their claims are held."""
        directories: dict[Path, list[StoredFile]] = {}
        for stored in files:
            directories.setdefault(stored.path.parent, []).append(stored)
        if len(directories) == 1:
            outcomes = {directory: _sync_directory(directory) for directory in directories}
        else:
            outcomes = dict(zip(directories, self._pool().map(_sync_directory, directories), strict=True))
        failed: dict[StoredFile, OSError] = {}
        for directory, error in outcomes.items():
            if error is None:
                continue
            for stored in directories[directory]:
                failed[stored] = _full(error, "the upload")
        return failed

    def put(self, data: bytes, sha256: str | None = None) -> StoredFile:
        """Store `data` durably, alone; returns where. Raises StorageFull when the disk is full (nothing kept)."""
        stored = self.write(data, sha256)
        try:
            failed = self.make_durable([stored])
            if stored in failed:
                self.discard(stored)
                raise failed[stored]
        finally:
            self.release(stored)
        return stored

    def release(self, stored: StoredFile) -> None:
        """End the request's claim on its file: from now on only the journal's rows keep it."""
        if stored.claim is not None:
            os.close(stored.claim)
            stored.claim = None

    def discard(self, stored: StoredFile, in_use: Callable[[], bool] = lambda: False) -> None:
        """Remove a file this request created and nobody holds (nothing half-kept); ends its claim.

        Waits until no other request holds a claim on the file's directory, then keeps the file
        if `in_use()` says a journaled upload points at it (the caller's check of the journal)."""
        if not stored.created:
            self.release(stored)
            return
        if stored.claim is None:
            stored.claim = _claim(stored.path.parent)
        try:
            fcntl.flock(stored.claim, fcntl.LOCK_EX)
            if not in_use():
                with contextlib.suppress(FileNotFoundError):
                    stored.path.unlink()
                with contextlib.suppress(OSError):
                    fsync_directory(stored.path.parent)
        finally:
            stored.created = False  # what is left of it is no longer this request's to remove
            self.release(stored)

    def read(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()


def remove_stale_temporaries(var_dir: Path, older_than: float = STALE_TEMPORARY_SECONDS,
                             now: float | None = None) -> list[Path]:
    """Remove the temporary files that processes killed in the middle of a write left under uploads/; those removed.

    Only the names RawStore and the artefact writer give their temporary files, in their own directories,
    and only those not modified for `older_than` seconds: a younger one may be a live writer's."""
    cutoff = (time.time() if now is None else now) - older_than
    uploads = Path(var_dir) / "uploads"
    removed: list[Path] = []
    for parent, name in ((uploads / "raw", RAW_TEMPORARY), (uploads / "artefacts", ARTEFACT_TEMPORARY)):
        try:
            directories = [entry.path for entry in os.scandir(parent) if entry.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
        for directory in directories:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                if not name.match(entry.name):
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_mtime > cutoff:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                removed.append(Path(entry.path))
    return removed
