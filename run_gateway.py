#!/usr/bin/env python3
"""Remontée's one entry point (also installed as `remontee`).

`all` (the default) starts every part on loopback, supervised: a private redis-server when
REMONTEE_REDIS_URL is unset, a demo registry when none exists and none is named, then each service as a child
process, restarted if it dies; Ctrl-C stops them all. Each other subcommand runs one part,
for production; every part adds its own subcommands from its `cli` module.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import importlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from settings import Settings, SettingsError, make_var_dir, without_password
from telemetry.logs import FORMATS as LOG_FORMATS
from telemetry.logs import configure_logging

log = logging.getLogger("remontee")

# The parts whose `cli.add_commands` contribute subcommands.
PARTS = ["registry.cli", "returns_queue.cli", "ivr.cli", "review.cli", "pen_gateway.cli", "forms.cli"]


@dataclass(frozen=True)
class Service:
    name: str
    argv: tuple[str, ...]  # a run_gateway.py subcommand and its arguments
    where: str  # said to the operator at start-up; format fields come from Settings


# What `all` starts, in order, once Redis and the registry are ready.
SERVICES = [
    Service("relay", ("relay",), "journal outbox → RQ 'returns'"),
    Service("ivr", ("ivr",), "agi://{s.bind}:{s.agi_port}/results"),
    Service("worker-1", ("worker",), "RQ queues returns, then ocr"),
    Service("worker-2", ("worker",), "RQ queues returns, then ocr"),
    # Phone returns consolidate even while both general workers are held by OCR jobs (an OCR job waits
    # up to 300 s for room on a full upload disk): a worker of its own for the `returns` queue.
    Service("returns", ("worker", "--queues", "returns"), "RQ queue returns only"),
    Service("review", ("review",), "http://{s.bind}:{s.review_port}/"),
    Service("pen", ("pen",), "http://{s.bind}:{s.pen_port}/api/v1/"),
]


# Where Prometheus scrapes each part (README, "Operations").
METRICS_ENDPOINTS = ["http://{s.bind}:{s.pen_port}/metrics", "http://{s.bind}:{s.review_port}/metrics",
                     "http://{s.bind}:{s.ivr_metrics_port}/metrics", "http://{s.bind}:{s.worker_metrics_port}/metrics"]


def common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings (each also from REMONTEE_<NAME>)")
    group.add_argument("--var-dir", type=Path, default=argparse.SUPPRESS, help="runtime data (default var/)")
    group.add_argument("--bind", default=argparse.SUPPRESS, help="address to listen on (default 127.0.0.1)")
    group.add_argument("--agi-port", type=int, default=argparse.SUPPRESS, help="FastAGI port (default 4573)")
    group.add_argument("--pen-port", type=int, default=argparse.SUPPRESS, help="upload API port (default 8080)")
    group.add_argument("--review-port", type=int, default=argparse.SUPPRESS, help="review UI port (default 8081)")
    group.add_argument("--review-trusted-proxies", type=int, default=argparse.SUPPRESS,
                       help="reverse proxies in front of the review UI whose X-Forwarded-For is believed (default 0)")
    group.add_argument("--redis-url", default=argparse.SUPPRESS, help="Redis; unset: a private redis-server")
    group.add_argument("--db-url", default=argparse.SUPPRESS, help="journal database (default SQLite in var/)")
    group.add_argument("--election", default=argparse.SUPPRESS, help="election id from forms/elections/")
    group.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help="bureau registry CSV")
    group.add_argument("--consolidate-job", default=argparse.SUPPRESS, help="function path of the returns job")
    group.add_argument("--max-upload-bytes", type=int, default=argparse.SUPPRESS,
                       help="largest pen upload accepted (default 20 MiB)")
    # No --secret-key: a flag is seen by every user of the machine in the process list (REMONTEE_SECRET_KEY).
    group.add_argument("--ivr-metrics-port", type=int, default=argparse.SUPPRESS,
                       help="the IVR's Prometheus listener (default 9573; 0: none)")
    group.add_argument("--worker-metrics-port", type=int, default=argparse.SUPPRESS,
                       help="the RQ workers' Prometheus listener (default 9574; 0: none)")
    group.add_argument("--log-format", choices=LOG_FORMATS, metavar="|".join(LOG_FORMATS), default=argparse.SUPPRESS,
                       help="log lines as JSON objects (default) or text")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = common_parser()
    parser = argparse.ArgumentParser(prog="remontee", description=__doc__, parents=[common],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run_all = sub.add_parser("all", help="every part on loopback, supervised (the default)", parents=[common])
    run_all.add_argument("--demo-bureaux", type=int, default=1000,
                         help="size of the demo registry generated when none exists (default 1000)")
    run_all.set_defaults(func=run_everything)
    for part in PARTS:
        importlib.import_module(part).add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["all", *(argv if argv is not None else sys.argv[1:])])
    overrides = {k: getattr(args, k) for k in Settings.__dataclass_fields__ if hasattr(args, k)}
    try:
        args.settings = Settings.from_env(**overrides)
    except SettingsError as exc:
        parser.error(str(exc))
    # Every part's log lines as one JSON object each, tagged with the part (telemetry/logs.py).
    configure_logging(args.command, args.settings.log_format)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        # The reader went away (`... | head`): what was left to print has no one to read it; no traceback.
        # Python's own recipe: point standard output at /dev/null so the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# --- supervision, for `all` ---

def _die_with_parent() -> None:
    """In the child: get SIGTERM if the supervisor dies, even by SIGKILL, so no process is orphaned."""
    os.setsid()  # Ctrl-C reaches the supervisor only; it stops the children in order
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_private_redis(settings: Settings) -> subprocess.Popen[bytes]:
    """redis-server with AOF under var/redis/, on a Unix socket only: no port to collide with."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed: run `make run` (it installs it) or set REMONTEE_REDIS_URL")
    directory = settings.private_redis_socket.parent
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server", "--port", "0", "--unixsocket", str(settings.private_redis_socket),
        "--unixsocketperm", "700", "--dir", str(directory), "--appendonly", "yes",
        "--appendfsync", "everysec", "--save", "", "--daemonize", "no", "--logfile", str(directory / "redis.log"),
        # Redis's default, said here: a last command half-written by a power cut is dropped, not a refusal to start.
        "--aof-load-truncated", "yes",
    ]
    process = subprocess.Popen(argv, preexec_fn=_die_with_parent)
    for _ in range(100):
        if settings.private_redis_socket.exists():
            from redis import Redis
            try:
                Redis.from_url(settings.redis_url_resolved).ping()
                return process
            except Exception:
                pass
        if process.poll() is not None:
            raise SystemExit(_why_redis_exited(directory))
        time.sleep(0.1)
    process.terminate()
    raise SystemExit("redis-server did not answer within 10 s")


