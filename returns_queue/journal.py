"""The journal: every return received, its findings and its status, durable before anything is acknowledged.

It is also the outbox: an accepted return stays `enqueued_at IS NULL` until the relay has put
it on RQ, so a return acknowledged while Redis is down is relayed when Redis is back.
SQLite (WAL, synchronous=FULL) under var/ by default; PostgreSQL by URL.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import SQLAlchemyError

from validation import Finding, Reason, Return, check_history, decide

metadata = MetaData()
MAX_GROUP_COMMIT = 256

returns = Table(
    "returns",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("return_id", String(40), nullable=False, unique=True),
    Column("receipt", String(16), unique=True),  # NULL for a duplicate: it is answered with the original's
    Column("election", String(64), nullable=False),
    Column("bureau", String(10), nullable=False),
    Column("channel", String(8), nullable=False),
    Column("status", String(12), nullable=False),  # accepted, review, duplicate, rejected, corrected
    Column("payload", Text, nullable=False),  # the remontee.return/1 dict, as JSON
    Column("findings", Text, nullable=False),  # JSON list of Finding dicts
    Column("received_at", String(20), nullable=False),
    Column("journaled_at", Float, nullable=False),
    Column("supersedes", String(40)),
    Column("duplicate_of", String(40)),
    Column("enqueued_at", Float),  # the outbox mark: NULL until the relay has put the job on RQ
    Index("ix_returns_bureau", "election", "bureau", "status"),
    Index("ix_returns_outbox", "status", "enqueued_at"),
)

review_items = Table(
    "review_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("return_id", String(40), ForeignKey("returns.return_id"), nullable=False, unique=True),
    Column("election", String(64), nullable=False),
    Column("bureau", String(10), nullable=False),
    Column("channel", String(8), nullable=False),
    Column("reasons", Text, nullable=False),  # JSON list of reason codes
    Column("created_at", Float, nullable=False),
    Column("state", String(10), nullable=False, default="open"),  # open, approved, rejected
    Column("claimed_by", String(64)),
    Column("claimed_until", Float),
    Column("decided_by", String(64)),
    Column("decided_at", Float),
    Column("decision_note", Text),
    Column("result_return_id", String(40)),
    Index("ix_review_state", "state", "created_at"),
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(32), nullable=False),
    Column("subject", String(64)),
    Column("before", Text),  # JSON
    Column("after", Text),  # JSON
)


def receipt_for(seq: int) -> str:
    """The spoken receipt: the journal sequence number and a Luhn check digit, so a misheard digit shows."""
    digits = f"{seq:06d}"
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return digits + str((10 - total % 10) % 10)


@dataclass(frozen=True)
class Submission:
    """What the channel acknowledges: the receipt, and what became of the return."""

    return_id: str
    receipt: str
    status: str  # accepted, review, duplicate (of return_id, answered with its receipt)
    findings: tuple[Finding, ...]


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    ret: Return
    receipt: str | None
    status: str
    findings: tuple[Finding, ...]
    journaled_at: float
    enqueued_at: float | None
    duplicate_of: str | None


def _entry(row: Any) -> JournalEntry:
    ret = Return.from_dict(json.loads(row.payload))
    return JournalEntry(
        seq=row.seq,
        ret=ret.with_status(row.status),
        receipt=row.receipt,
        status=row.status,
        findings=tuple(Finding.from_dict(f) for f in json.loads(row.findings)),
        journaled_at=row.journaled_at,
        enqueued_at=row.enqueued_at,
        duplicate_of=row.duplicate_of,
    )


def _forget_connections_after_fork(engine: Engine) -> None:
    """A forked child (gunicorn worker, RQ work horse) must open its own connections, never share the parent's."""
    ref = weakref.ref(engine)

    def after_fork() -> None:
        if (alive := ref()) is not None:
            alive.dispose(close=False)

    os.register_at_fork(after_in_child=after_fork)


