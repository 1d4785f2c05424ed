"""`run_gateway.py pen` as a real process for the tests that need gunicorn itself: a station registered through the
CLI (its secret read from the last line of standard output, as the contract says), the server started, awaited
on its port, and stopped. Shared by test_pen_api_gunicorn.py and test_telemetry_pen.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from pen_helpers import PenClient

from conftest import ROOT, free_port


@dataclass
class RunningPen:
    url: str
    port: int
    var_dir: Path
    station: str
    secret: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def client(self) -> PenClient:
        return PenClient(self.url, self.station, self.secret)

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines (REMONTEE_LOG_FORMAT=json) the server wrote so far."""
        return [json.loads(raw) for raw in self.log_path.read_text().splitlines() if raw.startswith("{")]

    def workers(self) -> set[int]:
        """gunicorn's worker processes."""
        return {c.pid for c in psutil.Process(self.process.pid).children()}


@contextmanager
def running_pen(var_dir: Path, redis_url: str, station: str, *pen_args: str,
                env: dict[str, str] | None = None, workers: int = 2) -> Iterator[RunningPen]:
    """`run_gateway.py pen --workers N ...pen_args` on a free loopback port, until the block ends."""
    port = free_port()
    environ = {**os.environ, "REMONTEE_VAR_DIR": str(var_dir), "REMONTEE_REDIS_URL": redis_url,
               "REMONTEE_PEN_PORT": str(port), "REMONTEE_BIND": "127.0.0.1", **(env or {})}
    environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # the server sets its own
    added = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "stations", "add", station],
                           env=environ, capture_output=True, text=True, check=True)
    secret = added.stdout.strip().splitlines()[-1]  # the contract: the secret alone on the last line
    assert len(secret) == 64 and all(c in "0123456789abcdef" for c in secret)
    log_path = var_dir / "pen.log"
    log = open(log_path, "wb")  # noqa: SIM115  (closed below, after the process)
    process = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "pen", "--workers", str(workers),
                                *pen_args], env=environ, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                pytest.fail(f"run_gateway.py pen exited: {log_path.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("run_gateway.py pen did not listen within 30 s")
                time.sleep(0.1)
        running = RunningPen(f"http://127.0.0.1:{port}", port, var_dir, station, secret, process, log_path)
        while len(running.workers()) < workers and time.monotonic() < deadline:
            time.sleep(0.1)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