def _why_redis_exited(directory: Path) -> str:
    """The operator's next step when the private redis-server exits at start: the repair of its AOF, if that is why."""
    log_file = directory / "redis.log"
    try:
        last_words = log_file.read_text(errors="replace")[-1000:]
    except OSError:
        last_words = ""
    if "Bad file format reading the append only file" not in last_words:
        return f"redis-server exited at start; see {log_file}"
    # Zeros or garbage at the end of the AOF (a power cut wrote the file's length but not all of its blocks):
    # aof-load-truncated covers only a half-written last command, and redis-server 7.0 repairs nothing else itself.
    return (f"redis-server refuses its append-only file, which ends in bytes it cannot read (as a power cut leaves "
            f"it). Keep a copy of {directory / 'appendonlydir'}, then run `redis-check-aof --fix "
            f"{directory / 'appendonlydir' / 'appendonly.aof.manifest'}` (it cuts the file where it stops being "
            f"readable) and start again; docs/deploy.md (\"Redis after a power cut\") says what the cut may lose")


def ensure_demo_registry(settings: Settings, bureaux: int) -> None:
    if settings.registry_path.exists():
        return
    from registry.demo import generate

    pins = settings.var_dir / "pins.csv"
    log.info("no registry at %s: generating a demo registry of %d bureaux (PINs in %s)",
             settings.registry_path, bureaux, pins)
    generate(bureaux, settings.registry_path, pins)


