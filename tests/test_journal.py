"""The journal and the relay against a real SQLite file and a real redis-server (stopped and restarted)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from redis import Redis
from rq import Queue
from sqlalchemy import event, select, update

from conftest import PostgresServer, RedisServer
from forms import Election
from returns_queue.jobs import return_job_id
from returns_queue.journal import Journal, _Request, receipt_for, returns, review_items
from returns_queue.relay import Relay
from validation import Reason, new_return

JOB = "returns_queue.consolidation.consolidate"
COUNTS = {"votants": 412, "blancs_nuls": 7, "exprimes": 405, "hollande": 250, "aubry": 155}


def submit(journal: Journal, election: Election, counts=COUNTS, channel="ivr", bureau="750120"):
    return journal.submit(new_return(election, bureau, counts, channel, {"call_id": "c"}))


def test_receipts_carry_a_luhn_check_digit() -> None:
    assert receipt_for(1) == "0000018"
    assert receipt_for(123456) == "1234566"
    # Any single misheard digit breaks the check.
    for seq in (1, 42, 98765):
        good = receipt_for(seq)
        for pos in range(len(good)):
            for d in "0123456789":
                if d != good[pos]:
                    bad = good[:pos] + d + good[pos + 1 :]
                    assert receipt_for(int(bad[:-1])) != bad


def test_an_accepted_return_is_durable_and_waits_in_the_outbox(tmp_path: Path, election_t2: Election) -> None:
    url = f"sqlite:///{tmp_path / 'j.sqlite3'}"
    first = Journal(url)
    submission = submit(first, election_t2)
    assert submission.status == "accepted" and submission.findings == ()
    first.dispose()
    reopened = Journal(url)  # what a restarted process sees
    entry = reopened.get(submission.return_id)
    assert entry is not None and entry.receipt == submission.receipt and entry.enqueued_at is None
    assert reopened.outbox()[0]["return_id"] == submission.return_id
    assert reopened.outbox_backlog() == 1
    with reopened.read() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL


def test_duplicate_correction_and_conflict(journal: Journal, election_t2: Election) -> None:
    first = submit(journal, election_t2)
    again = submit(journal, election_t2)
    assert (again.status, again.receipt, again.return_id) == ("accepted", first.receipt, first.return_id)
    assert [f.code for f in again.findings] == [Reason.DUPLICATE]
    changed = {**COUNTS, "hollande": 251, "aubry": 154}
    correction = submit(journal, election_t2, changed)
    conflict = submit(journal, election_t2, {**COUNTS, "hollande": 240, "aubry": 165}, channel="pen")
    assert (correction.status, [f.code for f in correction.findings]) == ("review", [Reason.CORRECTION])
    assert (conflict.status, [f.code for f in conflict.findings]) == ("review", [Reason.CHANNEL_CONFLICT])
    # The same corrected figures sent again join the waiting item instead of opening another.
    repeat = submit(journal, election_t2, changed)
    assert (repeat.status, repeat.return_id) == ("review", correction.return_id)
    with journal.read() as conn:
        items = conn.execute(select(review_items.c.return_id, review_items.c.reasons)).all()
        statuses = [r.status for r in conn.execute(select(returns.c.status).order_by(returns.c.seq))]
    assert {(i.return_id, i.reasons) for i in items} == {
        (correction.return_id, json.dumps(["CORRECTION"])),
        (conflict.return_id, json.dumps(["CHANNEL_CONFLICT"])),
    }
    assert statuses == ["accepted", "duplicate", "review", "review", "duplicate"]
    assert [p["return_id"] for p in journal.outbox()] == [first.return_id]


def test_a_call_after_a_supervisors_decision_is_a_correction(journal: Journal, election_t2: Election) -> None:
    """The bureau's accepted figures are a supervisor's (channel `review`): the president calling again with others
    corrects them; the review queue used to show a CHANNEL_CONFLICT "with review"."""
    first = submit(journal, election_t2)
    decided = journal.submit(new_return(election_t2, "750120", {**COUNTS, "hollande": 251, "aubry": 154}, "review",
                                        {"supervisor": "ana"}, supersedes=first.return_id))
    again = submit(journal, election_t2, {**COUNTS, "hollande": 252, "aubry": 153})
    assert decided.status == "accepted" and again.status == "review"
    assert [(f.code, f.details["return_id"]) for f in again.findings] == [(Reason.CORRECTION, decided.return_id)]
    with journal.read() as conn:
        reasons = conn.execute(select(review_items.c.reasons).where(review_items.c.return_id == again.return_id))
        assert reasons.scalar_one() == json.dumps(["CORRECTION"])


def test_new_figures_while_the_first_wait_in_review_wait_too(journal: Journal, election_t2: Election) -> None:
    """A president sends figures whose sums break (review), then calls back with others: nothing is accepted
    yet, and the second set must not be, or the supervisor's decision on the first overwrites it unseen."""
    from validation import check_return

    broken = new_return(election_t2, "750120", {**COUNTS, "aubry": 160}, "ivr", {"call_id": "c1"})
    first = journal.submit(broken, check_return(broken, election_t2, None))
    fixed = submit(journal, election_t2)
    assert first.status == "review" and fixed.status == "review"
    assert [(f.code, f.details["return_id"]) for f in fixed.findings] == [(Reason.CORRECTION, first.return_id)]
    assert journal.outbox() == []


