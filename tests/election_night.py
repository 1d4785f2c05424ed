"""Election night, simulated against the running system: the plan, the callers, the docking stations, the faults,
and the final reckoning.

`run_night(NightPlan(...), workdir)` starts the real system as `run_gateway.py all` (a subprocess with its
own var dir, free ports, a generated registry with cheap PIN hashes, registered docking stations, and
a small tmpfs at `<var>/uploads` so the upload directory can be filled), then drives it the way the
night does: half the bureaux report by phone (scripted Asterisk peers over real TCP, several hundred
calls at once at the peak), half by digital pen (signed uploads of the printed form filled with real
held-out handwriting, as InkML strokes or distorted scans). Presidents make mistakes: arithmetic
slips corrected during the call, bureaux reporting by both channels with different figures, uploads
retried under the same Idempotency-Key or docked twice, calls dropped that call back and resume.
Faults are injected meanwhile: Redis killed and restarted, an RQ work horse killed in the middle of
a job, the pen gateway (gunicorn master) killed and restarted, the upload directory full.

When the queues have drained, `verify` checks the system from its own records (the journal, the
uploads table, the consolidation in Redis) against what the simulator saw acknowledged (a receipt on
the channel, a 202) and its ground truth; `NightResult.summary()` prints the figures.

Used by tests/test_election_night.py (1,000 bureaux, every fault, under two minutes) and
bench/election_night.py (10,000 bureaux). It lives in tests/ beside the drivers it builds on
(agi_peer.py, pen_helpers.py, form_fill.py), which bench scripts already import the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from agi_peer import HANGUP, SILENCE, Action, AsteriskPeer, CallRecord, press
from pen_helpers import PenClient
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.registry import FailedJobRegistry, ScheduledJobRegistry, StartedJobRegistry
from sqlalchemy import func, select

from forms import Election, load_election
from returns_queue.consolidation import latest_returns, totals
from returns_queue.jobs import OCR_QUEUE, RETURNS_QUEUE
from returns_queue.journal import Journal, returns, review_items
from settings import Settings

log = logging.getLogger("election_night")
ROOT = Path(__file__).resolve().parents[1]
PREFIX = "remontee/"
COUNTS_SHARE_OF_INSCRITS = (0.1, 0.5)


# --- the plan: who reports how, with which figures and which mistakes ---

@dataclass(frozen=True)
class NightPlan:
    bureaux: int = 1000
    election: str = "primaire-2011-t1"
    seed: int = 2011
    window: float = 60.0  # seconds into which the night's reporting is compressed
    phone_share: float = 0.5
    both_share: float = 0.02  # bureaux reporting by both channels, with different figures
    slip_share: float = 0.05  # phone: an arithmetic slip, heard back and corrected during the call
    drop_share: float = 0.03  # phone: the call drops during the entry; the president calls back and resumes
    retry_share: float = 0.03  # pen: the 202 is lost; the station sends again under the same Idempotency-Key
    duplicate_share: float = 0.02  # pen: the page is docked twice (a new key, the same page)
    scan_share: float = 0.1  # pen: pages sent as scans rather than InkML strokes
    prompt_seconds: float = 0.1  # how long the peer takes over each prompt it plays (the call's pacing)
    stations: int = 4
    faults: tuple[str, ...] = ("redis", "horse", "gateway", "disk-full")
    fault_at: tuple[float, ...] = (0.05, 0.3, 0.5, 0.65)  # as shares of the window
    disk_full_seconds: float = 60.0
    tmpfs_mb: int = 1024  # <var>/uploads: room for the raw pages and the reviewer's artefacts
    drain_timeout: float = 300.0
    generate_workers: int = 2


@dataclass
class BureauPlan:
    code: str
    pin: str
    channels: tuple[str, ...]  # ("ivr",), ("pen",), or both, in the order they report
    truth: dict[str, int]  # what the president reports (by the first channel)
    arrival: float  # seconds after the polls close (compressed)
    other: dict[str, int] | None = None  # the second channel's different figures, for a "both" bureau
    second_after: float = 0.0  # the second channel reports this long after the first
    slip: str | None = None  # phone: the field keyed wrong first
    slip_value: int | None = None
    drop_after: int | None = None  # phone: hang up after keying this many counts
    upload_retry: bool = False
    upload_duplicate: bool = False
    scan: bool = False
    pen_serial: str = ""
    station: int = 0

    def figures(self, channel: str) -> dict[str, int]:
        if len(self.channels) == 2 and channel == self.channels[1]:
            assert self.other is not None
            return self.other
        return self.truth


def consistent_figures(election: Election, rng: np.random.Generator, inscrits: int) -> dict[str, int]:
    """A bureau's figures whose sums hold (the same draw tests/form_fill.py makes for the pen pages)."""
    from form_fill import consistent_counts

    return consistent_counts(election, rng, inscrits=inscrits)


def other_figures(figures: dict[str, int], election: Election, rng: np.random.Generator) -> dict[str, int]:
    """The same bureau's figures as another count gave them: a few votes moved between two candidates."""
    candidates = [c.id for c in election.candidates]
    for _ in range(100):
        a, b = rng.choice(candidates, 2, replace=False)
        moved = int(rng.integers(1, 6))
        if figures[a] >= moved:
            return {**figures, str(a): figures[a] - moved, str(b): figures[b] + moved}
    return {**figures, "blancs_nuls": figures["blancs_nuls"] + 1, "votants": figures["votants"] + 1}


def slipped_value(value: int, rng: np.random.Generator) -> int:
    """One digit of `value` keyed wrong (the same number of digits, no leading zero)."""
    text = str(value)
    pos = int(rng.integers(len(text)))
    choices = [d for d in "0123456789" if d != text[pos] and not (pos == 0 and d == "0" and len(text) > 1)]
    return int(text[:pos] + choices[int(rng.integers(len(choices)))] + text[pos + 1:])


