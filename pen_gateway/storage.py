"""Raw upload storage: the bytes exactly as the docking station sent them, content-addressed and on disk.

A file lives at `<var>/uploads/raw/<first two hex digits>/<sha256>`. `RawStore.put` writes to a
temporary file in the same directory, fsyncs it, renames it into place and fsyncs the directory,
so once `put` returns the bytes survive a power cut; the API answers 202 only after that (and
after the journal commit). Identical bytes are stored once, whoever sent them.

A full disk (ENOSPC, EDQUOT) raises `StorageFull` and leaves nothing behind: the temporary file
is removed, and a file is never renamed into place unless it was completely written and fsynced.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class StorageFull(OSError):
    """No room to store the upload (the disk or the quota is full); nothing was kept."""


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    path: Path
    created: bool  # False when identical bytes were already stored


def fsync_directory(path: Path) -> None:
    """Make a rename or a creation in `path` durable (a file's own fsync does not cover its name)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def put(self, data: bytes, sha256: str | None = None) -> StoredFile:
        """Store `data` durably; returns where. Raises StorageFull when the disk is full (nothing kept)."""
        digest = sha256 or hashlib.sha256(data).hexdigest()
        final = self.path_for(digest)
        self._ensure_directory(final.parent)
        if final.is_file() and final.stat().st_size == len(data):
            # Already stored by an earlier upload; its rename may not have been made durable if
            # that process died just after it, so sync the directory again (cheap).
            fsync_directory(final.parent)
            return StoredFile(digest, final, created=False)
        temporary = final.parent / f".{digest}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            try:
                view = memoryview(data)
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, final)
            fsync_directory(final.parent)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                temporary.unlink()
            if exc.errno in FULL_ERRNOS:
                raise StorageFull(exc.errno, f"no room to store the upload ({os.strerror(exc.errno)})") from exc
            raise
        return StoredFile(digest, final, created=True)

    def discard(self, stored: StoredFile) -> None:
        """Remove a file this request created, when the journal could not record it (nothing half-kept)."""
        if stored.created:
            with contextlib.suppress(FileNotFoundError):
                stored.path.unlink()
            with contextlib.suppress(OSError):
                fsync_directory(stored.path.parent)

    def read(self, sha256: str) -> bytes:
        return self.path_for(sha256).read_bytes()
