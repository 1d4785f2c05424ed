"""Raw storage: content addressing, and a really full disk (a tiny tmpfs) answered 507 with nothing kept."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pen_helpers import scribbled_page
from redis import Redis
from test_pen_api import assert_error, snapshot, start_gateway

from pen_gateway.storage import RawStore, StorageFull


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, int], Path]]:
    """Mount a tmpfs of a given size (a real filesystem that really fills up); unmounted afterwards."""
    mounted: list[Path] = []

    def mount(path: Path, size: int, inodes: int | None = None) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a real full disk needs a tmpfs mount, which needs root; not root here")
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size},mode=0755" + (f",nr_inodes={inodes}" if inodes else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (no CAP_SYS_ADMIN?): {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def fill(path: Path) -> Path:
    """Write a filler file until the filesystem is full (ENOSPC); returns it, to be removed to make room."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_content_addressed_and_stored_once(tmp_path: Path) -> None:
    store = RawStore(tmp_path)
    first = store.put(b"page one")
    again = store.put(b"page one")
    assert first.created and not again.created and first.path == again.path
    assert first.path.parent.name == first.sha256[:2] and first.path.name == first.sha256
    assert store.read(first.sha256) == b"page one"
    assert files_under(tmp_path) == [f"uploads/raw/{first.sha256[:2]}/{first.sha256}"]  # no temporary left over
    with pytest.raises(ValueError):
        store.path_for("../../etc/passwd")


def test_written_bytes_are_in_place_and_a_batch_makes_their_names_durable(tmp_path: Path) -> None:
    store = RawStore(tmp_path)
    pages = [f"page {n}".encode() for n in range(40)]
    written = [store.write(page) for page in pages]
    # In place, whole, before make_durable: the bytes were synced and renamed by write itself.
    assert all(w.created and w.path.read_bytes() == page for w, page in zip(written, pages, strict=True))
    lost = next(w for w in written if sum(o.path.parent == w.path.parent for o in written) == 1)
    os.unlink(lost.path)
    os.rmdir(lost.path.parent)  # a directory that cannot be synced any more: only its files fail
    failed = store.make_durable([*written, store.write(pages[1])])
    assert list(failed) == [lost] and isinstance(failed[lost], FileNotFoundError)
    assert all(w.path.read_bytes() == page for w, page in zip(written, pages, strict=True) if w is not lost)
    assert not store.write(pages[1]).created  # identical bytes: stored once
    assert not any(name.endswith(".tmp") for name in files_under(tmp_path))


# A docking station's request in another process (a gunicorn worker) that found the same bytes stored:
# it holds its claim on them until its stdin closes (its row committed, say).
TWIN = """
import sys
from pathlib import Path
from pen_gateway.storage import RawStore
stored = RawStore(Path(sys.argv[1])).write(sys.argv[2].encode())
print(stored.created, flush=True)
sys.stdin.read()
"""