def arrival_offsets(n: int, window: float, rng: np.random.Generator) -> np.ndarray:
    """When bureaux report after the polls close: few at once, a rush once the counts end, a long tail.

    A Beta(2, 4) over the window: the rush peaks a fifth of the way in, as on a real night where
    most bureaux finish counting within the first half-hour of the hour.
    """
    return np.sort(rng.beta(2.0, 4.0, n)) * window


def make_plan(plan: NightPlan, registry: Any, pins: dict[str, str], election: Election) -> list[BureauPlan]:
    rng = np.random.default_rng(plan.seed)
    codes = sorted(registry.bureaux)
    order = rng.permutation(len(codes))
    offsets = arrival_offsets(len(codes), plan.window, rng)
    bureaux: list[BureauPlan] = []
    n_both = round(plan.both_share * len(codes))
    for rank, index in enumerate(order):
        code = codes[int(index)]
        bureau = registry.get(code)
        truth = consistent_figures(election, rng, bureau.inscrits or 1000)
        u = rng.random()
        if rank < n_both:
            channels: tuple[str, ...] = ("pen", "ivr") if u < 0.5 else ("ivr", "pen")
        else:
            channels = ("ivr",) if u < plan.phone_share else ("pen",)
        entry = BureauPlan(code=code, pin=pins[code], channels=channels, truth=truth, arrival=0.0,
                           pen_serial=bureau.pen_serials[0] if bureau.pen_serials else f"PEN-{code}",
                           station=int(rng.integers(plan.stations)))
        if len(channels) == 2:
            entry.other = other_figures(truth, election, rng)
            entry.second_after = float(rng.uniform(0.05, 0.2)) * plan.window
        if "ivr" in channels:
            if rng.random() < plan.slip_share:
                entry.slip = election.candidates[int(rng.integers(len(election.candidates)))].id
                entry.slip_value = slipped_value(entry.figures("ivr")[entry.slip], rng)
            if rng.random() < plan.drop_share:
                entry.drop_after = int(rng.integers(1, len(election.fields)))
        if "pen" in channels:
            entry.upload_retry = bool(rng.random() < plan.retry_share)
            entry.upload_duplicate = bool(rng.random() < plan.duplicate_share)
            entry.scan = bool(rng.random() < plan.scan_share)
        bureaux.append(entry)
    # Arrival order is random with respect to everything above.
    for entry, offset in zip(bureaux, rng.permutation(offsets), strict=True):
        entry.arrival = float(offset)
    return sorted(bureaux, key=lambda b: b.arrival)


# --- the pen pages ---

def _page(args: tuple[str, str, dict[str, int], bool, int]) -> tuple[bytes, str]:
    """One filled form, as the docking station sends it: (bytes, content type). Runs in a worker process."""
    election_id, code, counts, scan, seed = args
    import form_fill as ff

    election = load_election(election_id)
    rng = np.random.default_rng(seed)
    hw = ff.load_handwriting()
    mode = ("scan-pen" if seed % 2 else "scan-mnist") if scan else "inkml"
    data, content_type, _ = ff.filled_upload(mode, election, code, counts, hw, rng, jpeg_quality=85)
    return data, content_type


def generate_pages(plan: NightPlan, bureaux: list[BureauPlan]) -> dict[str, tuple[bytes, str]]:
    jobs = [(plan.election, b.code, b.figures("pen"), b.scan, plan.seed * 100_003 + i)
            for i, b in enumerate(bureaux) if "pen" in b.channels]
    codes = [j[1] for j in jobs]
    with ProcessPoolExecutor(plan.generate_workers) as pool:
        pages = list(pool.map(_page, jobs, chunksize=8))
    return dict(zip(codes, pages, strict=True))


# --- the running system ---

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return children


