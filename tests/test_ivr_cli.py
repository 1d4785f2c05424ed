"""`run_gateway.py ivr` as the operator starts it: a real process, a real call, the relay to RQ, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agi_peer import HANGUP, AsteriskPeer, CallRecord, Gate, press
from redis import Redis
from rq.job import Job

import run_gateway
from conftest import RedisServer, free_port
from ivr import prompts as P
from returns_queue.jobs import return_job_id
from returns_queue.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
COUNTS = [250, 5, 245, 70, 5, 90, 40, 25, 15]


def _wait_for_port(port: int, process: subprocess.Popen[str], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else "exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the FastAGI server did not listen")


def _ivr_env(tmp_path: Path, redis_server: RedisServer, registry: Path, **more: str) -> dict[str, str]:
    """The environment `run_gateway.py ivr` starts with here: var/ and an SQLite journal under `tmp_path`."""
    return {**os.environ, "REMONTEE_VAR_DIR": str(tmp_path), "REMONTEE_REDIS_URL": redis_server.url,
            "REMONTEE_DB_URL": f"sqlite:///{tmp_path / 'journal.sqlite3'}", "REMONTEE_REGISTRY": str(registry),
            "REMONTEE_ELECTION": "primaire-2011-t1", **more}


def _stats_line(process: subprocess.Popen[str]) -> dict[str, object]:
    assert process.stdout is not None
    line = process.stdout.readline()
    return json.loads(line)["ivr_stats"]


def test_ivr_command_serves_a_call_relays_it_and_stops_cleanly(
    tmp_path: Path, redis_server: RedisServer, redis: Redis, demo_registry_files: tuple[Path, Path],
    pins: dict[str, str],
) -> None:
    port = free_port()
    env = _ivr_env(tmp_path, redis_server, demo_registry_files[0], REMONTEE_AGI_PORT=str(port))
    process = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "ivr"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port, process)
        code = sorted(pins)[-1]
        script = [press(code + "#"), press(pins[code] + "#"), *[press(f"{n}#") for n in COUNTS], press("1")]
        record = AsteriskPeer(script, sounds=frozenset(P.catalog())).call_sync("127.0.0.1", port)
        assert record.outcome == "accepted" and record.missing == []

        journal = Journal(env["REMONTEE_DB_URL"])
        [entry] = journal.entries("primaire-2011-t1", code)
        assert entry.receipt == record.receipt
        # The relay in the same process puts the accepted return on RQ, woken by the submission
        # (it enqueues the job, then marks the outbox row: wait for both).
        deadline = time.monotonic() + 10
        while ((not redis.exists(Job.key_for(return_job_id(entry.ret.return_id))) or journal.outbox_backlog())
               and time.monotonic() < deadline):
            time.sleep(0.05)
        job = Job.fetch(return_job_id(entry.ret.return_id), connection=redis)
        assert job.args[0]["bureau"] == code and job.origin == "returns"
        assert journal.outbox_backlog() == 0
        journal.dispose()

        process.send_signal(signal.SIGUSR1)
        stats = _stats_line(process)
        assert stats["calls_finished"] == 1 and stats["violations"] == 0
        assert stats["turnaround_all"]["count"] == len(record.commands)  # type: ignore[index]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0
    assert "ivr_stats" in (process.stdout.read() if process.stdout else "")


def test_ivr_stops_on_sigterm_when_its_standard_output_is_gone(
    tmp_path: Path, redis_server: RedisServer, demo_registry_files: tuple[Path, Path],
) -> None:
    # The terminal of `run_gateway.py all` closed, or the reader of its pipe dead: the stop still ends the process.
    port = free_port()
    env = {**os.environ, "REMONTEE_VAR_DIR": str(tmp_path), "REMONTEE_REDIS_URL": redis_server.url,
           "REMONTEE_REGISTRY": str(demo_registry_files[0]), "REMONTEE_AGI_PORT": str(port),
           "REMONTEE_IVR_METRICS_PORT": "0"}
    process = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "ivr"], env=env, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port, process)
        assert process.stdout is not None
        process.stdout.close()
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "ivr_stats" in errors  # the figures went to the log instead


def test_ivr_on_a_busy_port_says_so_and_exits(
    tmp_path: Path, redis_server: RedisServer, demo_registry_files: tuple[Path, Path],
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {**os.environ, "REMONTEE_VAR_DIR": str(tmp_path), "REMONTEE_REDIS_URL": redis_server.url,
               "REMONTEE_REGISTRY": str(demo_registry_files[0]), "REMONTEE_AGI_PORT": str(port),
               "REMONTEE_IVR_METRICS_PORT": "0"}
        try:
            # Exits, so that its supervisor (`all`, systemd) starts it again, rather than run without its port.
            result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "ivr"], env=env, cwd=tmp_path,
                                    capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the FastAGI server kept running without its port") from None
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1] == (
        f"ivr: Couldn't listen on 127.0.0.1:{port}: [Errno 98] Address already in use.")


def test_ivr_is_a_service_of_run_all() -> None:
    [service] = [s for s in run_gateway.SERVICES if s.name == "ivr"]
    assert service.argv == ("ivr",) and "ivr.cli" in run_gateway.PARTS
    from settings import Settings

    assert service.where.format(s=Settings()) == "agi://127.0.0.1:4573/results"


def test_two_fastagi_servers_share_state_so_a_caller_cut_off_on_one_resumes_on_the_other(
    tmp_path: Path, redis_server: RedisServer, redis: Redis, demo_registry_files: tuple[Path, Path],
    pins: dict[str, str],
) -> None:
    """The dialplan's primary and standby servers: two real processes on one Redis and one journal."""
    ports = [free_port(), free_port()]
    env = _ivr_env(tmp_path, redis_server, demo_registry_files[0], REMONTEE_IVR_METRICS_PORT="0",
                   REMONTEE_LOG_FORMAT="text")
    servers = [subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "ivr", "--agi-port", str(port)],
                                env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
               for port in ports]
    try:
        for port, server in zip(ports, servers, strict=True):
            _wait_for_port(port, server)
        code = sorted(pins)[-2]
        keys = [press(code + "#"), press(pins[code] + "#")]
        counts = [press(f"{n}#") for n in COUNTS]
        sounds = frozenset(P.catalog())
        cut = AsteriskPeer([*keys, *counts[:4], HANGUP], sounds=sounds).call_sync("127.0.0.1", ports[0])
        assert cut.outcome != "accepted"
        # The primary goes down (Asterisk now gets AGISTATUS=FAILURE there and tries the standby).
        servers[0].send_signal(signal.SIGTERM)
        servers[0].wait(15)
        resumed = AsteriskPeer([*keys, press("1"), *counts[4:], press("1")], sounds=sounds).call_sync(
            "127.0.0.1", ports[1])
        assert P.RESUME_OFFER in resumed.played and P.ASK_CONFIRM_RESUME in resumed.prompts_asked()
        assert resumed.outcome == "accepted" and resumed.missing == []
        journal = Journal(env["REMONTEE_DB_URL"])
        [entry] = journal.entries("primaire-2011-t1", code)
        assert entry.receipt == resumed.receipt and list(entry.ret.counts.values()) == COUNTS
        deadline = time.monotonic() + 10
        while not redis.exists(Job.key_for(return_job_id(entry.ret.return_id))) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert redis.exists(Job.key_for(return_job_id(entry.ret.return_id)))
        journal.dispose()
    finally:
        for server in servers:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(15)
                except subprocess.TimeoutExpired:
                    server.kill()