def test_a_page_docked_twice_with_low_confidence_is_a_duplicate_of_the_waiting_one(
    journal: Journal, election_t2: Election
) -> None:
    """The second upload of one page carries the OCR's own finding as well: the original is the DUPLICATE's."""
    from validation import Finding

    unsure = (Finding(Reason.LOW_CONFIDENCE, "aubry", "lecture incertaine", {"confidence": 0.4}),)
    first = journal.submit(new_return(election_t2, "750120", COUNTS, "pen", {"upload_id": "u1"}), unsure)
    again = journal.submit(new_return(election_t2, "750120", COUNTS, "pen", {"upload_id": "u2"}), unsure)
    assert first.status == "review"
    assert (again.status, again.return_id, again.receipt) == ("review", first.return_id, first.receipt)
    assert [f.code for f in again.findings] == [Reason.LOW_CONFIDENCE, Reason.DUPLICATE]


def test_channel_findings_send_a_return_to_review(journal: Journal, election_t2: Election) -> None:
    from validation import check_return

    ret = new_return(election_t2, "750120", {**COUNTS, "aubry": 160}, "ivr", {"call_id": "c"})
    submission = journal.submit(ret, check_return(ret, election_t2, None))
    assert submission.status == "review"
    assert {f.code for f in submission.findings} == {Reason.UNKNOWN_BUREAU, Reason.SUM_MISMATCH}
    assert journal.outbox() == []


def test_concurrent_identical_submissions_make_one_accepted_return(journal: Journal, election_t2: Election) -> None:
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: submit(journal, election_t2), range(16)))
    assert len({r.return_id for r in results}) == 1
    assert len({r.receipt for r in results}) == 1
    assert [e.status for e in journal.entries()].count("accepted") == 1


def test_the_relay_enqueues_once_with_a_job_id_from_the_return(
    journal: Journal, redis: Redis, election_t2: Election
) -> None:
    a = submit(journal, election_t2, bureau="1")
    b = submit(journal, election_t2, bureau="2")
    submit(journal, election_t2, bureau="1")  # duplicate: no second job
    relay = Relay(journal, redis, JOB)
    assert relay.relay_once() == 2
    queue = Queue("returns", connection=redis)
    assert queue.job_ids == [return_job_id(a.return_id), return_job_id(b.return_id)]
    job = queue.fetch_job(return_job_id(a.return_id))
    assert job is not None and job.func_name == JOB and job.args[0]["return_id"] == a.return_id
    assert job.args[0]["status"] == "accepted" and job.args[0]["schema"] == "remontee.return/1"
    # A relay that died between enqueueing and marking the outbox must not enqueue again.
    with journal.write() as conn:
        conn.execute(update(returns).values(enqueued_at=None))
    assert relay.relay_once() == 0
    assert queue.count == 2 and journal.outbox_backlog() == 0


