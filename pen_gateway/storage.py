"""Raw upload storage: the bytes exactly as the docking station sent them, content-addressed and on disk.

A file lives at `<var>/uploads/raw/<first two hex digits>/<sha256>`. Storing is two steps, so
that many uploads share one round of disk flushes (group commit for files, as the recorder does
for rows):

- `RawStore.write` (in the request's thread) writes the bytes to a temporary file in the final
  directory and starts their writeback, without waiting for it;
- `RawStore.make_durable` (in the recorder's thread, for a whole batch) fdatasyncs each file,
  renames it into place and fsyncs each directory once.

A file is renamed into place only once its bytes are on disk, so a file at its final name always
holds its whole content; its name is durable once the directory is synced, which the recorder
does before the commit of the rows that point at it. `put` does both steps for one file. The
API answers 202 only after both (and after the journal commit). Identical bytes are stored once,
whoever sent them.

A full disk (ENOSPC, EDQUOT) raises `StorageFull` and leaves nothing behind: the temporary file
is removed, and a file is never renamed into place unless it was completely written and synced.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writeback of the dirty pages, do not wait


def _writeback_starter() -> object:
    """sync_file_range(2) (not in Python's os module): starts a file's writeback at once, so that by the time
    the recorder fdatasyncs a batch most of its bytes are already on their way (fdatasync alone would
    write them one file after the other). A no-op where the C library lacks it."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _writeback_starter()


class StorageFull(OSError):
    """No room to store the upload (the disk or the quota is full); nothing was kept."""


@dataclass(eq=False)
class StoredFile:
    sha256: str
    path: Path
    created: bool  # False when identical bytes were already stored
    # While written but not yet durable: the temporary file and its open descriptor.
    temporary: Path | None = field(default=None, repr=False)
    fd: int | None = field(default=None, repr=False)

    @property
    def pending(self) -> bool:
        return self.temporary is not None


def fsync_directory(path: Path) -> None:
    """Make a rename or a creation in `path` durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _full(exc: OSError, what: str) -> OSError:
    if exc.errno in FULL_ERRNOS:
        return StorageFull(exc.errno, f"no room to store {what} ({os.strerror(exc.errno)})")
    return exc


class RawStore:
    """Content-addressed, fsynced storage of raw uploads under `<var>/uploads/raw/`."""

    def __init__(self, var_dir: Path) -> None:
        self.root = (Path(var_dir) / "uploads" / "raw").resolve()

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
        """Write `data` next to its final place and start its writeback; `make_durable` finishes the job.

        Raises StorageFull when the disk is full (nothing kept). Identical bytes already stored
        give a file that is not pending: only its directory is left to sync (the process that
        renamed it may have died before syncing it)."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        self._ensure_directory(final.parent)
        if final.is_file() and final.stat().st_size == len(data):
            return StoredFile(digest, final, created=False)
        temporary = final.parent / f".{digest}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if _sync_file_range is not None:
                _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            raise _full(exc, "the upload") from exc
        return StoredFile(digest, final, created=True, temporary=temporary, fd=fd)

    def make_durable(self, files: Iterable[StoredFile]) -> dict[StoredFile, OSError]:
        """Sync the bytes of every pending file, rename it into place, then sync each directory once.

        Returns the files that could not be made durable, with why (StorageFull for a full disk);
        those left nothing behind. The others are durable, names included."""
        failed: dict[StoredFile, OSError] = {}
        directories: dict[Path, list[StoredFile]] = {}
        for stored in files:
            directories.setdefault(stored.path.parent, []).append(stored)
            if stored.temporary is None or stored.fd is None:
                continue
            try:
                try:
                    os.fdatasync(stored.fd)
                finally:
                    os.close(stored.fd)
                    stored.fd = None
                os.replace(stored.temporary, stored.path)
                stored.temporary = None
            except OSError as exc:
                with contextlib.suppress(FileNotFoundError):
                    stored.temporary.unlink()
                stored.temporary, stored.created = None, False  # nothing of this request's is left
                failed[stored] = _full(exc, "the upload")
        for directory, stored_there in directories.items():
            if all(s in failed for s in stored_there):
                continue
            try:
                fsync_directory(directory)
            except OSError as exc:  # the names are not durable: none of these files is kept
                for stored in stored_there:
                    if stored not in failed:
                        failed[stored] = _full(exc, "the upload")
                        self.discard(stored)
                        stored.created = False
        return failed

    def put(self, data: bytes, sha256: str | None = None) -> StoredFile:
        """Store `data` durably, alone; returns where. Raises StorageFull when the disk is full (nothing kept)."""
        stored = self.write(data, sha256)
        failed = self.make_durable([stored])
        if stored in failed:
            raise failed[stored]
        return stored

    def discard(self, stored: StoredFile) -> None:
        """Remove a file this request created, when the journal could not record it (nothing half-kept)."""
        if stored.fd is not None:
            with contextlib.suppress(OSError):
                os.close(stored.fd)
            stored.fd = None
        if stored.temporary is not None:
            with contextlib.suppress(FileNotFoundError):
                stored.temporary.unlink()
            stored.temporary = None
            return
        if stored.created:
            with contextlib.suppress(FileNotFoundError):
                stored.path.unlink()
            with contextlib.suppress(OSError):
                fsync_directory(stored.path.parent)

    def read(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()
