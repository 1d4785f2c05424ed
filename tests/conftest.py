"""Fixtures that start real services: one redis-server per test session on a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from forms import Election, load_election
from registry import Registry, load_registry
from registry.demo import generate
from returns_queue.journal import Journal

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server we can stop and start again on the same port and data directory."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: run the tests with `make test`, which installs it")
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def client(self) -> Redis:
        return Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> Iterator[Redis]:
    """A clean database on the session's server (restarted if a test stopped it)."""
    if redis_server.process is None:
        redis_server.start()
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


class PostgresServer:
    """A throwaway PostgreSQL cluster (initdb, pg_ctl) on a free port, run as the `postgres` user."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not bins:
            pytest.fail("PostgreSQL is not installed: run the tests with `make test`, which installs it")
        self.bin = bins[-1].parent
        self.directory = Path(tempfile.mkdtemp(prefix="remontee-pg-", dir="/tmp"))
        self.port = free_port()
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
        self.base_url = f"postgresql+psycopg://postgres@/{{db}}?host={self.directory}&port={self.port}"

    def start(self) -> None:
        data = self.directory / "data"
        subprocess.run([*self.as_postgres, str(self.bin / "initdb"), "-D", str(data), "-U", "postgres",
                        "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(data), "-w", "-l",
                        str(self.directory / "log"), "-o",
                        f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=on",
                        "start"], check=True, capture_output=True)

    def create_database(self) -> str:
        name = f"j{uuid.uuid4().hex[:12]}"
        subprocess.run([*self.as_postgres, str(self.bin / "createdb"), "-h", str(self.directory), "-p",
                        str(self.port), "-U", "postgres", name], check=True, capture_output=True)
        return self.base_url.format(db=name)

    def stop(self) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.directory / "data"), "-m",
                        "immediate", "stop"], capture_output=True)  # a throwaway cluster: no checkpoint
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Journal]:
    """The journal on SQLite (the default) and on a real PostgreSQL server."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'journal.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    j = Journal(url)
    yield j
    j.dispose()


@pytest.fixture(scope="session")
def election_t1() -> Election:
    return load_election("primaire-2011-t1")


@pytest.fixture(scope="session")
def election_t2() -> Election:
    return load_election("primaire-2011-t2")


@pytest.fixture(scope="session")
def demo_registry_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 60-bureau demo registry with cheap PIN hashes (the cost is in the hash, tests need speed)."""
    directory = tmp_path_factory.mktemp("registry")
    registry, pins = directory / "registry.csv", directory / "pins.csv"
    generate(60, registry, pins, scrypt_n=2**8)
    return registry, pins


@pytest.fixture(scope="session")
def registry(demo_registry_files: tuple[Path, Path]) -> Registry:
    return load_registry(demo_registry_files[0])


@pytest.fixture(scope="session")
def pins(demo_registry_files: tuple[Path, Path]) -> dict[str, str]:
    lines = demo_registry_files[1].read_text().splitlines()[1:]
    return dict(line.split(",") for line in lines)


@pytest.fixture(scope="session")
def running_reactor() -> Iterator[object]:
    """Twisted's global reactor on a background thread: the FastAGI servers live there, the tests call in.

    A reactor cannot be restarted in a process: it stays up (a daemon thread) until the tests end."""
    from twisted.internet import reactor

    if not reactor.running:  # type: ignore[attr-defined]
        thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},  # type: ignore[attr-defined]
                                  daemon=True, name="reactor")
        thread.start()
        while not reactor.running:  # type: ignore[attr-defined]
            threading.Event().wait(0.01)
    yield reactor
