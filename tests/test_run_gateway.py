"""`run_gateway.py all`: a private Redis, a demo registry, supervised parts, a clean stop with no orphan."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.exceptions import RedisError

from conftest import free_port
from forms import load_election
from returns_queue.consolidation import totals
from returns_queue.journal import Journal
from run_gateway import common_parser, start_private_redis
from settings import Settings
from validation import new_return

ROOT = Path(__file__).resolve().parents[1]


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return 0


def command_of(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().rstrip("\0").split("\0")
    except OSError:
        return [""]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_all_starts_every_part_consolidates_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
    env.update({"REMONTEE_AGI_PORT": str(free_port()), "REMONTEE_PEN_PORT": str(free_port()),
                "REMONTEE_REVIEW_PORT": str(free_port()), "REMONTEE_ELECTION": "primaire-2011-t2"})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run_gateway.py"), "all", "--demo-bureaux", "12"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        while not any("relay" in line for line in lines):
            line = process.stdout.readline()
            assert line, "run_gateway.py all exited early:\n" + "".join(lines)
            lines.append(line)
        banner = "".join(lines)
        assert "Ctrl-C stops everything" in banner
        assert "(private, AOF under var/redis/)" in banner
        assert (tmp_path / "var" / "registry.csv").exists() and (tmp_path / "var" / "pins.csv").exists()

        settings = Settings.from_env({}, var_dir=tmp_path / "var")
        journal = Journal(settings.db_url_resolved)
        election = load_election("primaire-2011-t2")
        redis = Redis.from_url(settings.redis_url_resolved)

        def report(bureau: str, hollande: int) -> None:
            counts = {"votants": hollande + 10, "blancs_nuls": 2, "exprimes": hollande + 8, "hollande": hollande,
                      "aubry": 8}
            journal.submit(new_return(election, bureau, counts, "ivr", {"call_id": bureau}))

        def consolidated(bureaux: int) -> None:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if totals(redis, election.id)["bureaux"] == bureaux:
                        return
                except RedisError:
                    pass  # the private Redis is being restarted
                assert time.monotonic() < deadline, "the return was not consolidated by the running system"
                time.sleep(0.2)

        report("010101", 20)
        consolidated(1)
        assert totals(redis, election.id)["candidates"] == {"hollande": 20, "aubry": 8}
        assert (tmp_path / "var" / "redis" / "appendonlydir").is_dir()

        # Kill Redis and the workers outright: the supervisor brings them back, the AOF the totals.
        # redis-server rewrites its process title ("redis-server *:0"), hence the prefix test.
        # The supervisor's own children only: a worker's work horse (a fork, same command line) may be finishing.
        victims = [pid for pid in descendants(process.pid) if parent_of(pid) == process.pid
                   and (command_of(pid)[0].startswith("redis-server") or command_of(pid)[-1] == "worker")]
        assert len(victims) == 3
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        report("020101", 30)  # journaled while Redis is down
        consolidated(2)
        assert totals(redis, election.id)["candidates"] == {"hollande": 50, "aubry": 16}
        assert not set(victims) & descendants(process.pid)

        family = descendants(process.pid)
        assert len(family) >= 4  # redis-server, the relay and two workers at least
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in family if alive(pid)], "orphan processes after Ctrl-C"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def gateway_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
    env.update({"REMONTEE_AGI_PORT": str(free_port()), "REMONTEE_PEN_PORT": str(free_port()),
                "REMONTEE_REVIEW_PORT": str(free_port()), "REMONTEE_IVR_METRICS_PORT": "0",
                "REMONTEE_WORKER_METRICS_PORT": "0"})
    return env


def test_a_second_all_on_the_same_var_dir_is_refused(tmp_path: Path) -> None:
    first = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "all", "--demo-bureaux", "3"],
                             cwd=tmp_path, env=gateway_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        redis = Redis.from_url(Settings.from_env({}, var_dir=tmp_path / "var").redis_url_resolved)
        deadline = time.monotonic() + 60
        while True:
            try:
                run_id = redis.info("server")["run_id"]
                break
            except RedisError:
                assert first.poll() is None and time.monotonic() < deadline, "the first `all` did not start"
                time.sleep(0.2)

        # Other ports, the same var/: what would collide is the private Redis, the journal and the workers.
        second = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "all"], cwd=tmp_path,
                                env=gateway_env(), capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert f"another `run_gateway.py all` (pid {first.pid}) is running on {tmp_path / 'var'}" in second.stderr
        assert "Traceback" not in second.stderr and "starting" not in second.stdout
        redis.connection_pool.disconnect()
        assert redis.info("server")["run_id"] == run_id  # the socket is still the first one's Redis
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        try:
            first.wait(30)
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()


def test_the_runtime_data_directory_is_read_from_remontee_var_as_design_md_names_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
    env["REMONTEE_VAR"] = str(tmp_path / "night")
    result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "stations", "add", "dock-1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "night" / "journal.sqlite3").exists() and not (tmp_path / "var").exists()
    assert Settings.from_env({"REMONTEE_VAR": "/srv/a", "REMONTEE_VAR_DIR": "/srv/b"}).var_dir == Path("/srv/b")


@pytest.mark.parametrize("command", [
    ["stations", "add", "dock-1"],
    ["users", "add", "chef", "--role", "admin", "--password-stdin"],
    ["all", "--election", "primaire-2012"],  # creates var/ before it refuses the setting
])
def test_the_runtime_data_directory_is_created_for_its_user_alone(tmp_path: Path, command: list[str]) -> None:
    # What var/ holds (the journal, PIN hashes, uploads, Redis's AOF) is created under the default umask, 022:
    # readable by every user of the machine unless var/ itself keeps them out.
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
    subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), *command], cwd=tmp_path, env=env,
                   input="chef-mot-de-passe\n", capture_output=True, text=True, timeout=60,
                   preexec_fn=lambda: os.umask(0o022))
    assert (tmp_path / "var").is_dir()
    assert (tmp_path / "var").stat().st_mode & 0o777 == 0o700
    # A directory the operator made keeps its mode (docs/deploy.md: /srv/remontee, 750 for its group).
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o750)
    env["REMONTEE_VAR_DIR"] = str(shared)
    subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), *command], cwd=tmp_path, env=env,
                   input="chef-mot-de-passe\n", capture_output=True, text=True, timeout=60)
    assert shared.stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize(("setting", "error"), [
    (["--election", "primaire-2012"], "primaire-2012.toml: id: no such election"),
    (["--registry", "registry.csv"], "registry.csv:1: missing column(s)"),
    (["--redis-url", "localhost:6379"], "Redis URL must specify one of the following schemes"),
    (["--registry", "/etc/remontee/registre.csv"], "No such file or directory: '/etc/remontee/registre.csv'"),
])
def test_all_refuses_a_bad_setting_in_one_line_before_starting_anything(
    tmp_path: Path, setting: list[str], error: str,
) -> None:
    (tmp_path / "registry.csv").write_text("bureau,nom\n750120,École Jaurès\n")
    try:
        result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "all", "--demo-bureaux", "3", *setting],
                                cwd=tmp_path, env=gateway_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("`all` started with a setting none of its parts can run with") from None
    assert result.returncode != 0
    assert error in result.stderr.splitlines()[-1] and "Traceback" not in result.stderr
    assert "starting" not in result.stdout and not (tmp_path / "var" / "redis").exists()
    assert not (tmp_path / "var" / "pins.csv").exists()  # no demo registry made in its stead


@pytest.mark.parametrize(("variables", "flags", "error"), [
    ({"REMONTEE_AGI_PORT": "4573x"}, [], "REMONTEE_AGI_PORT='4573x': not a whole number"),
    ({}, ["--agi-port", "457300"], "--agi-port (REMONTEE_AGI_PORT) 457300: a port is 0 to 65535"),
    ({"REMONTEE_IVR_METRICS_PORT": "-1"}, [],
     "--ivr-metrics-port (REMONTEE_IVR_METRICS_PORT) -1: a port is 0 to 65535"),
    ({"REMONTEE_LOG_FORMAT": "txt"}, [], "REMONTEE_LOG_FORMAT='txt': json or text"),
])
def test_a_malformed_setting_is_a_usage_error_not_a_traceback(
    tmp_path: Path, variables: dict[str, str], flags: list[str], error: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMONTEE_")}
    result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "ivr", *flags], cwd=tmp_path,
                            env={**env, **variables}, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"remontee: error: {error}"


def test_every_subcommand_has_help() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "--help"], capture_output=True, text=True,
                         check=True).stdout
    commands = out.split("{", 1)[1].split("}", 1)[0].split(",")
    assert {"all", "registry", "worker", "relay", "totals"} <= set(commands)
    for command in commands:
        result = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), command, "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0 and "usage:" in result.stdout, command


def test_every_setting_but_the_secret_key_has_its_flag() -> None:
    """DESIGN.md: each setting from its REMONTEE_* variable and a matching flag; the review's secret key from its
    variable only, a flag being visible in the process list."""
    flags = {a.dest for a in common_parser()._actions}
    assert set(Settings.__dataclass_fields__) - flags == {"secret_key"}
    assert Settings.from_env({}, **{"max_upload_bytes": 1234}).max_upload_bytes == 1234
    args = common_parser().parse_args(["--max-upload-bytes", "1234"])
    assert Settings.from_env({}, **vars(args)).max_upload_bytes == 1234


def test_the_operators_one_shot_commands_fail_in_one_line(tmp_path: Path) -> None:
    """No terminal for a password, a form printed into no directory, a layout piped into `head`: a line that
    says so, or silence for the closed pipe, never a traceback."""
    def run(*command: str, **options: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "--var-dir", str(tmp_path / "var"),
                               *command], cwd=tmp_path, env=gateway_env(), capture_output=True, text=True,
                              timeout=120, **options)  # type: ignore[call-overload]

    # A session of its own: no controlling terminal, as under cron or a deployment script (and no test waiting
    # on the terminal of whoever runs the tests).
    passwd = run("users", "add", "bob", "--role", "supervisor", stdin=subprocess.DEVNULL, start_new_session=True)
    assert passwd.returncode == 1 and "--password-stdin" in passwd.stderr and "Traceback" not in passwd.stderr
    printed = run("forms", "print", "--bureau", "750101", "--out", "nowhere/form.png")
    assert printed.returncode == 1
    assert printed.stderr.strip() == "forms print: no directory nowhere to write form.png in"
    reader, writer = os.pipe()
    os.close(reader)  # `head` already gone: every write meets a closed pipe
    try:
        layout = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "forms", "layout"], cwd=tmp_path,
                                env=gateway_env(), stdout=writer, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(writer)
    assert layout.returncode == 1 and layout.stderr == ""


def test_every_setting_given_to_all_reaches_the_parts_it_starts(tmp_path: Path) -> None:
    """`all --max-upload-bytes N` (or any other flag) is the parts' setting too: each child reads its settings from
    the environment the supervisor gives it, so a setting left out of it fell back to its default there."""
    from run_gateway import SERVICES, Supervisor, build_parser

    values = {"var_dir": tmp_path / "night", "bind": "127.0.0.2", "agi_port": 14573, "pen_port": 18080,
              "review_port": 18081, "review_trusted_proxies": 1, "redis_url": "redis://127.0.0.1:16379/3",
              "db_url": f"sqlite:///{tmp_path / 'j.sqlite3'}", "election": "primaire-2011-t2",
              "registry": tmp_path / "registre.csv", "consolidate_job": "backoffice.jobs.consolidate",
              "max_upload_bytes": 1_000_000, "ivr_metrics_port": 19573, "worker_metrics_port": 19574,
              "log_format": "text"}
    assert set(values) == set(Settings.__dataclass_fields__) - {"secret_key"}  # a new setting is added here too
    argv = ["all"] + [a for name, value in values.items() for a in (f"--{name.replace('_', '-')}", str(value))]
    args = build_parser().parse_args(argv)
    overrides = {k: getattr(args, k) for k in Settings.__dataclass_fields__ if hasattr(args, k)}
    settings = Settings.from_env({}, **overrides)
    child = Settings.from_env(Supervisor(settings, SERVICES)._env())
    for name, value in values.items():
        assert getattr(child, name) == value, name


@contextlib.contextmanager
def _private_redis(settings: Settings) -> Iterator[Redis]:
    """`all`'s private redis-server on `settings.var_dir`, stopped on leaving."""
    server = start_private_redis(settings)
    try:
        yield Redis.from_url(settings.redis_url_resolved)
    finally:
        server.terminate()
        server.wait(10)