def _use_wal(cur: Any, patience: float = 60.0) -> None:
    """Put the database in WAL mode (it stays so, in the file), waiting out another process doing the same.

    Switching needs the database to itself, and SQLite answers "database is locked" at once, without
    its busy timeout, while another connection is switching or creating the file: as when
    `run_gateway.py all` starts every service at once on a new journal."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    # Pooled connections: closing the last connection to a WAL database checkpoints it (an
    # fsync), which cost more than the transaction itself when each one opened its own.
    engine = create_engine(url, pool_size=8, max_overflow=32,
                           connect_args={"timeout": 60, "check_same_thread": False})
    _forget_connections_after_fork(engine)

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cur = dbapi_conn.cursor()
        _use_wal(cur)
        cur.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we acknowledge
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the write lock up front so that check-then-insert cannot interleave.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def latest_accepted_row(conn: Connection, election: str, bureau: str, excluding: str | None = None) -> Any:
    """The `returns` row of the bureau's latest accepted return (but `excluding`), inside the caller's transaction."""
    query = select(returns).where(returns.c.election == election, returns.c.bureau == bureau,
                                  returns.c.status == "accepted")
    if excluding is not None:
        query = query.where(returns.c.return_id != excluding)
    return conn.execute(query.order_by(returns.c.seq.desc()).limit(1)).first()


class _BatchBroken(Exception):
    """A database error inside a request's savepoint: the batch's transaction can no longer be trusted."""


@dataclass
class _Request:
    ret: Return
    findings: tuple[Finding, ...]
    also: Callable[[Connection, Submission], None] | None
    submission: Submission | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class Journal:
    """The durable record of returns, review items and the audit trail."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sqlite = url.startswith("sqlite")
        if self.sqlite:
            self._writer = _sqlite_engine(url, immediate=True)
            self._reader = _sqlite_engine(url, immediate=False)
        else:
            self._writer = self._reader = create_engine(url, pool_pre_ping=True)
            _forget_connections_after_fork(self._writer)
        self.create_tables(metadata)
        self._committer_lock = threading.Lock()
        self._committer_pid: int | None = None
        self._requests: queue.SimpleQueue[_Request] = queue.SimpleQueue()

    def create_tables(self, tables: MetaData) -> None:
        """Create the tables missing from the database, whichever of the parts starting at once gets there first.

        On PostgreSQL two processes creating one table at the same moment (every service started together on an
        empty database) make one fail on pg_type's unique index: the creations take turns under a lock."""
        with self._writer.begin() as conn:
            if not self.sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext('remontee create tables'))"))
            tables.create_all(conn)

    def dispose(self) -> None:
        self._writer.dispose()
        self._reader.dispose()

    @property
    def engine(self) -> Engine:
        return self._writer

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction, committed (and on disk) when the block exits without error."""
        with self._writer.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._reader.connect() as conn:
            yield conn

    def lock_bureau(self, conn: Connection, election: str, bureau: str) -> None:
        """Serialize, inside the caller's transaction, every writer that reads or decides a bureau's returns.

        A submission and a supervisor's decision on the same bureau must not interleave: a duplicate
        journaled meanwhile would be answered with the fate of a return decided without it."""
        if not self.sqlite:  # SQLite's BEGIN IMMEDIATE already serializes writers
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"{election}/{bureau}"})

    def submit(
        self,
        ret: Return,
        findings: Sequence[Finding] = (),
        *,
        also: Callable[[Connection, Submission], None] | None = None,
    ) -> Submission:
        """Journal `ret` with the channel's findings plus the history checks, durably, and say what became of it.

        Returns only once the transaction is committed (on disk). Concurrent submissions from
        the threads of one process are committed together (group commit: one fsync for many
        returns), each in its own savepoint, so one that fails changes nothing for the others.
        `also` runs inside the same transaction (the review UI closes its item and writes the
        audit row there), so the return and its consequences are on disk together or not at all.
        """
        request = _Request(ret, tuple(findings), also)
        self._committer().put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        assert request.submission is not None
        return request.submission

    def _committer(self) -> queue.SimpleQueue[_Request]:
        with self._committer_lock:
            # Started lazily, and again in a forked child (gunicorn, RQ), which inherits no thread.
            if self._committer_pid != os.getpid():
                self._requests = queue.SimpleQueue()
                threading.Thread(target=self._commit_loop, args=(self._requests,), name="journal-commit",
                                 daemon=True).start()
                self._committer_pid = os.getpid()
            return self._requests

    def _commit_loop(self, requests: queue.SimpleQueue[_Request]) -> None:
        while True:
            batch = [requests.get()]
            while len(batch) < MAX_GROUP_COMMIT:
                try:
                    batch.append(requests.get_nowait())
                except queue.Empty:
                    break
            # One order for the bureau locks across processes (PostgreSQL), arrival order within a bureau.
            batch.sort(key=lambda r: (r.ret.election, r.ret.bureau))
            self._commit_batch(batch)
            for request in batch:
                request.done.set()

    def _commit_batch(self, batch: list[_Request]) -> None:
        """Commit the batch in one transaction, each request in a savepoint of its own; say what became of each.

        A request that fails on its own terms (a supervisor's item taken meanwhile) is rolled back to its
        savepoint and the others commit. A database error is another matter: on a full disk or an I/O
        error SQLite undoes the whole transaction, savepoints and all, and the next savepoint silently
        begins a new one, so the requests before it would be acknowledged for rows that are gone. Then
        the transaction is abandoned and each request is committed again alone.
        """
        try:
            with self.write() as conn:
                for request in batch:
                    try:
                        with conn.begin_nested():
                            request.submission = self._submit_in(conn, request.ret, request.findings, request.also)
                    except SQLAlchemyError as exc:
                        if len(batch) > 1:
                            raise _BatchBroken from exc
                        request.error = exc
                    except Exception as exc:  # handed back to that caller alone
                        request.error = exc
        except _BatchBroken:
            for request in batch:
                request.submission = request.error = None
                self._commit_batch([request])
        except Exception as exc:  # the commit failed: nobody is acknowledged
            for request in batch:
                request.submission, request.error = None, request.error or exc

    def _submit_in(
        self,
        conn: Connection,
        ret: Return,
        findings: Sequence[Finding],
        also: Callable[[Connection, Submission], None] | None,
    ) -> Submission:
        self.lock_bureau(conn, ret.election, ret.bureau)
        latest = self._latest_accepted(conn, ret.election, ret.bureau)
        pending = self._pending(conn, ret.election, ret.bureau)
        all_findings = (*findings, *check_history(ret, latest, pending))
        status = decide(all_findings)
        now = time.time()
        row = {
            "return_id": ret.return_id,
            "election": ret.election,
            "bureau": ret.bureau,
            "channel": ret.channel,
            "status": status,
            "payload": json.dumps(ret.with_status(status).to_dict(), ensure_ascii=False),
            "findings": json.dumps([f.to_dict() for f in all_findings], ensure_ascii=False),
            "received_at": ret.received_at,
            "journaled_at": now,
            "supersedes": ret.supersedes,
        }
        if status == "duplicate":
            # The channel's own findings (LOW_CONFIDENCE, a broken sum) may come first: the original is the DUPLICATE's.
            original_id = next(f.details["return_id"] for f in all_findings if f.code == Reason.DUPLICATE)
            original = conn.execute(
                select(returns.c.receipt, returns.c.status).where(returns.c.return_id == original_id)
            ).one()
            conn.execute(insert(returns).values(**row, duplicate_of=original_id))
            submission = Submission(original_id, original.receipt, original.status, tuple(all_findings))
        else:
            seq = conn.execute(insert(returns).values(**row)).inserted_primary_key[0]
            receipt = receipt_for(seq)
            conn.execute(update(returns).where(returns.c.seq == seq).values(receipt=receipt))
            if status == "review":
                conn.execute(
                    insert(review_items).values(
                        return_id=ret.return_id,
                        election=ret.election,
                        bureau=ret.bureau,
                        channel=ret.channel,
                        reasons=json.dumps(sorted({str(f.code) for f in all_findings})),
                        created_at=now,
                        state="open",
                    )
                )
            submission = Submission(ret.return_id, receipt, status, tuple(all_findings))
        if also is not None:
            also(conn, submission)
        return submission

    def _latest_accepted(self, conn: Connection, election: str, bureau: str) -> Return | None:
        row = latest_accepted_row(conn, election, bureau)
        return Return.from_dict(json.loads(row.payload)) if row else None

    def _pending(self, conn: Connection, election: str, bureau: str) -> list[Return]:
        """The bureau's returns waiting in review, the latest first."""
        rows = conn.execute(
            select(returns.c.payload)
            .where(returns.c.election == election, returns.c.bureau == bureau, returns.c.status == "review")
            .order_by(returns.c.seq.desc())
        )
        return [Return.from_dict(json.loads(r.payload)) for r in rows]

    def latest_accepted(self, election: str, bureau: str) -> Return | None:
        with self.read() as conn:
            return self._latest_accepted(conn, election, bureau)

    def get(self, return_id: str) -> JournalEntry | None:
        with self.read() as conn:
            row = conn.execute(select(returns).where(returns.c.return_id == return_id)).first()
            return _entry(row) if row else None

    def entries(self, election: str | None = None, bureau: str | None = None) -> list[JournalEntry]:
        query = select(returns).order_by(returns.c.seq)
        if election is not None:
            query = query.where(returns.c.election == election)
        if bureau is not None:
            query = query.where(returns.c.bureau == bureau)
        with self.read() as conn:
            return [_entry(r) for r in conn.execute(query)]

    # --- the outbox, for the relay ---

    def outbox(self, limit: int = 500) -> list[dict[str, Any]]:
        """Accepted returns not yet on RQ, oldest first, as the job's argument."""
        with self.read() as conn:
            rows = conn.execute(
                select(returns.c.payload)
                .where(returns.c.status == "accepted", returns.c.enqueued_at.is_(None))
                .order_by(returns.c.seq)
                .limit(limit)
            )
            return [json.loads(r.payload) for r in rows]

    def mark_enqueued(self, return_ids: Sequence[str]) -> None:
        if not return_ids:
            return
        with self.write() as conn:
            conn.execute(
                update(returns).where(returns.c.return_id.in_(list(return_ids))).values(enqueued_at=time.time())
            )

    def relayed_since(self, since: float) -> list[dict[str, Any]]:
        """Accepted returns the relay put on RQ after `since` (unix time), for reconciliation."""
        with self.read() as conn:
            rows = conn.execute(
                select(returns.c.payload)
                .where(returns.c.status == "accepted", returns.c.enqueued_at >= since)
                .order_by(returns.c.seq)
            )
            return [json.loads(r.payload) for r in rows]

    def outbox_backlog(self) -> int:
        with self.read() as conn:
            return conn.execute(
                select(func.count())
                .select_from(returns)
                .where(returns.c.status == "accepted", returns.c.enqueued_at.is_(None))
            ).scalar_one()

    # --- the audit trail ---

    @staticmethod
    def record_audit(
        conn: Connection, actor: str, action: str, subject: str | None, before: Any = None, after: Any = None
    ) -> None:
        """Append one audit row inside the caller's transaction; the trail is never updated or deleted."""
        conn.execute(
            insert(audit).values(
                at=time.time(),
                actor=actor,
                action=action,
                subject=subject,
                before=None if before is None else json.dumps(before, ensure_ascii=False, sort_keys=True),
                after=None if after is None else json.dumps(after, ensure_ascii=False, sort_keys=True),
            )
        )
