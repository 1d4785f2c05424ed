"""Journaling uploads with group commit: many request threads, one round of disk flushes per batch.

An upload is acknowledged only once its raw bytes are on disk and its row is committed with
`synchronous=FULL`. Every flush waits for the disk (and on ext4 in ordered mode a commit also
waits for the data of every file written meanwhile), and SQLite takes one writer at a time, whose
waiters otherwise poll with sleeps of up to 100 ms. So each gateway process has one recorder
pipeline of three threads that take every upload waiting to be journaled, a batch at a time, each
stage taking at once everything the stage before it has finished (so batches grow when the disk
is slow, and the stages overlap: the directories of one batch are synced while the rows of the
one before are committed):

1. the file stage makes the batch's raw file names durable (`RawStore.make_durable`: one fsync per
   directory, all at once; the request threads have synced the bytes themselves, in parallel);
2. the commit stage checks and inserts the rows in a single transaction on one long-lived
   connection and commits once;
3. the after-commit stage runs `after_commit` on the recorded uploads (the gateway enqueues their
   `ocr` jobs there, in one Redis round trip: a slow Redis never holds up the journal) and then
   wakes the request threads with what became of each:

- `recorded`: the row and the signature are committed;
- `first`: an upload under the same Idempotency-Key (from this station) was committed before;
- `replayed`: the signature was already used.

Processes of one gateway (gunicorn workers) take turns through an flock on `<var>/journal.lock`,
which hands over at once where SQLite's own busy wait would sleep (up to 100 ms a nap). The
gateway's other writes (the OCR relay's marks) go through the commit stage (`write`), so they
never make a batch wait on SQLite's lock. The long-lived connection also
keeps the WAL open, so closing the per-request read connections never has to checkpoint it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from pen_gateway.signing import SignedRequest, seen_signatures
from pen_gateway.storage import RawStore, StoredFile
from pen_gateway.uploads import Upload, find_by_idempotency_key, upload_from_row, upload_values, uploads
from returns_queue.journal import Journal

log = logging.getLogger(__name__)

Outcome = Literal["recorded", "first", "replayed"]


def _take_waiting(q: queue.Queue[Any], most: int | None = None) -> tuple[list[Any], bool]:
    """Block for one item, then take every item already waiting (up to `most`): what a stage does at once.

    True as second value when the stop sentinel (None) was met: the stage ends after this batch."""
    first = q.get()
    if first is None:
        return [], True
    taken = [first]
    while most is None or len(taken) < most:
        try:
            more = q.get_nowait()
        except queue.Empty:
            break
        if more is None:
            return taken, True
        taken.append(more)
    return taken, False


@dataclass
class _Intent:
    signed: SignedRequest
    upload: Upload
    key: str | None
    file: StoredFile | None = None  # the raw bytes, made durable before the commit of the row
    settled: bool = False  # committed (or refused) in a transaction of its own: a later failure is not its
    done: threading.Event = field(default_factory=threading.Event)
    outcome: Outcome | None = None
    first: Upload | None = None
    error: BaseException | None = None


@dataclass
class _Call:
    """Another write of the gateway (the OCR relay's marks): run by the same thread, under the same lock."""

    fn: Callable[[Connection], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Recorded:
    outcome: Outcome
    first: Upload | None = None  # for "first": the upload the key already made


class UploadRecorder:
    def __init__(self, journal: Journal, lock_path: Path | None, max_batch: int = 64, *,
                 store: RawStore | None = None, after_commit: Callable[[list[Upload]], None] | None = None) -> None:
        self.journal, self.lock_path, self.max_batch = journal, lock_path, max_batch
        self.store = store or RawStore(Path("."))  # only its make_durable is used: no path of its own
        # Runs in the recorder thread after each commit, outside the journal's lock, before the
        # request threads are woken; best effort (what it raises is logged, the uploads stay recorded).
        self.after_commit = after_commit
        self._queue: queue.SimpleQueue[_Intent | _Call | None] = queue.SimpleQueue()
        self._synced: queue.SimpleQueue[list[_Intent] | _Call | None] = queue.SimpleQueue()
        self._committed: queue.SimpleQueue[list[_Intent] | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._conn: Connection | None = None
        self._start_lock = threading.Lock()

    def record(self, signed: SignedRequest, upload: Upload, key: str | None, timeout: float = 60.0, *,
               file: StoredFile | None = None) -> Recorded:
        """Journal the upload (with its signature) durably; raises what the commit raised.

        `file`: the upload's raw bytes as `RawStore.write` left them, made durable (bytes and name)
        before the commit, so the row never becomes durable before the bytes it points at. When
        they cannot be, this raises what `make_durable` said (StorageFull for a full disk) and
        the row is not written."""
        self._ensure_thread()
        intent = _Intent(signed, upload, key, file)
        self._queue.put(intent)
        if not intent.done.wait(timeout):
            raise TimeoutError(f"the journal did not commit within {timeout:.0f} s")
        if intent.error is not None:
            raise intent.error
        assert intent.outcome is not None
        return Recorded(intent.outcome, intent.first)

    def write(self, fn: Callable[[Connection], Any], timeout: float = 60.0) -> Any:
        """Run `fn(conn)` in a transaction of its own on the recorder's connection; its result or its error."""
        self._ensure_thread()
        call = _Call(fn)
        self._queue.put(call)
        if not call.done.wait(timeout):
            raise TimeoutError(f"the journal did not commit within {timeout:.0f} s")
        if call.error is not None:
            raise call.error
        return call.result

    def close(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            self._queue.put(None)  # each stage passes it on to the next once done with what came before
            for thread in self._threads:
                thread.join(10)
        self._thread, self._threads = None, []

    # --- the recorder thread ---

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._start_lock:
            if self._thread is None or self._pid != os.getpid():  # none yet, or inherited through fork
                self._pid, self._conn = os.getpid(), None
                # Not a parent's queues (after a fork, their items are nobody's).
                self._queue, self._synced = queue.SimpleQueue(), queue.SimpleQueue()
                self._committed = queue.SimpleQueue()
                self._threads = [threading.Thread(target=target, name=name, daemon=True) for target, name in (
                    (self._run_after_commit, "upload-after-commit"), (self._run_commits, "upload-commit"),
                    (self._run, "upload-files"))]
                for thread in self._threads:
                    thread.start()
                self._thread = self._threads[-1]

    def _run(self) -> None:
        while True:
            waiting, stop = _take_waiting(self._queue, self.max_batch)
            batch = [w for w in waiting if isinstance(w, _Intent)]
            if batch:
                batch = self._sync_files(batch)
                if batch:
                    self._synced.put(batch)
            for call in waiting:
                if isinstance(call, _Call):
                    self._synced.put(call)
            if stop:
                break
        self._synced.put(None)

    def _sync_files(self, batch: list[_Intent]) -> list[_Intent]:
        """The file stage: the batch's raw files made durable; those that cannot be are answered here."""
        try:
            failed = self.store.make_durable([i.file for i in batch if i.file is not None])
        except BaseException as exc:  # every waiting request hears of it, none is left hanging
            for intent in batch:
                intent.outcome, intent.error = None, exc
                intent.done.set()
            if not isinstance(exc, Exception):
                raise
            return []
        for intent in batch:
            if intent.file is not None and intent.file in failed:
                intent.outcome, intent.error = None, failed[intent.file]
                intent.done.set()
        return [i for i in batch if not i.done.is_set()]

    def _run_commits(self) -> None:
        """The commit stage: every batch whose files are synced, in one transaction; the gateway's other writes."""
        while True:
            waiting, stop = _take_waiting(self._synced)
            batch = [i for w in waiting if isinstance(w, list) for i in w]
            if batch:
                self._commit(batch)
            for call in waiting:
                if isinstance(call, _Call):
                    self._call(call)
            if stop:
                break
        if self._conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._conn.close()
            self._conn = None
        self._committed.put(None)

    def _call(self, call: _Call) -> None:
        try:
            with self._process_lock():
                conn = self._connection()
                with conn.begin():
                    call.result = call.fn(conn)
        except Exception as exc:
            self._drop_connection()
            call.error = exc
        call.done.set()

    @contextlib.contextmanager
    def _process_lock(self) -> Iterator[None]:
        if self.lock_path is None:
            yield
            return
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _connection(self) -> Connection:
        if self._conn is None:
            self._conn = self.journal.engine.connect()
        return self._conn

    def _commit(self, batch: list[_Intent]) -> None:
        try:
            with self._process_lock():
                try:
                    self._transaction(batch)
                except IntegrityError:
                    # PostgreSQL: another process inserted the same signature or key meanwhile;
                    # the rows of this batch are settled one at a time, each seeing the other's.
                    if len(batch) == 1:
                        raise
                    for intent in batch:
                        self._commit_one(intent)
        except BaseException as exc:  # every waiting request hears of it, none is left hanging
            self._drop_connection()
            for intent in batch:
                if not intent.done.is_set() and not intent.settled:
                    intent.outcome, intent.first, intent.error = None, None, exc
            self._after_commit(batch)
            if not isinstance(exc, Exception):
                raise
            return
        self._after_commit(batch)

    def _after_commit(self, batch: list[_Intent]) -> None:
        if self.after_commit is None or not any(i.outcome == "recorded" for i in batch):
            for intent in batch:
                intent.done.set()
            return
        self._committed.put(batch)

    def _run_after_commit(self) -> None:
        """The second thread: `after_commit` for every batch committed meanwhile at once, then their answers."""
        while True:
            batches, stop = _take_waiting(self._committed)
            intents = [i for b in batches for i in b]
            if intents:
                try:
                    assert self.after_commit is not None
                    self.after_commit([i.upload for i in intents if i.outcome == "recorded"])
                except Exception:  # the rows are committed: what follows them must not undo their answer
                    log.exception("after the commit of %d upload(s)", len(intents))
                finally:
                    for intent in intents:
                        intent.done.set()
            if stop:
                break

    def _commit_one(self, intent: _Intent) -> None:
        try:
            self._transaction([intent])
            intent.settled = True
        except IntegrityError:
            self._drop_connection()
            intent.outcome = "replayed"  # the twin that won has the same signature or key: re-check it
            with self.journal.read() as conn:
                if intent.key and (first := find_by_idempotency_key(conn, intent.signed.station_id, intent.key)):
                    intent.outcome, intent.first = "first", first
            intent.settled = True

    def _transaction(self, batch: list[_Intent]) -> None:
        """One transaction for the batch, in a handful of statements whatever its size: every statement
        gives up the GIL and may wait that long to get it back from the request threads."""
        conn = self._connection()
        with conn.begin():  # BEGIN IMMEDIATE on SQLite: the checks below cannot interleave with a writer
            used = set(conn.execute(select(seen_signatures.c.signature).where(
                seen_signatures.c.signature.in_([i.signed.signature for i in batch]))).scalars())
            keyed = {(i.signed.station_id, i.key) for i in batch if i.key is not None}
            firsts: dict[tuple[str, str], Upload] = {}
            if keyed:
                # Both columns, so that the (station_id, idempotency_key) index serves the lookup.
                rows = conn.execute(select(uploads).where(
                    uploads.c.station_id.in_({station for station, _ in keyed}),
                    uploads.c.idempotency_key.in_({key for _, key in keyed})))
                firsts = {(r.station_id, r.idempotency_key): upload_from_row(r) for r in rows}
            signature_rows: list[dict[str, object]] = []
            upload_rows: list[dict[str, object]] = []
            for intent in batch:
                signed = intent.signed
                if signed.signature in used:
                    intent.outcome = "replayed"
                    continue
                first = firsts.get((signed.station_id, intent.key)) if intent.key is not None else None
                if first is not None:
                    intent.outcome, intent.first = "first", first
                    continue
                used.add(signed.signature)
                if intent.key is not None:
                    firsts[(signed.station_id, intent.key)] = intent.upload  # a twin later in this batch
                signature_rows.append({"signature": signed.signature, "station_id": signed.station_id,
                                       "seen_at": intent.upload.received_at})
                upload_rows.append(upload_values(intent.upload))
                intent.outcome = "recorded"
            if upload_rows:
                conn.execute(insert(seen_signatures), signature_rows)
                conn.execute(insert(uploads), upload_rows)

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()
                self._conn.close()
            self._conn = None