def test_a_private_redis_whose_aof_a_power_cut_left_torn_says_how_to_repair_it(tmp_path: Path) -> None:
    settings = Settings.from_env({}, var_dir=tmp_path / "var")
    with _private_redis(settings) as redis:
        redis.set("remontee:test:kept", "yes")
    aof_dir = tmp_path / "var" / "redis" / "appendonlydir"
    manifest = aof_dir / "appendonly.aof.manifest"
    last_incr = [line.split()[1] for line in manifest.read_text().splitlines() if line.endswith("type i")][-1]
    aof = aof_dir / last_incr

    # A last command half-written: Redis drops it and starts (aof-load-truncated).
    intact = aof.read_bytes()
    aof.write_bytes(intact + b"*3\r\n$3\r\nset\r\n$1\r\nb")
    with _private_redis(settings) as redis:
        assert redis.get("remontee:test:kept") == b"yes"

    # Zeros where the file's last blocks never reached the disk: redis-server refuses to start, and
    # `all` says what to run, in one line, instead of pointing at Redis's log.
    aof.write_bytes(aof.read_bytes() + bytes(4096))
    ran = subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), "all", "--demo-bureaux", "12"],
                         cwd=tmp_path, env=gateway_env(), capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0
    assert f"redis-check-aof --fix {manifest}" in ran.stderr
    assert "docs/deploy.md" in ran.stderr and "Traceback" not in ran.stderr

    # The repair it names brings Redis back with what the file held.
    subprocess.run(["redis-check-aof", "--fix", str(manifest)], input="y\n", text=True, check=True,
                   capture_output=True, timeout=30)
    with _private_redis(settings) as redis:
        assert redis.get("remontee:test:kept") == b"yes"


