"""Every setting of Remontée in one place: defaults, then `REMONTEE_*` environment variables, then flags.

Each part reads its settings from a `Settings`; tests build one directly with their own values.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from telemetry.logs import FORMATS as LOG_FORMATS

ROOT = Path(__file__).resolve().parent


class SettingsError(ValueError):
    """A setting that cannot be (a port that is not a number, or beyond 65535); names its variable."""


@dataclass(frozen=True)
class Settings:
    var_dir: Path = Path("var")
    bind: str = "127.0.0.1"
    agi_port: int = 4573
    pen_port: int = 8080
    review_port: int = 8081
    # Reverse proxies in front of the review UI, each appending the address it saw to X-Forwarded-For; the
    # client is the address the outermost of them saw. 0: none is trusted, so a client cannot forge its address.
    review_trusted_proxies: int = 0
    redis_url: str | None = None  # None: run_gateway.py starts a private redis-server under var/redis/
    db_url: str | None = None  # None: SQLite under var/
    election: str = "primaire-2011-t1"
    registry: Path | None = None  # None: var/registry.csv, generated for the demo by `run_gateway.py all`
    consolidate_job: str = "returns_queue.consolidation.consolidate"
    secret_key: str | None = None  # review UI sessions; None: generated once into var/secret_key
    max_upload_bytes: int = 20 * 1024 * 1024
    ivr_metrics_port: int = 9573  # the FastAGI server's Prometheus listener; 0: none
    worker_metrics_port: int = 9574  # the RQ workers' Prometheus listener (one per machine serves them all); 0: none
    log_format: str = "json"  # json (one object a line) or text (for a terminal)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, overridden by `REMONTEE_<NAME>` variables, overridden by non-None `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"REMONTEE_{f.name.upper()}")
            if f.name == "var_dir" and not raw:
                raw = environ.get("REMONTEE_VAR")  # DESIGN.md's name for it
            if raw is not None and raw != "":
                try:
                    values[f.name] = _convert(f.type, raw)
                except ValueError:
                    raise SettingsError(f"REMONTEE_{f.name.upper()}={raw!r}: not a whole number") from None
        # The flag offers these only; the variable is checked here, or every part would die of it at its start
        # with a traceback (telemetry.logs.configure_logging), restarted again and again by a supervisor.
        if values.get("log_format", "json") not in LOG_FORMATS:
            raise SettingsError(f"REMONTEE_LOG_FORMAT={values['log_format']!r}: {' or '.join(LOG_FORMATS)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name, value in values.items():
            # A port no socket can have would only fail in the part that listens, or not at all (a metrics port).
            if name.endswith("_port") and not 0 <= value <= 65535:
                raise SettingsError(f"--{name.replace('_', '-')} (REMONTEE_{name.upper()}) {value}: "
                                    f"a port is 0 to 65535")
        return replace(cls(), **values)

    @property
    def db_url_resolved(self) -> str:
        return self.db_url or f"sqlite:///{(self.var_dir / 'journal.sqlite3').resolve()}"

    @property
    def registry_path(self) -> Path:
        return self.registry or self.var_dir / "registry.csv"

    @property
    def private_redis_socket(self) -> Path:
        return (self.var_dir / "redis" / "redis.sock").resolve()

    @property
    def redis_url_resolved(self) -> str:
        return self.redis_url or f"unix://{self.private_redis_socket}"


def make_var_dir(var_dir: Path) -> Path:
    """Create the runtime data directory, open to its owner only (0700), whatever the umask.

    It holds the journal (every return, the supervisors' password hashes), the demo registry's PIN
    hashes (six digits: a few core-hours to guess offline), the uploads and the private Redis's AOF,
    and the default umask leaves what is created there readable by every user of the machine. An
    existing directory keeps its mode (docs/deploy.md makes /srv/remontee 750 for its group)."""
    var_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return var_dir


def without_password(url: str) -> str:
    """`url` as it may be printed or logged: the password it carries, if any, replaced by `***`.

    In production REMONTEE_REDIS_URL (and REMONTEE_DB_URL, for a database that wants one) holds a password
    (docs/deploy.md), in the user part (`redis://:secret@host`) or as `?password=`; the logs are not the place
    for it."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, _, host = netloc.rpartition("@")
    if ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    return scheme + sep + re.sub(r"([?&])password=[^&#]*", r"\1password=***", netloc + slash + path)


def _convert(annotation: Any, raw: str) -> Any:
    text = str(annotation)
    if "int" in text:
        return int(raw)
    if "Path" in text:
        return Path(raw)
    return raw