def test_a_relay_holding_the_lock_keeps_others_out(journal: Journal, redis: Redis, election_t2: Election) -> None:
    submit(journal, election_t2)
    lock = redis.lock("remontee:relay:lock", timeout=30)
    assert lock.acquire(blocking=False)
    assert Relay(journal, redis, JOB).relay_once() == 0
    lock.release()
    assert Relay(journal, redis, JOB).relay_once() == 1


def test_returns_survive_redis_going_down_and_are_relayed_when_it_is_back(
    journal: Journal, redis: Redis, redis_server: RedisServer, election_t2: Election
) -> None:
    before = submit(journal, election_t2, bureau="10")
    relay = Relay(journal, Redis.from_url(redis_server.url, socket_timeout=2), JOB)
    stop = threading.Event()
    thread = relay.start(stop)
    try:
        _wait(lambda: journal.outbox_backlog() == 0)
        redis_server.stop()
        # Redis is down: submitting still succeeds, because the journal is what acknowledges.
        during = [submit(journal, election_t2, bureau=str(100 + i)) for i in range(5)]
        assert all(s.status == "accepted" for s in during)
        time.sleep(0.5)  # give the relay a chance to try (and fail) while Redis is away
        assert journal.outbox_backlog() == 5
        redis_server.start()
        _wait(lambda: journal.outbox_backlog() == 0, timeout=15)
    finally:
        stop.set()
        relay.wakeup.set()
        thread.join(5)
    queue = Queue("returns", connection=redis_server.client())
    expected = {return_job_id(s.return_id) for s in [before, *during]}
    assert set(queue.job_ids) == expected  # nothing lost, nothing twice (AOF kept the first job)


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_a_failing_submission_in_a_group_commit_changes_nothing_for_the_others(
    journal: Journal, election_t2: Election
) -> None:
    barrier = threading.Barrier(6)

    def refuse(conn, submission) -> None:
        raise RuntimeError("approved twice")

    def one(i: int):
        ret = new_return(election_t2, str(500 + i), COUNTS, "ivr", {"call_id": str(i)})
        barrier.wait()
        try:
            return journal.submit(ret, also=refuse if i == 3 else None)
        except RuntimeError as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert isinstance(results[3], RuntimeError)
    assert all(r.status == "accepted" for i, r in enumerate(results) if i != 3)
    assert sorted(e.ret.bureau for e in journal.entries()) == ["500", "501", "502", "504", "505"]


def test_a_database_error_in_a_group_commit_acknowledges_only_what_is_on_disk(
    tmp_path: Path, election_t2: Election
) -> None:
    """On SQLITE_FULL (or an I/O error) SQLite undoes the whole transaction, savepoints and all: the returns
    already in the batch must not be acknowledged for rows that are gone (two callers got one receipt)."""
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite3'}")
    with journal.write() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    @event.listens_for(journal._writer, "connect")
    def cap(dbapi_connection, _record) -> None:  # the file may grow a few pages: room for small returns only
        dbapi_connection.execute(f"PRAGMA max_page_count={pages + 6}")

    journal._writer.dispose()
    small = [new_return(election_t2, code, COUNTS, "ivr", {"call_id": code}) for code in ("501", "503")]
    big = new_return(election_t2, "502", COUNTS, "ivr", {"call_id": "c", "caller_id": "X" * 60_000})
    batch = [_Request(r, (), None) for r in (small[0], big, small[1])]  # one group commit, in bureau order
    journal._commit_batch(batch)
    assert batch[1].submission is None and batch[1].error is not None
    acknowledged = [r.submission for r in batch if r.submission is not None]
    assert [s.status for s in acknowledged] == ["accepted", "accepted"]
    assert len({s.receipt for s in acknowledged}) == 2
    on_disk = {e.ret.return_id: e.receipt for e in journal.entries()}
    assert on_disk == {s.return_id: s.receipt for s in acknowledged}
    journal.dispose()