def test_a_redis_with_a_password_is_reached_through_its_url_and_the_password_is_never_printed(
        tmp_path: Path) -> None:
    """docs/deploy.md's production Redis (requirepass, the password in REMONTEE_REDIS_URL): the relay, an RQ worker
    and its scheduler, and `totals` reach it through the URL alone, and none of them writes the password out."""
    from registry.demo import generate

    password = "3f9a1c0b7e2d4a68"
    port = free_port()
    (tmp_path / "redis").mkdir()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--requirepass", password,
                               "--dir", str(tmp_path / "redis"), "--save", "", "--daemonize", "no",
                               "--logfile", str(tmp_path / "redis" / "redis.log")])
    try:
        admin = Redis(port=port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                admin.ping()
                break
            except RedisError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        generate(12, tmp_path / "registry.csv", tmp_path / "pins.csv")
        env = gateway_env() | {
            "REMONTEE_REDIS_URL": f"redis://:{password}@127.0.0.1:{port}/0", "REMONTEE_VAR_DIR": str(tmp_path / "var"),
            "REMONTEE_DB_URL": f"sqlite:///{tmp_path / 'journal.sqlite3'}",
            "REMONTEE_REGISTRY": str(tmp_path / "registry.csv"), "REMONTEE_ELECTION": "primaire-2011-t2"}
        election = load_election("primaire-2011-t2")
        Journal(env["REMONTEE_DB_URL"]).submit(new_return(
            election, "010101", {"votants": 30, "blancs_nuls": 2, "exprimes": 28, "hollande": 20, "aubry": 8},
            "ivr", {"call_id": "c1"}))

        def remontee(*command: str, environ: dict[str, str] = env) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(ROOT / "run_gateway.py"), *command], cwd=tmp_path,
                                  env=environ, capture_output=True, text=True, timeout=120)

        relay = subprocess.Popen([sys.executable, str(ROOT / "run_gateway.py"), "relay"], cwd=tmp_path, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while not admin.llen("rq:queue:returns"):
                assert relay.poll() is None and time.monotonic() < deadline, "the relay enqueued nothing"
                time.sleep(0.1)
        finally:
            relay.terminate()
            relay_out, relay_err = relay.communicate(timeout=30)
        assert "relay: journal" in relay_err
        worker = remontee("worker", "--burst")  # returns and ocr: RQ's scheduler makes a connection of its own
        assert worker.returncode == 0, worker.stderr
        figures = remontee("totals", "--json")
        assert figures.returncode == 0, figures.stderr
        assert json.loads(figures.stdout)["candidates"] == {"hollande": 20, "aubry": 8}

        wrong = remontee("totals", environ=env | {"REMONTEE_REDIS_URL": f"redis://:not{password}@127.0.0.1:{port}/0"})
        assert wrong.returncode == 1 and "does not answer" in wrong.stderr and "Traceback" not in wrong.stderr
        for text in (relay_out, relay_err, worker.stdout, worker.stderr, figures.stdout, figures.stderr,
                     wrong.stdout, wrong.stderr):
            assert password not in text
    finally:
        server.terminate()
        server.wait(10)