class Supervisor:
    """Runs the services as child processes, restarts one that dies, stops them all on a signal.

    The private redis-server, when there is one, is supervised too: restarted first (its AOF
    brings the queues back) and stopped last, once nothing uses it.
    """

    def __init__(self, settings: Settings, services: list[Service], private_redis: bool = False,
                 stop_grace: float = 10.0) -> None:
        self.settings, self.services, self.private_redis = settings, services, private_redis
        # How long a stopped service may take (a worker finishes its job) before it is killed; a killed
        # worker's work horse dies with it (returns_queue/worker.py).
        self.stop_grace = stop_grace
        self.redis: subprocess.Popen[bytes] | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.failures: dict[str, int] = {}  # consecutive quick deaths, for the back-off
        self.started_at: dict[str, float] = {}
        self.restart_due: dict[str, float] = {}
        self.stopping = False

    def _env(self) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update({
            "REMONTEE_VAR_DIR": str(s.var_dir.resolve()),
            "REMONTEE_REDIS_URL": s.redis_url_resolved,
            "REMONTEE_DB_URL": s.db_url_resolved,
            "REMONTEE_REGISTRY": str(s.registry_path.resolve()),
            "REMONTEE_ELECTION": s.election,
            "REMONTEE_BIND": s.bind,
            "REMONTEE_AGI_PORT": str(s.agi_port),
            "REMONTEE_PEN_PORT": str(s.pen_port),
            "REMONTEE_REVIEW_PORT": str(s.review_port),
            "REMONTEE_REVIEW_TRUSTED_PROXIES": str(s.review_trusted_proxies),
            "REMONTEE_CONSOLIDATE_JOB": s.consolidate_job,
            "REMONTEE_MAX_UPLOAD_BYTES": str(s.max_upload_bytes),
            "REMONTEE_IVR_METRICS_PORT": str(s.ivr_metrics_port),
            "REMONTEE_WORKER_METRICS_PORT": str(s.worker_metrics_port),
            "REMONTEE_LOG_FORMAT": s.log_format,
        })
        return env

    def start(self, service: Service) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), *service.argv]
        self.children[service.name] = subprocess.Popen(argv, env=self._env(), preexec_fn=_die_with_parent)
        self.started_at[service.name] = time.monotonic()

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._stop)
        if self.private_redis:
            self.redis = start_private_redis(self.settings)
        for service in self.services:
            self.start(service)
        while not self.stopping:
            self._watch()
            time.sleep(0.5)
        return self.shutdown(self.stop_grace)

    def _watch(self) -> None:
        if self.redis is not None and self.redis.poll() is not None:
            log.warning("redis-server exited with %s; restarting it", self.redis.returncode)
            self.redis = start_private_redis(self.settings)
        now = time.monotonic()
        for service in self.services:
            name = service.name
            if name in self.restart_due:
                if now >= self.restart_due[name]:
                    del self.restart_due[name]
                    self.start(service)
                continue
            child = self.children[name]
            if child.poll() is None:
                continue
            # A service that ran a while before dying is restarted at once; one that keeps dying waits longer.
            quick = now - self.started_at[name] < 60
            self.failures[name] = self.failures.get(name, 0) + 1 if quick else 0
            delay = min(30.0, 2.0 ** self.failures[name]) if quick else 0.0
            log.warning("%s exited with %s; restarting in %.0f s", name, child.returncode, delay)
            self.restart_due[name] = now + delay

    def _stop(self, *_: object) -> None:
        self.stopping = True

    def shutdown(self, grace: float = 10.0) -> int:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.time() + grace
        for name, child in self.children.items():
            try:
                child.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killed", name, grace)
                child.kill()
                child.wait()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(10)
        return 0


def hold_var_dir(var_dir: Path) -> int:
    """Lock var/ for this `all` until it exits (even by SIGKILL: the kernel drops the lock), or refuse to start.

    A second `all` on the same var/ would start a second private redis-server on the same socket and AOF
    directory, taking the socket from the first one's clients, and a second relay and workers beside them."""
    fd = os.open(var_dir / "all.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SystemExit(f"another `run_gateway.py all` (pid {holder}) is running on {var_dir.resolve()}: "
                         "stop it first, or give this one another --var-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd  # not inherited by the children (PEP 446): the lock ends with the supervisor


def check_settings(settings: Settings) -> None:
    """What every part would otherwise die of at its start, again at each restart: refused once, in one line."""
    from redis import Redis

    from forms import load_election
    from registry import load_registry

    try:
        load_election(settings.election)
        if settings.redis_url is not None:
            Redis.from_url(settings.redis_url)  # parses the URL, connects to nothing: Redis may come up later
        if settings.registry is not None or settings.registry_path.exists():
            # A registry the operator named must be there: a demo one written at a mistyped path would let
            # fake bureaux report and call every real one unknown. Only var/registry.csv is made for the demo.
            load_registry(settings.registry_path)
    except (ValueError, OSError) as exc:  # ElectionDefinitionError and RegistryError are ValueErrors
        raise SystemExit(f"remontee all: {exc}") from None


def run_everything(args: argparse.Namespace) -> int:
    settings: Settings = args.settings
    make_var_dir(settings.var_dir)
    hold_var_dir(settings.var_dir)
    check_settings(settings)
    ensure_demo_registry(settings, args.demo_bureaux)
    supervisor = Supervisor(settings, SERVICES, private_redis=settings.redis_url is None)
    print("Remontée is starting; Ctrl-C stops everything.", flush=True)
    print(f"  {'redis':<10} {without_password(settings.redis_url_resolved)}"
          + (" (private, AOF under var/redis/)" if supervisor.private_redis else ""))
    print(f"  {'journal':<10} {without_password(settings.db_url_resolved)}")
    print(f"  {'registry':<10} {settings.registry_path}")
    for service in SERVICES:
        print(f"  {service.name:<10} {service.where.format(s=settings)}", flush=True)
    print(f"  {'metrics':<10} " + "  ".join(METRICS_ENDPOINTS).format(s=settings), flush=True)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
