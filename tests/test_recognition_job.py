"""The `ocr` RQ job end to end: stored upload rows, a real Redis, a real RQ worker, the journal and the relay."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from redis import Redis
from rq import Retry, SimpleWorker
from rq.job import Job, JobStatus
from sqlalchemy import func, select
from test_pen_api_storage import fill, tmpfs  # noqa: F401 - tmpfs is a fixture
from ulid import ULID

from forms import Election
from pen_gateway.artefacts import field_crop_path, load_reading, page_path
from pen_gateway.ocr_relay import OcrRelay, enqueue_ocr
from pen_gateway.recognition.job import ROOM_WAIT_SECONDS, context, process_upload
from pen_gateway.uploads import Upload, create_tables, get_upload, record_upload
from registry import Registry
from returns_queue.jobs import RETURNS_QUEUE, ocr_job_id, ocr_queue, return_job_id
from returns_queue.journal import Journal, returns, review_items
from returns_queue.relay import Relay
from returns_queue.worker import StopsPromptly
from settings import Settings
from tests.filled_forms import (
    inkml_upload,
    needs_handwriting,
    read,
    scan_upload,
    slip_with_one_fix,
    well_read_seed,
)
from tests.form_fill import Distortion, consistent_counts
from validation import utc_now

pytestmark = needs_handwriting
# A scanner slightly askew, the same for every draw: what is tested here is the job, not the straightening.
STEADY = Distortion(rotation_deg=-2.0, scale=0.95, jpeg_quality=80)

JOB = "pen_gateway.recognition.job.recognize_upload"
ROOT = Path(__file__).resolve().parents[1]


def steady_scan(election: Election, bureau: str, counts: dict[str, int], seed: int) -> bytes:
    return scan_upload(election, bureau, counts, seed, distortion=lambda _: STEADY, quality=85)


@pytest.fixture
def settings(tmp_path: Path, journal: Journal, demo_registry_files: tuple[Path, Path],
             monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The worker's settings come from the environment, as `run_gateway.py worker` passes them."""
    env = {"REMONTEE_VAR_DIR": str(tmp_path / "var"), "REMONTEE_DB_URL": journal.url,
           "REMONTEE_REGISTRY": str(demo_registry_files[0]), "REMONTEE_ELECTION": "primaire-2011-t1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    create_tables(journal)
    return Settings.from_env()


def store_upload(journal: Journal, directory: Path, data: bytes, content_type: str, *,
                 bureau: str | None = None, pen_serial: str | None = None, station_id: str = "station-7",
                 received_at: float = 0.0) -> str:
    """What the upload API leaves behind before its 202: the raw bytes on disk and a `queued` row."""
    upload_id = str(ULID())
    sha = hashlib.sha256(data).hexdigest()
    path = directory / "raw" / sha
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    with journal.write() as conn:
        record_upload(conn, Upload(upload_id, sha, path, content_type, len(data), station_id, pen_serial, bureau,
                                   None, "queued", None, None, None, received_at))
    return upload_id


def run_worker(redis: Redis, upload_ids: list[str]) -> list[Job]:
    queue = ocr_queue(redis)
    jobs = [queue.enqueue(JOB, upload_id, job_id=ocr_job_id(upload_id)) for upload_id in upload_ids]
    SimpleWorker([queue], connection=redis).work(burst=True)
    for job in jobs:
        job.refresh()
    return jobs


def test_uploads_become_returns_accepted_or_for_review(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path
) -> None:
    bureaux = sorted(registry.bureaux.values(), key=lambda b: b.code)
    clean = consistent_counts(election_t1, np.random.default_rng(1), inscrits=bureaux[0].inscrits)
    truth, slipped, field = slip_with_one_fix(election_t1, seed=11)
    # Hands the model reads right: what is tested here is what the job does with a reading.
    ink_seed = well_read_seed(lambda s: read(inkml_upload(election_t1, clean, s), "application/inkml+xml"), clean,
                              confident=registry, bureau=bureaux[0].code)
    scan_seed = well_read_seed(lambda s: read(steady_scan(election_t1, bureaux[1].code, slipped, s), "image/jpeg"),
                               slipped)
    docked = time.time() - 3600  # acknowledged an hour before a worker read it: the return was received then
    ink_id = store_upload(journal, tmp_path, inkml_upload(election_t1, clean, ink_seed), "application/inkml+xml",
                          pen_serial=bureaux[0].pen_serials[0], received_at=docked)
    scan_id = store_upload(journal, tmp_path, steady_scan(election_t1, bureaux[1].code, slipped, scan_seed),
                           "image/jpeg")
    jobs = run_worker(redis, [ink_id, scan_id])
    assert [j.get_status() for j in jobs] == [JobStatus.FINISHED, JobStatus.FINISHED]

    ink = get_upload(journal, ink_id)
    assert ink is not None and ink.status == "accepted", jobs[0].return_value()
    entry = journal.get(ink.return_id)
    assert entry is not None and entry.status == "accepted" and entry.receipt == ink.receipt
    assert entry.ret.bureau == bureaux[0].code and entry.ret.channel == "pen"
    assert dict(entry.ret.counts) == clean
    assert entry.ret.source == {"upload_id": ink_id, "station_id": "station-7", "pen_serial": bureaux[0].pen_serials[0]}
    assert entry.ret.received_at == utc_now(docked)

    scan = get_upload(journal, scan_id)
    assert scan is not None and scan.status == "review"
    entry = journal.get(scan.return_id)
    assert entry is not None and entry.ret.bureau == bureaux[1].code
    assert "SUM_MISMATCH" in {str(f.code) for f in entry.findings}
    with journal.read() as conn:
        reasons = conn.execute(select(review_items.c.reasons).where(review_items.c.return_id == scan.return_id))
        assert "SUM_MISMATCH" in json.loads(reasons.scalar_one())

    # The reviewer's artefacts.
    var = settings.var_dir
    for upload_id, name, magic in ((ink_id, "page.png", b"\x89PNG"), (scan_id, "page.jpg", b"\xff\xd8\xff")):
        # A scan's page is a JPEG, as scans are; the page drawn from pen strokes a PNG, sharp and small.
        assert page_path(var, upload_id).name == name and page_path(var, upload_id).read_bytes().startswith(magic)
        assert page_path(var, upload_id).stat().st_size > 1000
        assert all(field_crop_path(var, upload_id, f.id).is_file() for f in election_t1.fields)
    reading = load_reading(var, scan_id)
    assert reading is not None
    assert reading["bureau"] == bureaux[1].code and reading["election"] == "primaire-2011-t1"
    assert reading["qr"] == f"primaire-2011-t1 bureau {bureaux[1].code} formulaire 1"
    assert reading["suggestions"] == [[field, truth[field]]]
    assert set(reading["fields"]) == {f.id for f in election_t1.fields}
    assert len(reading["fields"]["votants"]["digits"]) == 4

    # The relay puts the accepted one, and only it, on the returns queue.
    Relay(journal, redis, settings.consolidate_job).relay_once()
    assert redis.exists(f"rq:job:{return_job_id(ink.return_id)}")
    assert not redis.exists(f"rq:job:{return_job_id(scan.return_id)}")
    assert redis.llen(f"rq:queue:{RETURNS_QUEUE}") == 1


def test_a_job_run_twice_makes_one_return(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path
) -> None:
    bureau = sorted(registry.bureaux.values(), key=lambda b: b.code)[5]
    counts = consistent_counts(election_t1, np.random.default_rng(2), inscrits=bureau.inscrits)
    upload_id = store_upload(journal, tmp_path, inkml_upload(election_t1, counts, seed=2), "application/inkml+xml",
                             bureau=bureau.code)
    first = run_worker(redis, [upload_id])[0].return_value()
    redis.flushdb()  # a second job for the same upload (a retry, a supervisor's "read again")
    second = run_worker(redis, [upload_id])[0].return_value()
    third = process_upload(upload_id, context(settings))
    assert first["return_id"] == second["return_id"] == third["return_id"]
    assert first["receipt"] == second["receipt"] == third["receipt"]
    with journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 1


def test_a_page_with_no_bureau_anywhere_waits_for_a_human(
    settings: Settings, journal: Journal, redis: Redis, election_t1: Election, tmp_path: Path
) -> None:
    counts = consistent_counts(election_t1, np.random.default_rng(3), inscrits=800)
    upload_id = store_upload(journal, tmp_path, inkml_upload(election_t1, counts, seed=3), "application/inkml+xml",
                             pen_serial="UNREGISTERED-PEN")
    job = run_worker(redis, [upload_id])[0]
    assert job.get_status() == JobStatus.FINISHED
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status == "review" and upload.return_id is None
    assert upload.error and "bureau introuvable" in upload.error
    with journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 0
    reading = load_reading(settings.var_dir, upload_id)
    assert reading is not None and reading["fields"]["votants"]["value"] == counts["votants"]


def test_stored_bytes_that_changed_fail_the_job_and_say_why(
    settings: Settings, journal: Journal, redis: Redis, tmp_path: Path
) -> None:
    upload_id = store_upload(journal, tmp_path, b"<ink xmlns='http://www.w3.org/2003/InkML'></ink>",
                             "application/inkml+xml", bureau="010101")
    upload = get_upload(journal, upload_id)
    assert upload is not None
    upload.path.write_bytes(b"bit rot")
    job = run_worker(redis, [upload_id])[0]
    assert job.get_status() == JobStatus.FAILED
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status == "failed" and "SHA-256" in (upload.error or "")


def test_the_operators_worker_forks_a_horse_per_job_with_its_own_flags(
    journal: Journal, redis: Redis, redis_server, registry: Registry, election_t1: Election,  # type: ignore[no-untyped-def]
    demo_registry_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run_gateway.py worker --burst`: a real forking RQ worker, settings given as flags, not environment."""
    for key in ("REMONTEE_VAR_DIR", "REMONTEE_DB_URL", "REMONTEE_REGISTRY", "REMONTEE_ELECTION", "REMONTEE_REDIS_URL"):
        monkeypatch.delenv(key, raising=False)
    create_tables(journal)
    bureau = sorted(registry.bureaux.values(), key=lambda b: b.code)[7]
    counts = consistent_counts(election_t1, np.random.default_rng(8), inscrits=bureau.inscrits)
    upload_id = store_upload(journal, tmp_path, inkml_upload(election_t1, counts, seed=8), "application/inkml+xml",
                             bureau=bureau.code)
    ocr_queue(redis).enqueue(JOB, upload_id, job_id=ocr_job_id(upload_id))
    var = tmp_path / "var"
    completed = subprocess.run(
        [sys.executable, str(ROOT / "run_gateway.py"), "worker", "--burst", "--queues", "ocr",
         "--redis-url", redis_server.url, "--db-url", journal.url, "--var-dir", str(var),
         "--registry", str(demo_registry_files[0]), "--election", "primaire-2011-t1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status in ("accepted", "review") and upload.return_id
    entry = journal.get(upload.return_id)
    assert entry is not None and entry.ret.bureau == bureau.code and entry.receipt == upload.receipt
    assert load_reading(var, upload_id) is not None, "artefacts under the worker's --var-dir"


# --- an attempt that fails: the journal away, a full disk; RQ's retries and the OCR relay's reconciliation ---

def store_bureau_page(journal: Journal, registry: Registry, election: Election, tmp_path: Path, seed: int) -> str:
    bureau = sorted(registry.bureaux.values(), key=lambda b: b.code)[seed]
    counts = consistent_counts(election, np.random.default_rng(seed), inscrits=bureau.inscrits)
    return store_upload(journal, tmp_path, inkml_upload(election, counts, seed=seed), "application/inkml+xml",
                        bureau=bureau.code)


def journal_away(journal: Journal) -> None:
    """Every read and write of the uploads table fails from now on, as with the database down."""
    with journal.write() as conn:
        conn.exec_driver_sql("ALTER TABLE uploads RENAME TO uploads_away")


def journal_back(journal: Journal) -> None:
    with journal.write() as conn:
        conn.exec_driver_sql("ALTER TABLE uploads_away RENAME TO uploads")


class PromptWorker(StopsPromptly, SimpleWorker):
    """In this process, and quitting at once (RQ's own often waits a minute for its pub/sub thread)."""


def run_due_jobs(redis: Redis) -> None:
    """A burst worker with RQ's scheduler, as `run_gateway.py worker` runs it: scheduled retries that are due run."""
    PromptWorker([ocr_queue(redis)], connection=redis).work(burst=True, with_scheduler=True)


def run_one_attempt(redis: Redis) -> None:
    """The next attempt of the `ocr` jobs, as if their retry's interval had passed."""
    scheduled = ocr_queue(redis).scheduled_job_registry
    for job_id in scheduled.get_job_ids():
        scheduled.schedule(Job.fetch(job_id, connection=redis), datetime.now(UTC) - timedelta(seconds=1))
    run_due_jobs(redis)


def test_an_attempt_that_fails_is_retried_minutes_later_not_at_once(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path
) -> None:
    """RQ's retries with no interval all ran within a second: a journal away for a few seconds used them all up."""
    upload_id = store_bureau_page(journal, registry, election_t1, tmp_path, seed=12)
    enqueue_ocr(redis, upload_id)
    journal_away(journal)
    try:
        run_due_jobs(redis)
        job = Job.fetch(ocr_job_id(upload_id), connection=redis)
        assert job.get_status() == JobStatus.SCHEDULED and job.retries_left == 4
        due = ocr_queue(redis).scheduled_job_registry.get_scheduled_time(job)
        assert due >= datetime.now(UTC) + timedelta(seconds=10)
    finally:
        journal_back(journal)
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status == "queued" and upload.error is None  # a retry remains
    run_one_attempt(redis)
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status in ("accepted", "review") and upload.return_id


def test_a_retry_left_overdue_by_a_dead_scheduler_is_enqueued_by_the_reconciliation(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path
) -> None:
    """A retry waits for RQ's scheduler, which dies with a Redis restart and comes back only at a worker's
    maintenance (ten minutes): the election-night simulation ended with an upload still queued that way."""
    upload_id = store_bureau_page(journal, registry, election_t1, tmp_path, seed=16)
    enqueue_ocr(redis, upload_id)
    relay = OcrRelay(journal, redis, grace=0.0)
    assert relay.relay_once(now=time.time() + 1) == 0
    journal_away(journal)
    try:
        run_due_jobs(redis)  # the first attempt fails: its retry is scheduled
    finally:
        journal_back(journal)
    job_id = ocr_job_id(upload_id)
    scheduled = ocr_queue(redis).scheduled_job_registry
    assert scheduled.get_job_ids() == [job_id]
    assert relay.reconcile(now=time.time() + 20, older_than=0) == 0  # due, not overdue: the scheduler's to enqueue
    assert relay.reconcile(now=time.time() + 3600) == 1  # long overdue, and no scheduler came
    assert scheduled.get_job_ids() == [] and ocr_queue(redis).job_ids == [job_id]
    PromptWorker([ocr_queue(redis)], connection=redis).work(burst=True)  # a worker without a scheduler
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status in ("accepted", "review") and upload.return_id


def test_an_upload_whose_job_used_up_its_retries_while_the_journal_was_away_is_read_once_it_is_back(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path
) -> None:
    """Every attempt, and the failure handler's own write, failed with the journal: the job ended FAILED with the
    upload still `queued` and marked seen on RQ, which neither the relay's pass nor its reconciliation ran again."""
    upload_id = store_bureau_page(journal, registry, election_t1, tmp_path, seed=13)
    enqueue_ocr(redis, upload_id)  # what the API does before its 202
    relay = OcrRelay(journal, redis, grace=0.0)
    assert relay.relay_once(now=time.time() + 1) == 0  # the job is on RQ: the upload is marked
    journal_away(journal)
    try:
        for _ in range(6):  # the first run and its five retries
            run_one_attempt(redis)
        job = Job.fetch(ocr_job_id(upload_id), connection=redis)
        assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
    finally:
        journal_back(journal)
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status == "queued"

    assert relay.relay_once(now=time.time() + 3600) == 0  # already marked: the pass leaves it
    assert relay.reconcile(now=time.time() + 3600) == 1
    assert ocr_queue(redis).job_ids == [ocr_job_id(upload_id)]
    assert relay.reconcile(now=time.time() + 3600) == 0  # its new job is waiting: not enqueued twice
    run_one_attempt(redis)
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status in ("accepted", "review") and upload.return_id
    assert relay.reconcile(now=time.time() + 3600) == 0
    with journal.read() as conn:
        assert conn.execute(select(func.count()).select_from(returns)).scalar_one() == 1


def test_an_upload_whose_jobs_keep_ending_without_a_word_goes_to_a_supervisor_not_round_and_round(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path
) -> None:
    """Reconciliation gives an upload whose job ended without writing its row a new job, but not for ever: a page
    whose work horse dies every time would be read again every eight minutes all night, and reach nobody."""
    upload_id = store_bureau_page(journal, registry, election_t1, tmp_path, seed=15)
    enqueue_ocr(redis, upload_id)
    relay = OcrRelay(journal, redis, grace=0.0, max_replacements=1)
    assert relay.relay_once(now=time.time() + 1) == 0
    replaced = []
    for _ in range(2):
        journal_away(journal)
        try:
            for _ in range(6):  # the first run and its five retries
                run_one_attempt(redis)
        finally:
            journal_back(journal)
        replaced.append(relay.reconcile(now=time.time() + 3600))
    assert replaced == [1, 0]
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status == "failed" and "à saisir à la main" in (upload.error or "")
    assert ocr_queue(redis).job_ids == []
    assert relay.reconcile(now=time.time() + 3600) == 0  # failed: no longer the relay's


def test_rq_lets_an_ocr_job_wait_for_room_before_it_kills_it(redis: Redis) -> None:
    """A timeout under the wait for room killed the job mid-wait, on every attempt while the disk stayed full."""
    enqueue_ocr(redis, "01JTIMEOUTOUTLASTSROOMWAIT0")
    job = Job.fetch(ocr_job_id("01JTIMEOUTOUTLASTSROOMWAIT0"), connection=redis)
    assert job.timeout is not None and job.timeout >= ROOM_WAIT_SECONDS + 60


def test_a_job_killed_by_its_timeout_while_a_retry_remains_leaves_the_upload_queued(
    settings: Settings, journal: Journal, redis: Redis, registry: Registry, election_t1: Election, tmp_path: Path,
    tmpfs,  # type: ignore[no-untyped-def]  # noqa: F811 - the fixture imported above
) -> None:
    """The artefact disk full, the job waiting for room when RQ's timeout kills it: a retry remains, so the upload
    is not `failed` (which sends it to a supervisor as beyond retries); once there is room, the retry reads it."""
    upload_id = store_bureau_page(journal, registry, election_t1, tmp_path, seed=14)
    filler = fill(tmpfs(settings.var_dir / "uploads" / "artefacts", 1024 * 1024))
    ocr_queue(redis).enqueue(JOB, upload_id, job_id=ocr_job_id(upload_id), job_timeout=5,
                             retry=Retry(max=1, interval=60))
    started = time.monotonic()
    run_due_jobs(redis)
    assert time.monotonic() - started < 30, "killed by its timeout, in the middle of its wait for room"
    job = Job.fetch(ocr_job_id(upload_id), connection=redis)
    assert job.get_status() == JobStatus.SCHEDULED and job.retries_left == 0
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status == "queued" and upload.error is None

    filler.unlink()
    run_one_attempt(redis)
    upload = get_upload(journal, upload_id)
    assert upload is not None and upload.status in ("accepted", "review") and upload.return_id


@pytest.fixture
def power_cut_disk(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], Path]]]:
    """A real ext4 on a loop device, and a power cut: its device's blocks copied as they are (what the page cache
    has not written back is lost, as in a real cut), then mounted again, the journal of ext4 replayed as at boot."""
    if os.geteuid() != 0:
        pytest.skip("a loop device and a mount need root; not root here")
    image, mounted, loops = tmp_path / "disk.img", [], []

    def attach(img: Path, where: Path) -> Path:
        done = subprocess.run(["losetup", "--find", "--show", str(img)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"no loop device here: {done.stderr.strip()}")
        loops.append(done.stdout.strip())
        where.mkdir()
        done = subprocess.run(["mount", "-t", "ext4", loops[-1], str(where)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount an ext4 here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    def cut() -> Path:
        copy = tmp_path / "after-the-cut.img"
        subprocess.run(["cp", "--sparse=always", str(image), str(copy)], check=True)
        return attach(copy, tmp_path / "after-the-cut")

    with open(image, "wb") as f:
        f.truncate(64 * 2**20)
    if subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True).returncode != 0:
        pytest.skip("no mkfs.ext4 here")
    try:
        yield attach(image, tmp_path / "disk"), cut
    finally:
        for where in reversed(mounted):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], check=False)
        for loop in loops:
            subprocess.run(["losetup", "-d", loop], check=False)


def test_the_reviewers_artefacts_survive_a_power_cut_with_the_return_they_were_read_for(
    power_cut_disk: tuple[Path, Callable[[], Path]], demo_registry_files: tuple[Path, Path], registry: Registry,
    election_t1: Election
) -> None:
    """The job journals the return (a commit on disk) after writing page.png, the crops and reading.json; written
    without a sync, a power cut after the commit left the return, its review item and its upload's status, and
    every artefact empty (ext4 had the names, not yet the blocks): the supervisor had no page to read."""
    disk, cut = power_cut_disk
    settings = Settings(var_dir=disk / "var", db_url=f"sqlite:///{disk / 'journal.sqlite3'}",
                        registry=demo_registry_files[0], election=election_t1.id)
    ctx = context(settings)
    bureau = sorted(registry.bureaux)[0]
    counts = consistent_counts(election_t1, np.random.default_rng(5), inscrits=registry.get(bureau).inscrits)
    upload_id = store_upload(ctx.journal, disk / "var" / "uploads", inkml_upload(election_t1, counts, 5),
                             "application/inkml+xml", bureau=bureau)
    os.sync()  # the upload API made these durable before its 202
    try:
        outcome = process_upload(upload_id, ctx)
        assert outcome["status"] in ("accepted", "review")
        after = cut()
    finally:
        ctx.journal.dispose()

    journal = Journal(f"sqlite:///{after / 'journal.sqlite3'}")
    try:
        upload = get_upload(journal, upload_id)
        assert upload is not None and upload.status == outcome["status"], "the job's commit is on disk"
    finally:
        journal.dispose()
    var = after / "var"
    reading = load_reading(var, upload_id)
    assert reading is not None and set(reading["fields"]) == {f.id for f in election_t1.fields}
    assert page_path(var, upload_id).stat().st_size > 0
    assert all(field_crop_path(var, upload_id, f.id).stat().st_size > 0 for f in election_t1.fields)