def _process_group(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def command_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return [""]


class Gateway:
    """`run_gateway.py all` in a subprocess, with its own var dir, ports, registry and docking stations."""

    def __init__(self, workdir: Path, plan: NightPlan) -> None:
        self.workdir, self.plan = workdir, plan
        self.var = workdir / "var"
        self.uploads = self.var / "uploads"
        self.registry_path = workdir / "registry.csv"
        self.pins_path = workdir / "pins.csv"
        self.agi_port, self.pen_port, self.review_port = free_port(), free_port(), free_port()
        self.settings = Settings(var_dir=self.var, registry=self.registry_path, election=plan.election,
                                 agi_port=self.agi_port, pen_port=self.pen_port, review_port=self.review_port)
        self.stations: dict[str, str] = {}
        self.process: subprocess.Popen[bytes] | None = None
        self.tmpfs = False
        self.log_path = workdir / "gateway.log"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
        env.update({"REMONTEE_AGI_PORT": str(self.agi_port), "REMONTEE_PEN_PORT": str(self.pen_port),
                    "REMONTEE_REVIEW_PORT": str(self.review_port), "REMONTEE_ELECTION": self.plan.election,
                    "REMONTEE_VAR_DIR": str(self.var), "REMONTEE_REGISTRY": str(self.registry_path),
                    "PYTHONUNBUFFERED": "1"})
        return env

    def command(self, *argv: str) -> str:
        done = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), *argv], cwd=self.workdir,
                              env=self.env(), capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"run_gateway.py {' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    def prepare(self) -> None:
        """The registry (cheap PIN hashes), the docking stations, and a small tmpfs for the uploads."""
        self.var.mkdir(parents=True, exist_ok=True)
        self.command("registry", "generate", "--bureaux", str(self.plan.bureaux), "--out", str(self.registry_path),
                     "--pins", str(self.pins_path), "--scrypt-n", "1024")
        for i in range(self.plan.stations):
            station = f"station-{i:02d}"
            self.stations[station] = self.command("stations", "add", station).strip().splitlines()[-1]
        self.uploads.mkdir(parents=True, exist_ok=True)
        if "disk-full" in self.plan.faults and os.geteuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.plan.tmpfs_mb}m,mode=0750", "tmpfs",
                            str(self.uploads)], check=True)
            self.tmpfs = True

    def start(self, timeout: float = 90.0) -> None:
        self.log_file = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "all"], cwd=self.workdir,
                                        env=self.env(), stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"run_gateway.py all exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"run_gateway.py all not ready within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.2)

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.agi_port), 1):
                pass
            conn = http.client.HTTPConnection("127.0.0.1", self.pen_port, timeout=2)
            conn.request("GET", "/api/v1/")
            if conn.getresponse().status != 200:
                return False
            conn.close()
            return len(self.workers()) == 2 and self.redis().ping()
        except (OSError, RedisError, http.client.HTTPException):
            return False

    def redis(self) -> Redis:
        return Redis.from_url(self.settings.redis_url_resolved, socket_timeout=5, socket_connect_timeout=2)

    def journal(self) -> Journal:
        return Journal(self.settings.db_url_resolved)

    # Processes, found under the supervisor (command lines, as test_run_gateway.py finds them).
    def services(self) -> dict[str, list[int]]:
        assert self.process is not None
        found: dict[str, list[int]] = {}
        for pid in _children().get(self.process.pid, []):
            argv = command_of(pid)
            name = "redis" if argv[0].startswith("redis-server") else argv[-1]
            found.setdefault(name, []).append(pid)
        return found

    def workers(self) -> list[int]:
        return self.services().get("worker", []) if self.process else []

    def horses(self) -> list[tuple[int, int]]:
        """(worker pid, work horse pid) for every worker running a job now: RQ forks a horse per job."""
        children = _children()
        # The horse makes itself a process group (os.setpgrp); RQ's scheduler, also a child, does not.
        return [(w, h) for w in self.workers() for h in children.get(w, []) if _process_group(h) == h]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.log_file.close()
        if self.tmpfs:
            # A process still holding a file there (an orphaned horse) must not leave the mount behind.
            for _ in range(50):
                if subprocess.run(["umount", str(self.uploads)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            else:
                subprocess.run(["umount", "-l", str(self.uploads)], check=False)
            self.tmpfs = False


# --- the faults ---

@dataclass
class FaultEvent:
    at: float  # seconds since the polls closed
    fault: str
    detail: str
    recovered_after: float | None = None


class Faults:
    """The faults of the night, each injected from a thread while the callers and the stations go on."""

    def __init__(self, gateway: Gateway, plan: NightPlan, clock: NightClock) -> None:
        self.gateway, self.plan, self.clock = gateway, plan, clock
        self.events: list[FaultEvent] = []
        self.inject = {"redis": self.kill_redis, "horse": self.kill_horse, "gateway": self.restart_gateway,
                       "disk-full": self.fill_disk}

    def run(self, stop: threading.Event) -> None:
        schedule = sorted(zip(self.plan.fault_at, self.plan.faults, strict=False))
        for share, fault in schedule:
            if stop.wait(max(0.0, share * self.plan.window - self.clock.now())):
                return
            try:
                self.inject[fault]()
            except Exception as exc:  # reported, never fatal: the verification says what it cost
                log.exception("fault %s", fault)
                self.events.append(FaultEvent(self.clock.now(), fault, f"not injected: {exc}"))

    def _wait_for(self, ok: Any, timeout: float = 60.0) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if ok():
                    return time.monotonic() - started
            except Exception:
                pass
            time.sleep(0.05)
        return None

    def kill_redis(self) -> None:
        [pid] = self.gateway.services()["redis"]
        os.kill(pid, signal.SIGKILL)
        event = FaultEvent(self.clock.now(), "redis", f"redis-server {pid} killed (SIGKILL)")
        self.events.append(event)
        self.gateway.redis().connection_pool.disconnect()
        event.recovered_after = self._wait_for(lambda: self.gateway.redis().ping())

    def kill_horse(self) -> None:
        """SIGKILL a work horse in the middle of its job (an OCR one if there is one)."""
        redis = self.gateway.redis()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for worker, horse in self.gateway.horses():
                # A return's job lasts milliseconds: wait for a horse that is still at work a moment later.
                time.sleep(0.05)
                if (worker, horse) not in self.gateway.horses():
                    continue
                # Read without RQ's cleanup (which would move abandoned jobs on itself): recovery is the system's to do.
                started = {q: StartedJobRegistry(q, connection=redis).get_job_ids(cleanup=False)
                           for q in (OCR_QUEUE, RETURNS_QUEUE)}
                try:
                    os.kill(horse, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                running = ", ".join(f"{q}: {' '.join(ids)}" for q, ids in started.items() if ids)
                self.events.append(FaultEvent(self.clock.now(), "horse",
                                              f"work horse {horse} of worker {worker} killed (SIGKILL) "
                                              f"while running [{running}]"))
                return
            time.sleep(0.01)
        self.events.append(FaultEvent(self.clock.now(), "horse", "no job running within 20 s: not injected"))

    def restart_gateway(self) -> None:
        [pid] = self.gateway.services()["pen"]
        os.kill(pid, signal.SIGKILL)
        event = FaultEvent(self.clock.now(), "gateway", f"pen gateway (gunicorn master {pid}) killed (SIGKILL)")
        self.events.append(event)

        def answering() -> bool:
            pens = self.gateway.services().get("pen", [])
            if not pens or pens == [pid]:
                return False
            conn = http.client.HTTPConnection("127.0.0.1", self.gateway.pen_port, timeout=1)
            conn.request("GET", "/api/v1/")
            return conn.getresponse().status == 200

        event.recovered_after = self._wait_for(answering, 120)


    def fill_disk(self) -> None:
        if not self.gateway.tmpfs:
            self.events.append(FaultEvent(self.clock.now(), "disk-full", "not injected: no tmpfs (needs root)"))
            return
        ballast = self.gateway.uploads / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            st = os.statvfs(self.gateway.uploads)
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize)
            block = b"\0" * 4096
            with contextlib.suppress(OSError):  # the last blocks, until the file system says no
                while True:
                    os.write(fd, block)
        finally:
            os.close(fd)
        event = FaultEvent(self.clock.now(), "disk-full",
                           f"{self.gateway.uploads} filled ({ballast.stat().st_size // 2**20} MiB ballast) "
                           f"for {self.plan.disk_full_seconds:.0f} s")
        self.events.append(event)
        time.sleep(self.plan.disk_full_seconds)
        ballast.unlink()
        event.recovered_after = self.plan.disk_full_seconds


# --- what the simulator saw ---

class NightClock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class CallLog:
    bureau: str
    call_id: str
    started: float
    ended: float
    outcome: str | None
    receipt: str | None
    status: str | None
    keyed: dict[str, int]
    hung_up: bool
    to_receipt: float | None  # from the caller's confirmation to the receipt on the channel
    unexpected: list[str]
    turnarounds: list[float]
    error: str | None = None


@dataclass
class UploadLog:
    bureau: str
    kind: str  # first, retry (same key), duplicate (new key)
    key: str
    station: str
    upload_id: str | None
    status: int | None
    attempts: int
    answers: list[int]  # every HTTP status (0: connection error) until the last
    latency: float | None  # of the attempt that got the 202
    total: float  # from the first attempt to the last answer
    at: float


@dataclass
class Observed:
    calls: list[CallLog] = field(default_factory=list)
    uploads: list[UploadLog] = field(default_factory=list)
    concurrent_calls: int = 0
    peak_calls: int = 0
    progress: list[tuple[float, int, int]] = field(default_factory=list)  # (t, consolidated, in review)
    lock: threading.Lock = field(default_factory=threading.Lock)


# --- the phone: a president on the line ---

class President(AsteriskPeer):
    """A caller who answers each question the line asks, as a president with the figures in front of them.

    The script is not fixed: the answer depends on the prompt of each GET DATA (DESIGN.md's
    prompt names), so the caller follows the call wherever it goes (an offer to resume, a
    mismatch to correct, a bureau already reported).
    """

    def __init__(self, entry: BureauPlan, channel_figures: dict[str, int], election: Election,
                 keyed: dict[str, int], state: dict[str, Any], *, hang_up: bool, **options: Any) -> None:
        super().__init__((), **options)
        self.entry, self.figures, self.election = entry, channel_figures, election
        self.keyed = keyed  # what the line holds for this bureau, across the president's calls
        self.state = state  # slipped: the slip was keyed once (it is not made twice)
        self.hang_up = hang_up
        self.keyed_here = 0
        self.unexpected: list[str] = []
        self.confirmed_at: float | None = None
        self.receipt_at: float | None = None
        self.fields = {PREFIX + ("ask-votes-" if f.candidate else "ask-") + f.id: f.id for f in election.fields}
        self.ranks = {f.id: i for i, f in enumerate(election.fields, start=1)}

    def _next(self, record: CallRecord, reading: bool) -> Action:
        action = self._decide(record, reading)
        self.script = [action]
        return action

    def _decide(self, record: CallRecord, reading: bool) -> Action:
        if not reading:
            if self.hang_up and self.entry.drop_after is not None and self.keyed_here >= self.entry.drop_after:
                self.hang_up = False
                return HANGUP
            return SILENCE
        prompt = record.played[-1] if record.played else ""
        if prompt == PREFIX + "ask-bureau":
            return press(self.entry.code + "#")
        if prompt == PREFIX + "ask-pin":
            return press(self.entry.pin + "#")
        if prompt in self.fields:
            field_id = self.fields[prompt]
            value = self.figures[field_id]
            if field_id == self.entry.slip and not self.state.get("slipped"):
                self.state["slipped"] = True
                value = int(self.entry.slip_value or 0)
            self.keyed[field_id] = value
            self.keyed_here += 1
            return press(f"{value}#")
        if prompt == PREFIX + "ask-confirm-ecart":
            return press("1" if self._wrong() else "2")
        if prompt == PREFIX + "ask-ligne":
            wrong = self._wrong()
            return press(f"{self.ranks[wrong[0]] if wrong else 1}#")
        if prompt == PREFIX + "ask-confirm-envoi":
            if self._wrong():
                return press("2")
            self.confirmed_at = time.perf_counter()
            return press("1")
        if prompt in (PREFIX + "ask-confirm-reprise", PREFIX + "ask-confirm-correction"):
            return press("1")
        self.unexpected.append(prompt)
        return SILENCE

    def _wrong(self) -> list[str]:
        return [f.id for f in self.election.fields if self.keyed.get(f.id) != self.figures[f.id]]

    def _cmd_set_variable(self, arguments: list[str], record: CallRecord) -> bytes:
        if arguments and arguments[0] == "REMONTEE_RECEIPT":
            self.receipt_at = time.perf_counter()
        return super()._cmd_set_variable(arguments, record)


async def phone_bureau(entry: BureauPlan, figures: dict[str, int], election: Election, gateway: Gateway,
                       plan: NightPlan, observed: Observed, clock: NightClock) -> None:
    """One president's calls: until a receipt is heard (a dropped call is called back at once, a failed one later)."""
    keyed: dict[str, int] = {}
    state: dict[str, Any] = {}
    hang_up = entry.drop_after is not None
    for attempt in range(8):
        president = President(entry, figures, election, keyed, state, hang_up=hang_up,
                              answer_delay=plan.prompt_seconds, io_timeout=60.0,
                              callerid=f"06{int(entry.code):08d}"[:10])
        hang_up = False
        started = clock.now()
        with observed.lock:
            observed.concurrent_calls += 1
            observed.peak_calls = max(observed.peak_calls, observed.concurrent_calls)
        error = None
        try:
            record = await president.call("127.0.0.1", gateway.agi_port)
        except OSError as exc:  # the line is not answering: call again shortly
            record, error = CallRecord(env={}), f"{type(exc).__name__}: {exc}"
        finally:
            with observed.lock:
                observed.concurrent_calls -= 1
        to_receipt = (president.receipt_at - president.confirmed_at
                      if president.receipt_at and president.confirmed_at else None)
        observed.calls.append(CallLog(
            bureau=entry.code, call_id=record.env.get("agi_uniqueid", ""), started=started, ended=clock.now(),
            outcome=record.outcome, receipt=record.receipt, status=record.variables.get("REMONTEE_STATUS"),
            keyed=dict(keyed), hung_up=record.caller_hung_up, to_receipt=to_receipt,
            unexpected=president.unexpected, turnarounds=record.turnarounds, error=error))
        if record.receipt:
            return
        if not record.caller_hung_up:
            await asyncio.sleep(1.0 + attempt)  # put through to an operator, or no line: try again later
        else:
            await asyncio.sleep(random.uniform(0.2, 1.0))  # the president calls back straight away


# --- the pen: a docking station on a flaky link ---

RETRY_STATUSES = {429, 500, 502, 503, 504, 507}


def deliver(gateway: Gateway, station: str, page: bytes, content_type: str, entry: BureauPlan, kind: str,
            key: str, clock: NightClock, deadline: float = 300.0) -> UploadLog:
    """Send until a 202: a 507, a 5xx or a broken connection is retried with back-off under the same key."""
    client = PenClient(f"http://127.0.0.1:{gateway.pen_port}", station, gateway.stations[station], timeout=60)
    answers: list[int] = []
    at = clock.now()
    started = time.perf_counter()
    delay = 0.2
    try:
        while True:
            attempt_started = time.perf_counter()
            try:
                answer = client.upload(page, content_type, pen_serial=entry.pen_serial, bureau=entry.code,
                                       idempotency_key=key)
                answers.append(answer.status)
            except (OSError, http.client.HTTPException):
                client.close()
                answers.append(0)
            else:
                if answer.status == 202:
                    return UploadLog(entry.code, kind, key, station, answer.json["upload_id"], 202, len(answers),
                                     answers, time.perf_counter() - attempt_started, time.perf_counter() - started, at)
                if answer.status not in RETRY_STATUSES:
                    return UploadLog(entry.code, kind, key, station, None, answer.status, len(answers), answers,
                                     None, time.perf_counter() - started, at)
            if time.perf_counter() - started > deadline:
                return UploadLog(entry.code, kind, key, station, None, answers[-1], len(answers), answers, None,
                                 time.perf_counter() - started, at)
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 3.0)
    finally:
        client.close()


def pen_bureau(entry: BureauPlan, page: tuple[bytes, str], gateway: Gateway, observed: Observed,
               clock: NightClock) -> None:
    data, content_type = page
    station = f"station-{entry.station:02d}"
    key = f"pv-{entry.code}-1"
    logs = [deliver(gateway, station, data, content_type, entry, "first", key, clock)]
    if entry.upload_retry:  # the first 202 was lost on the way: the same page under the same key
        logs.append(deliver(gateway, station, data, content_type, entry, "retry", key, clock))
    if entry.upload_duplicate:  # docked a second time: the same page, a new key
        logs.append(deliver(gateway, station, data, content_type, entry, "duplicate", f"pv-{entry.code}-2", clock))
    with observed.lock:
        observed.uploads.extend(logs)


# --- progress, while the night runs ---

def watch_progress(gateway: Gateway, election: str, observed: Observed, clock: NightClock,
                   stop: threading.Event, every: float = 0.5) -> None:
    journal = gateway.journal()
    key = f"remontee:consolidation:{election}:latest"
    redis = gateway.redis()
    consolidated = 0
    try:
        while not stop.wait(every):
            with contextlib.suppress(RedisError):
                consolidated = int(redis.hlen(key))
            try:
                with journal.read() as conn:
                    in_review = conn.execute(select(func.count(func.distinct(review_items.c.bureau)))).scalar_one()
            except Exception:
                in_review = observed.progress[-1][2] if observed.progress else 0
            observed.progress.append((clock.now(), consolidated, int(in_review)))
    finally:
        journal.dispose()


# --- the night ---

@dataclass
class NightResult:
    plan: NightPlan
    bureaux: list[BureauPlan]
    observed: Observed
    faults: list[FaultEvent]
    verdict: Verdict
    figures: dict[str, Any]

    def summary(self) -> str:
        f = self.figures
        lines = [
            f"election night: {self.plan.bureaux} bureaux over a {self.plan.window:.0f} s window "
            f"(1 h compressed {3600 / self.plan.window:.0f}x), seed {self.plan.seed}",
            f"  phone: {f['phone_bureaux']} bureaux, {f['calls']} calls, {f['phone_acknowledged']} receipts; "
            f"peak {f['peak_concurrent_calls']} concurrent calls",
            f"  pen:   {f['pen_bureaux']} bureaux ({f['scans']} scans), {f['uploads_sent']} uploads, "
            f"{f['uploads_202']} answered 202, {f['upload_retries']} retried attempts "
            f"({f['upload_answers']})",
            f"  time until 95 % of the bureaux consolidated or in review: {_fmt(f['t95_settled'])} s; "
            f"95 % of those that end consolidated: {_fmt(f['t95_consolidated'])} s; "
            f"drained at {_fmt(f['drained_at'])} s",
            f"  consolidated {f['consolidated']} bureaux; in review {f['bureaux_in_review']} "
            f"(backlog {f['review_backlog']} items: {f['review_reasons']})",
            f"  AGI turnaround p50/p99/max {f['agi_turnaround_ms'][0]:.1f}/{f['agi_turnaround_ms'][1]:.1f}/"
            f"{f['agi_turnaround_ms'][2]:.1f} ms; confirmation to receipt p50/p99 {f['to_receipt_ms'][0]:.0f}/"
            f"{f['to_receipt_ms'][1]:.0f} ms; call duration p50/p99 {f['call_s'][0]:.1f}/{f['call_s'][1]:.1f} s",
            f"  upload 202 latency p50/p99 {f['upload_202_ms'][0]:.0f}/{f['upload_202_ms'][1]:.0f} ms; "
            f"with retries p99 {f['upload_total_ms'][1]:.0f} ms, max {f['upload_total_ms'][2]:.0f} ms",
            "  faults:",
            *[f"    t={e.at:6.1f} s {e.fault}: {e.detail}"
              + (f"; back after {e.recovered_after:.1f} s" if e.recovered_after is not None else "")
              for e in self.faults],
            f"  verdict: {'PASS' if self.verdict.ok else 'FAIL'} ({len(self.verdict.checked)} checks)",
            *[f"    problem: {p}" for p in self.verdict.problems[:40]],
            *[f"    note: {n}" for n in self.verdict.notes],
        ]
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def run_night(plan: NightPlan, workdir: Path) -> NightResult:
    from registry import load_registry

    gateway = Gateway(workdir, plan)
    election = load_election(plan.election)
    try:
        gateway.prepare()
        registry = load_registry(gateway.registry_path)
        pins = dict(line.split(",") for line in gateway.pins_path.read_text().splitlines()[1:])
        bureaux = make_plan(plan, registry, pins, election)
        log.info("plan: %d bureaux; generating the pen pages", len(bureaux))
        with ThreadPoolExecutor(1) as background:
            pages_future = background.submit(generate_pages, plan, bureaux)
            gateway.start()
            pages = pages_future.result()
        log.info("gateway up; %d pen pages ready; the polls close", len(pages))
        observed = Observed()
        clock = NightClock()
        faults = Faults(gateway, plan, clock)
        stop = threading.Event()
        threads = [threading.Thread(target=faults.run, args=(stop,), name="faults", daemon=True),
                   threading.Thread(target=watch_progress, args=(gateway, plan.election, observed, clock, stop),
                                    name="progress", daemon=True)]
        for t in threads:
            t.start()
        asyncio.run(_drive(plan, bureaux, pages, election, gateway, observed, clock))
        log.info("every bureau has reported (t=%.1f s); waiting for the queues to drain", clock.now())
        for t in threads[:1]:
            t.join()  # the last fault ends (the disk is freed) before the drain is awaited
        drained_at = drain(gateway, plan, clock)
        stop.set()
        threads[1].join()
        verdict = verify(gateway, plan, bureaux, observed, election)
        figures = measure(plan, bureaux, observed, verdict, drained_at)
        return NightResult(plan, bureaux, observed, faults.events, verdict, figures)
    finally:
        gateway.stop()


async def _drive(plan: NightPlan, bureaux: list[BureauPlan], pages: dict[str, tuple[bytes, str]],
                 election: Election, gateway: Gateway, observed: Observed, clock: NightClock) -> None:
    loop = asyncio.get_running_loop()
    stations = ThreadPoolExecutor(max(8, plan.stations * 4), thread_name_prefix="station")
    loop.set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="night"))

    async def report(entry: BureauPlan, channel: str, at: float) -> None:
        await asyncio.sleep(max(0.0, at - clock.now()))
        if channel == "ivr":
            await phone_bureau(entry, entry.figures("ivr"), election, gateway, plan, observed, clock)
        else:
            await loop.run_in_executor(stations, pen_bureau, entry, pages[entry.code], gateway, observed, clock)

    tasks = []
    for entry in bureaux:
        for i, channel in enumerate(entry.channels):
            tasks.append(report(entry, channel, entry.arrival + (entry.second_after if i else 0.0)))
    try:
        await asyncio.gather(*tasks)
    finally:
        stations.shutdown(wait=True)