def test_reconciliation_enqueues_again_what_redis_lost(journal: Journal, redis: Redis, election_t2: Election) -> None:
    kept = submit(journal, election_t2, bureau="1")
    lost = submit(journal, election_t2, bureau="2")
    relay = Relay(journal, redis, JOB)
    assert relay.relay_once() == 2
    # What a Redis crash inside its fsync window looks like: the job is gone, the journal says relayed.
    queue = Queue("returns", connection=redis)
    queue.remove(return_job_id(lost.return_id))
    redis.delete(f"rq:job:{return_job_id(lost.return_id)}")
    assert relay.reconcile() == 1
    assert relay.reconcile() == 0
    assert sorted(queue.job_ids) == sorted([return_job_id(kept.return_id), return_job_id(lost.return_id)])


def test_reconciliation_enqueues_again_a_job_popped_just_as_redis_died(
    journal: Journal, redis: Redis, election_t2: Election
) -> None:
    from rq.job import Job

    stranded = submit(journal, election_t2, bureau="3")
    popped_now = submit(journal, election_t2, bureau="4")
    relay = Relay(journal, redis, JOB)
    assert relay.relay_once() == 2
    queue = Queue("returns", connection=redis)
    # A worker popped both jobs; Redis died before it recorded either as started (the election-night
    # simulation saw it): each is `queued` in no queue and no registry, forever.
    for submission in (stranded, popped_now):
        redis.lrem(queue.key, 0, return_job_id(submission.return_id))
    redis.hset(Job.key_for(return_job_id(stranded.return_id)), "enqueued_at", "2011-10-09T20:14:03.000000Z")
    assert relay.reconcile() == 1  # the one popped a moment ago may still be starting: left alone
    assert queue.job_ids == [return_job_id(stranded.return_id)]
    assert relay.reconcile() == 0


def test_the_relay_thread_outlives_a_journal_it_cannot_read(
    tmp_path: Path, redis: Redis, election_t2: Election
) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'j.sqlite3'}")
    relay = Relay(journal, redis, JOB)
    with journal.write() as conn:
        conn.exec_driver_sql("ALTER TABLE returns RENAME TO returns_away")  # every outbox read now fails
    stop = threading.Event()
    thread = relay.start(stop)
    try:
        time.sleep(0.5)
        assert thread.is_alive()
        with journal.write() as conn:
            conn.exec_driver_sql("ALTER TABLE returns_away RENAME TO returns")
        submission = submit(journal, election_t2)
        relay.wakeup.set()
        _wait(lambda: journal.outbox_backlog() == 0)
        assert Queue("returns", connection=redis).job_ids == [return_job_id(submission.return_id)]
    finally:
        stop.set()
        relay.wakeup.set()
        thread.join(5)
        journal.dispose()


def test_parts_starting_together_on_an_empty_postgresql_database_all_start(postgres_server: PostgresServer) -> None:
    """Every service of docs/deploy.md creates the tables it needs at its start; started together on a fresh
    PostgreSQL database, those that raced on one table died of pg_type's unique index."""
    start = ("import sys; from returns_queue.journal import Journal; from pen_gateway.uploads import create_tables;"
             "from review.accounts import Accounts; from pen_gateway.signing import StationRegistry;"
             "j = Journal(sys.argv[1]); create_tables(j); StationRegistry(j, sys.argv[2])")
    root = Path(__file__).resolve().parents[1]
    for _ in range(3):
        url = postgres_server.create_database()
        parts = [subprocess.Popen([sys.executable, "-c", start, url, "/nonexistent"], cwd=root,
                                  stderr=subprocess.PIPE) for _ in range(6)]
        errors = [p.communicate(timeout=60)[1].decode() for p in parts]
        assert [p.returncode for p in parts] == [0] * 6, [e.strip().splitlines()[-1] for e in errors if e.strip()]