def test_a_refused_upload_leaves_the_bytes_a_twin_is_about_to_journal(tmp_path: Path) -> None:
    """Identical bytes share one file. The request that wrote it is refused (a reused key, a replay) while
    another, in another process, found it in place and is about to commit a row pointing at it: the
    refusal waits for that claim, then sees the row and keeps the file (it used to remove it at once: a
    202 for bytes that were gone)."""
    store = RawStore(tmp_path)
    page, journaled = b"the same page, sent twice", set()
    refused = store.write(page)
    assert refused.created
    twin = subprocess.Popen([sys.executable, "-c", TWIN, str(tmp_path), page.decode()], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert twin.stdout is not None and twin.stdout.readline().strip() == "False"  # found in place, claimed
        refusing = threading.Thread(target=store.discard, args=(refused,),
                                    kwargs={"in_use": lambda: refused.sha256 in journaled})
        refusing.start()
        refusing.join(0.5)
        assert refusing.is_alive() and refused.path.read_bytes() == page  # waiting for the twin's claim
        journaled.add(refused.sha256)  # the twin's row is committed; its request ends
    finally:
        assert twin.stdin is not None
        twin.stdin.close()
        twin.wait(30)
    refusing.join(30)
    assert not refusing.is_alive() and refused.claim is None
    assert refused.path.read_bytes() == page
    # With no twin and nothing journaled, a refused request's bytes go.
    alone = store.write(b"a page nobody else sent")
    store.discard(alone, in_use=lambda: False)
    assert not alone.path.exists() and alone.claim is None


def test_a_full_disk_raises_storage_full_and_leaves_nothing(tmp_path: Path, tmpfs: Any) -> None:
    uploads = tmpfs(tmp_path / "var" / "uploads", 256 * 1024)
    store = RawStore(tmp_path / "var")
    with pytest.raises(StorageFull) as caught:
        store.put(os.urandom(600 * 1024))
    assert caught.value.errno == errno.ENOSPC
    assert files_under(uploads) == []
    assert store.put(b"a small page").created  # the store still works once there is room


def test_a_disk_out_of_inodes_raises_storage_full_and_leaves_nothing(tmp_path: Path, tmpfs: Any) -> None:
    """Room for bytes but no inode for the temporary file: a full disk all the same (was an OSError, a 500)."""
    uploads = tmpfs(tmp_path / "var" / "uploads", 1024 * 1024, inodes=16)
    store = RawStore(tmp_path / "var")
    page = b"a page with room for its bytes"
    store.path_for(hashlib.sha256(page).hexdigest()).parent.mkdir(parents=True)
    fillers = []
    with pytest.raises(OSError) as filled:
        while True:
            fillers.append(uploads / f"filler-{len(fillers)}")
            fillers[-1].touch()
    assert filled.value.errno == errno.ENOSPC
    before = files_under(uploads)
    with pytest.raises(StorageFull) as caught:
        store.put(page)
    assert caught.value.errno == errno.ENOSPC
    assert files_under(uploads) == before
    for filler in fillers[:-1]:
        filler.unlink()
    assert store.put(page).created  # the store still works once there is an inode


def test_upload_to_a_full_disk_is_507_and_changes_nothing(tmp_path: Path, tmpfs: Any, redis: Redis,
                                                          redis_server: Any) -> None:
    var_dir = tmp_path / "var"
    tmpfs(var_dir / "uploads", 256 * 1024)
    g = start_gateway(var_dir, redis_server.url)
    try:
        big = scribbled_page(1600, 2200, strokes=6000, seed=5)
        assert len(big) > 300 * 1024
        before = snapshot(g, redis)
        answer = g.client.upload(big, "image/png", pen_serial="PEN-1", bureau="750120")
        assert_error(answer, 507, "STORAGE_FULL")
        assert snapshot(g, redis) == before
        small = scribbled_page(400, 500, strokes=20, seed=5)
        assert g.client.upload(small, "image/png", pen_serial="PEN-1").status == 202
    finally:
        g.stop()


@pytest.mark.parametrize("journal_open", [True, False], ids=["journal-held-open", "journal-closed"])
def test_a_full_journal_disk_is_507_and_the_stored_bytes_are_removed(tmp_path: Path, tmpfs: Any, redis: Redis,
                                                                     redis_server: Any, journal_open: bool) -> None:
    var_dir = tmpfs(tmp_path / "var", 2 * 1024 * 1024)  # the journal's filesystem
    tmpfs(var_dir / "uploads", 16 * 1024 * 1024)  # raw storage has room
    g = start_gateway(var_dir, redis_server.url)
    # Held open, the journal keeps its WAL and reads still work, so it is the commit that fails
    # (after the raw bytes were stored, which must then be removed); closed, every access fails.
    keeper = sqlite3.connect(var_dir / "journal.sqlite3") if journal_open else None
    try:
        page = scribbled_page(600, 800, strokes=200, seed=9)
        warm = g.client.upload(scribbled_page(300, 300, strokes=5, seed=1), "image/png", pen_serial="PEN-1")
        assert warm.status == 202
        if keeper is not None:
            keeper.execute("SELECT count(*) FROM uploads").fetchone()
        before = snapshot(g, redis)
        filler = fill(var_dir)
        answer = g.client.upload(page, "image/png", pen_serial="PEN-1")
        assert_error(answer, 507, "STORAGE_FULL")
        filler.unlink()
        assert snapshot(g, redis) == before
        assert g.client.upload(page, "image/png", pen_serial="PEN-1").status == 202
    finally:
        if keeper is not None:
            keeper.close()
        g.stop()


# A writer killed in the middle of its write, after its temporary file was created and before its rename.
KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
os.fdatasync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "raw":
    from pen_gateway.storage import RawStore
    RawStore(Path(sys.argv[2])).write(sys.argv[3].encode())
else:
    from pen_gateway.recognition.job import _write_atomically
    _write_atomically(Path(sys.argv[2]), sys.argv[3].encode())
"""


def _killed_mid_write(*args: str) -> None:
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, *args], cwd=Path(__file__).parents[1])
    assert killed.returncode == -9


def test_temporary_files_of_writers_killed_mid_write_are_removed_at_the_gateways_start(
    tmp_path: Path, redis: Redis, redis_server: Any
) -> None:
    var_dir = tmp_path / "var"
    kept = RawStore(var_dir).put(b"a page stored whole")
    artefacts = var_dir / "uploads" / "artefacts" / "01UPLOADKILLEDMIDWRITE"
    artefacts.mkdir(parents=True)
    _killed_mid_write("raw", str(var_dir), "a page whose request was killed")
    _killed_mid_write("artefact", str(artefacts / "page.jpg"), "a page's artefact")
    _killed_mid_write("artefact", str(artefacts / "reading.json"), "{}")
    left = sorted(var_dir.rglob("*.tmp"), key=lambda p: ("reading.json" in p.name, str(p)))
    assert len(left) == 3, left
    an_hour_ago = time.time() - 3600
    for path in left[:2]:  # the upload's and the page artefact's
        os.utime(path, (an_hour_ago, an_hour_ago))
    recent = left[2]  # reading.json's, as young as a live writer's may be: kept
    # Names that are not the gateway's temporary files, however old, are not its to remove.
    others = [var_dir / "uploads" / "raw" / kept.sha256[:2] / "notes.tmp", artefacts / ".field-x.png.tmp",
              var_dir / "uploads" / ".stray.1.tmp"]
    for path in others:
        path.write_bytes(b"someone else's")
        os.utime(path, (an_hour_ago, an_hour_ago))

    gateway = start_gateway(var_dir, redis_server.url, relay=True)
    try:
        deadline = time.monotonic() + 30
        while any(path.exists() for path in left[:2]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(path.exists() for path in left[:2])
        assert recent.exists() and all(path.exists() for path in others)
        assert kept.path.read_bytes() == b"a page stored whole"
    finally:
        gateway.stop()