# --- the end of the night: drain, then the reckoning ---

def drain(gateway: Gateway, plan: NightPlan, clock: NightClock) -> float | None:
    """Wait until nothing is left: RQ queues empty, no job started or scheduled, outbox empty, no upload queued."""
    from pen_gateway.uploads import uploads

    journal = gateway.journal()
    redis = gateway.redis()
    deadline = time.monotonic() + plan.drain_timeout
    quiet = 0
    try:
        while time.monotonic() < deadline:
            try:
                busy = 0
                for name in (OCR_QUEUE, RETURNS_QUEUE):
                    busy += len(Queue(name, connection=redis))
                    # Counted without RQ's cleanup: a job left "started" by a killed horse must be handed on
                    # by the system itself (the relays' reconciliation), not by this check reading the registry.
                    busy += StartedJobRegistry(name, connection=redis).get_job_count(cleanup=False)
                    busy += ScheduledJobRegistry(name, connection=redis).get_job_count(cleanup=False)
                busy += journal.outbox_backlog()
                with journal.read() as conn:
                    busy += conn.execute(select(func.count()).select_from(uploads)
                                         .where(uploads.c.status.in_(("queued", "recognized")))).scalar_one()
            except (RedisError, OSError):
                busy = 1
            quiet = quiet + 1 if busy == 0 else 0
            if quiet >= 3:
                return clock.now()
            time.sleep(0.5)
        return None
    finally:
        journal.dispose()


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    in_review: set[str] = field(default_factory=set)
    review_reasons: Counter[str] = field(default_factory=Counter)
    consolidated: int = 0
    failed_jobs: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, name: str, problems: list[str]) -> None:
        self.checked.append(name)
        self.problems += [f"{name}: {p}" for p in problems]