def _libfaketime() -> Path | None:
    """libfaketime (Debian package `faketime`), its thread-safe build: it moves the wall clock under a process."""
    for directory in ("/usr/lib/*/faketime", "/usr/lib/faketime", "/usr/local/lib/faketime", "/usr/local/lib"):
        found = sorted(glob.glob(f"{directory}/libfaketimeMT.so.1"))
        if found:
            return Path(found[0])
    return None


needs_libfaketime = pytest.mark.skipif(
    _libfaketime() is None, reason="libfaketime is not installed (Debian package faketime): the wall clock cannot be "
                                   "stepped under the FastAGI server")


@contextlib.contextmanager
def _ivr_whose_wall_clock_steps(tmp_path: Path, redis_server: RedisServer,
                                registry: Path) -> Iterator[tuple[int, Callable[[str], None]]]:
    """`run_gateway.py ivr` under libfaketime, and how to step its wall clock as NTP does ("+600": ten minutes on).

    Only the wall clock (CLOCK_REALTIME) moves; CLOCK_MONOTONIC goes on, as it does when NTP steps the clock."""
    offset = tmp_path / "faketime-offset"
    offset.write_text("+0\n")

    def step(to: str) -> None:
        partial = offset.with_suffix(".partial")
        partial.write_text(f"{to}\n")
        partial.replace(offset)  # libfaketime reads it at every clock read: never half-written

    port = free_port()
    env = _ivr_env(tmp_path, redis_server, registry, REMONTEE_AGI_PORT=str(port), REMONTEE_IVR_METRICS_PORT="0",
                   LD_PRELOAD=str(_libfaketime()), FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1",
                   FAKETIME_DONT_FAKE_MONOTONIC="1")
    with (tmp_path / "ivr.log").open("w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "ivr"], env=env, cwd=tmp_path,
                                   stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            _wait_for_port(port, process)
            yield port, step
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@needs_libfaketime
def test_a_wall_clock_stepped_forward_times_out_no_call(
    tmp_path: Path, redis_server: RedisServer, demo_registry_files: tuple[Path, Path], pins: dict[str, str],
) -> None:
    """NTP steps the clock ten minutes on while a caller keys the PIN: the server's time limits are durations, the
    call goes on. (They followed the wall clock: every call waiting on a GET DATA at that moment was cut off.)"""
    with _ivr_whose_wall_clock_steps(tmp_path, redis_server, demo_registry_files[0]) as (port, step):
        code = sorted(pins)[-3]
        script = [press(code + "#"), press(pins[code] + "#"), *[press(f"{n}#") for n in COUNTS], press("1")]
        sounds = frozenset(P.catalog())

        async def night() -> CallRecord:
            keying = Gate()
            call = asyncio.create_task(AsteriskPeer(script, sounds=sounds, hold={f"GET DATA {P.ASK_PIN}": keying},
                                                    io_timeout=60).call("127.0.0.1", port))
            await keying.reached.wait()
            step("+600")  # past the PIN's GET DATA time limit (the 180 s a prompt may play, and its 5 s)
            # The next call wakes the reactor, which then looks at every time limit.
            other = await AsteriskPeer([HANGUP], sounds=sounds).call("127.0.0.1", port)
            assert other.caller_hung_up and other.ended == "server closed"
            keying.opened.set()
            return await call

        record = asyncio.run(night())
    assert record.outcome == "accepted" and record.missing == [], record.commands[-3:]
    assert "no answer to" not in (tmp_path / "ivr.log").read_text()


@needs_libfaketime
def test_a_wall_clock_stepped_back_keeps_no_dead_connection(
    tmp_path: Path, redis_server: RedisServer, demo_registry_files: tuple[Path, Path],
) -> None:
    """The clock goes back an hour while an Asterisk that stopped answering holds a call: the server still gives up
    on it after ANSWER's 15 s, not an hour and 15 s later."""
    with _ivr_whose_wall_clock_steps(tmp_path, redis_server, demo_registry_files[0]) as (port, step):
        environment = AsteriskPeer().environment("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as asterisk:
            asterisk.sendall("".join(f"{k}: {v}\n" for k, v in environment).encode() + b"\n")
            assert asterisk.makefile("rb").readline() == b"ANSWER\n"  # its time limit runs from now
            step("-3600")
            try:
                closed = asterisk.recv(1) == b""
            except ConnectionResetError:  # the server aborts a connection it gave up on
                closed = True
            except TimeoutError:
                closed = False
        assert closed, "the server still held the connection a minute after ANSWER's 15 s"
    assert "no answer to 'ANSWER' within 15 s" in (tmp_path / "ivr.log").read_text()