def verify(gateway: Gateway, plan: NightPlan, bureaux: list[BureauPlan], observed: Observed,
           election: Election) -> Verdict:
    from pen_gateway.uploads import upload_from_row, uploads

    verdict = Verdict()
    journal = gateway.journal()
    redis = gateway.redis()
    by_code = {b.code: b for b in bureaux}
    with journal.read() as conn:
        rows = list(conn.execute(select(returns).order_by(returns.c.seq)))
        items = list(conn.execute(select(review_items)))
        upload_rows = {r.upload_id: upload_from_row(r) for r in conn.execute(select(uploads))}
    journal.dispose()
    entries = {r.return_id: r for r in rows}
    by_receipt = {r.receipt: r for r in rows if r.receipt}

    # What waits for a supervisor: review items, and uploads the OCR could not make a return of.
    for item in items:
        if item.state == "open":
            verdict.in_review.add(item.bureau)
            verdict.review_reasons.update(json.loads(item.reasons))
    for upload in upload_rows.values():
        if upload.status == "review" and upload.return_id is None:
            verdict.in_review.add(upload.bureau or "?")
            verdict.review_reasons["UPLOAD_UNREADABLE"] += 1

    # 1. Every receipt heard on the phone is a journaled return of that bureau with the figures keyed.
    problems = []
    acknowledged: dict[str, list[str]] = {}  # bureau → acknowledged return ids
    for call in observed.calls:
        if not call.receipt:
            continue
        row = by_receipt.get(call.receipt)
        if row is None:
            problems.append(f"bureau {call.bureau}: receipt {call.receipt} (call {call.call_id}) is in no journal row")
            continue
        counts = json.loads(row.payload)["counts"]
        flat = {k: counts[k] for k in ("votants", "blancs_nuls", "exprimes")} | counts["candidates"]
        if row.bureau != call.bureau or flat != call.keyed:
            problems.append(f"bureau {call.bureau}: receipt {call.receipt} is return {row.return_id} of bureau "
                            f"{row.bureau} with {flat}, the caller keyed {call.keyed}")
        acknowledged.setdefault(call.bureau, []).append(row.return_id)
    verdict.check("phone receipts journaled", problems)

    # 2. Every 202 is an upload that ended recognized (accepted or in review), none queued or failed;
    #    a retry under the same key got the same upload back.
    problems = []
    first_by_key: dict[tuple[str, str], str] = {}
    for u in observed.uploads:
        if u.upload_id is None:
            continue
        row = upload_rows.get(u.upload_id)
        if row is None:
            problems.append(f"bureau {u.bureau}: upload {u.upload_id} was answered 202 and is not in the journal")
            continue
        if row.status not in ("accepted", "review", "rejected"):
            problems.append(f"bureau {u.bureau}: upload {u.upload_id} ({u.kind}) ended {row.status}"
                            + (f" ({row.error[:200]})" if row.error else ""))
        if row.return_id:
            if row.return_id not in entries:
                problems.append(f"upload {u.upload_id}: return {row.return_id} is not in the journal")
            else:
                acknowledged.setdefault(u.bureau, []).append(row.return_id)
        previous = first_by_key.setdefault((u.station, u.key), u.upload_id)
        if previous != u.upload_id:
            problems.append(f"bureau {u.bureau}: key {u.key} answered {previous} first, then {u.upload_id}")
    verdict.check("uploads recognized", problems)
    refused = [u for u in observed.uploads if u.upload_id is None]
    if refused:
        verdict.notes.append(f"{len(refused)} upload(s) never got a 202: "
                             + "; ".join(f"{u.bureau} {u.answers[-3:]}" for u in refused[:10]))

    # 3. The consolidation is the journal's latest accepted return of every bureau, each counted once.
    latest = latest_returns(redis, election.id)
    figures = totals(redis, election.id)
    verdict.consolidated = len(latest)
    accepted: dict[str, Any] = {}
    for row in rows:
        if row.status == "accepted" and row.election == election.id:
            accepted[row.bureau] = row  # in journal order: the last one wins
    problems = []
    for code, row in accepted.items():
        got = latest.get(code)
        if got is None:
            problems.append(f"bureau {code}: accepted return {row.return_id} is not consolidated")
        elif got["return_id"] != row.return_id:
            problems.append(f"bureau {code}: consolidated {got['return_id']}, the journal's latest accepted is "
                            f"{row.return_id}")
    for code in set(latest) - set(accepted):
        problems.append(f"bureau {code}: consolidated {latest[code]['return_id']} without an accepted return")
    applied = {m.decode() for m in redis.smembers(f"remontee:consolidation:{election.id}:applied")}
    problems += [f"return {rid} consolidated, not in the applied set" for rid in
                 {r['return_id'] for r in latest.values()} - applied]
    problems += [f"return {rid} applied without being an accepted journal return" for rid in
                 applied - {r.return_id for r in rows if r.status == "accepted"}]
    summed = _sum_counts(latest.values())
    if summed != _totals_flat(figures):
        problems.append(f"the totals {_totals_flat(figures)} are not the sum of the consolidated returns {summed}: "
                        "a return was counted twice or lost")
    verdict.check("consolidation = journal, exactly once", problems)

    # 4. Against the ground truth: every acknowledged bureau not in review is consolidated with its figures.
    problems = []
    expected: list[dict[str, Any]] = []
    got_returns: list[dict[str, Any]] = []
    for code, ids in acknowledged.items():
        if code in verdict.in_review:
            continue
        entry = by_code[code]
        ret = latest.get(code)
        if ret is None:
            problems.append(f"bureau {code}: acknowledged ({', '.join(ids)}), not in review, not consolidated")
            continue
        truth = entry.figures(ret["channel"])
        flat = _flat(ret)
        if flat != truth:
            problems.append(f"bureau {code}: consolidated {flat} by {ret['channel']}, the truth is {truth}")
        expected.append({"counts": _nested(truth, election)})
        got_returns.append(ret)
    if _sum_counts(expected) != _sum_counts(got_returns):
        problems.append("the totals over the bureaux not in review differ from the ground truth")
    extra = set(latest) - set(acknowledged)
    problems += [f"bureau {code}: consolidated without any acknowledgement" for code in sorted(extra)]
    verdict.check("totals = ground truth outside review", problems)

    # 5. Nothing acknowledged is missing: every acknowledged return is consolidated, in review, or a duplicate.
    problems = []
    for code, ids in acknowledged.items():
        for rid in ids:
            row = entries[rid]
            if row.status == "accepted":
                continue
            if row.status == "review" or code in verdict.in_review:
                continue
            if row.status == "duplicate" and row.duplicate_of in entries:
                continue
            problems.append(f"bureau {code}: acknowledged return {rid} is {row.status}")
    never = [b.code for b in bureaux if b.code not in acknowledged and b.code not in verdict.in_review]
    if never:
        verdict.notes.append(f"{len(never)} bureau(x) never acknowledged (the simulator gave up): {never[:10]}")
    verdict.check("nothing acknowledged missing", problems)

    for name in (OCR_QUEUE, RETURNS_QUEUE):
        verdict.failed_jobs[name] = FailedJobRegistry(name, connection=redis).count
    if any(verdict.failed_jobs.values()):
        verdict.notes.append(f"failed RQ jobs left: {verdict.failed_jobs}")
    unexpected = Counter(p for c in observed.calls for p in c.unexpected)
    if unexpected:
        verdict.notes.append(f"prompts the president did not expect: {dict(unexpected)}")
    return verdict


def _flat(ret: dict[str, Any]) -> dict[str, int]:
    counts = ret["counts"]
    return {k: counts[k] for k in ("votants", "blancs_nuls", "exprimes")} | counts["candidates"]


def _nested(flat: dict[str, int], election: Election) -> dict[str, Any]:
    return {"votants": flat["votants"], "blancs_nuls": flat["blancs_nuls"], "exprimes": flat["exprimes"],
            "candidates": {c.id: flat[c.id] for c in election.candidates}}


def _sum_counts(rets: Any) -> dict[str, int]:
    total: Counter[str] = Counter()
    n = 0
    for ret in rets:
        n += 1
        total.update(_flat(ret))
    return {"bureaux": n, **dict(total)}


def _totals_flat(figures: dict[str, Any]) -> dict[str, int]:
    return {"bureaux": figures["bureaux"], "votants": figures["votants"], "blancs_nuls": figures["blancs_nuls"],
            "exprimes": figures["exprimes"], **figures["candidates"]}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def measure(plan: NightPlan, bureaux: list[BureauPlan], observed: Observed, verdict: Verdict,
            drained_at: float | None) -> dict[str, Any]:
    calls, uploads = observed.calls, observed.uploads
    turnarounds = [t * 1000 for c in calls for t in c.turnarounds]
    to_receipt = [c.to_receipt * 1000 for c in calls if c.to_receipt is not None]
    durations = [c.ended - c.started for c in calls]
    ok_uploads = [u for u in uploads if u.upload_id]
    consolidated_end = verdict.consolidated
    settled_end = len({b.code for b in bureaux}) * 0.95

    def first_time(test: Any) -> float | None:
        return next((t for t, c, r in observed.progress if test(c, r)), None)

    answers = Counter(a for u in uploads for a in u.answers)
    return {
        "phone_bureaux": sum("ivr" in b.channels for b in bureaux),
        "pen_bureaux": sum("pen" in b.channels for b in bureaux),
        "scans": sum(b.scan for b in bureaux if "pen" in b.channels),
        "calls": len(calls),
        "phone_acknowledged": sum(1 for c in calls if c.receipt),
        "peak_concurrent_calls": observed.peak_calls,
        "uploads_sent": len(uploads),
        "uploads_202": len(ok_uploads),
        "upload_retries": sum(u.attempts - 1 for u in uploads),
        "upload_answers": dict(sorted(answers.items())),
        "t95_settled": first_time(lambda c, r: c + r >= settled_end),
        "t95_consolidated": first_time(lambda c, r: c >= 0.95 * consolidated_end) if consolidated_end else None,
        "drained_at": drained_at,
        "consolidated": consolidated_end,
        "bureaux_in_review": len(verdict.in_review),
        "review_backlog": sum(verdict.review_reasons.values()),
        "review_reasons": dict(verdict.review_reasons.most_common()),
        "agi_turnaround_ms": (percentile(turnarounds, 50), percentile(turnarounds, 99), max(turnarounds, default=0)),
        "to_receipt_ms": (percentile(to_receipt, 50), percentile(to_receipt, 99), max(to_receipt, default=0)),
        "call_s": (percentile(durations, 50), percentile(durations, 99), max(durations, default=0)),
        "upload_202_ms": (percentile([u.latency * 1000 for u in ok_uploads if u.latency], 50),
                          percentile([u.latency * 1000 for u in ok_uploads if u.latency], 99),
                          max((u.latency * 1000 for u in ok_uploads if u.latency), default=0)),
        "upload_total_ms": (percentile([u.total * 1000 for u in ok_uploads], 50),
                            percentile([u.total * 1000 for u in ok_uploads], 99),
                            max((u.total * 1000 for u in ok_uploads), default=0)),
    }
