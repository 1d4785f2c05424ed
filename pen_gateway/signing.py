"""Docking-station signatures: the station registry, the HMAC check and the replay memory.

A docking station signs every request with its secret (DESIGN.md, "Docking-station signature"):

    X-Remontee-Station:   <station id>
    X-Remontee-Timestamp: <unix seconds>
    X-Remontee-Signature: hex(HMAC-SHA256(key=<secret, as its ASCII text>,
                                          msg="<timestamp>\\n<hex SHA-256 of the raw request body>"))

The secret is the 64-hex-digit text `stations add` prints; its ASCII bytes are the HMAC key.

Stations live in the journal database (table `stations`). The secret has to be usable for the
HMAC, so it cannot be hashed like a PIN: it is encrypted at rest with Fernet (AES-128-CBC +
HMAC-SHA256) under a key kept in `<var>/station-secrets.key` (mode 0600, created on first use).
A copy of the database alone (a backup, a PostgreSQL dump) does not give the secrets away; every
gateway process that checks signatures needs that key file, and nobody else.

Replays: a signature is accepted once. Uploads remember theirs in the journal, in the same
transaction as the upload row (`seen_signatures`), so a replay is refused whether or not Redis
is up; status reads remember theirs, per path read, in Redis (SET NX, 600 s), or in the journal
when Redis is down (two reads of the same path signed in the same second carry the same
signature, and the second is a replay: a fast poller signs with the next second). A signature
older than the 300 s window is refused by its timestamp anyway, so a memory of 600 s is enough
and the OCR relay purges older rows.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import Column, Connection, Float, MetaData, String, Table, Text, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from returns_queue.journal import Journal
from settings import make_var_dir

SIGNATURE_WINDOW = 300  # seconds a timestamp may be off, either way
REPLAY_MEMORY = 600  # seconds a used signature is remembered
STATION_HEADER = "X-Remontee-Station"
TIMESTAMP_HEADER = "X-Remontee-Timestamp"
SIGNATURE_HEADER = "X-Remontee-Signature"
STATION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
KEY_FILE = "station-secrets.key"

metadata = MetaData()

stations = Table(
    "stations",
    metadata,
    Column("station_id", String(64), primary_key=True),
    Column("secret", Text, nullable=False),  # Fernet token of the secret, key under var/
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),
)

seen_signatures = Table(
    "seen_signatures",
    metadata,
    Column("signature", String(64), primary_key=True),
    Column("station_id", String(64), nullable=False),
    Column("seen_at", Float, nullable=False, index=True),
)


class SignatureError(Exception):
    """A request whose signature is missing, stale, unknown, wrong or replayed: answered 401."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def replayed() -> SignatureError:
    return SignatureError("REPLAYED_SIGNATURE", "this signature was already used: sign every request afresh")


class StationExists(Exception):
    pass


class NoSuchStation(LookupError):
    """No station of that id to revoke: never registered, or revoked already."""


# --- the signature itself (also what a docking station, or tests/pen_helpers.py, computes) ---

def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def sign(secret: str, timestamp: int | str, body_sha256: str) -> str:
    message = f"{timestamp}\n{body_sha256}".encode("ascii")
    return hmac.new(secret.encode("ascii"), message, hashlib.sha256).hexdigest()


def signature_headers(station_id: str, secret: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The three headers a docking station sends with `body`."""
    ts = int(time.time()) if timestamp is None else timestamp
    return {
        STATION_HEADER: station_id,
        TIMESTAMP_HEADER: str(ts),
        SIGNATURE_HEADER: sign(secret, ts, body_digest(body)),
    }


# --- the station registry ---

def _load_or_create_key(var_dir: Path) -> bytes:
    path = Path(var_dir) / KEY_FILE
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    make_var_dir(path.parent)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
        f.flush()
        os.fsync(f.fileno())
    return key


class StationRegistry:
    """The docking stations allowed to upload, with their secrets (encrypted at rest)."""

    def __init__(self, journal: Journal, var_dir: Path, cache_seconds: float = 10.0) -> None:
        self.journal, self.var_dir = journal, Path(var_dir)
        journal.create_tables(metadata)
        self._fernet: Fernet | None = None
        self._cache: dict[str, tuple[float, str | None]] = {}
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()

    @property
    def fernet(self) -> Fernet:
        if self._fernet is None:
            self._fernet = Fernet(_load_or_create_key(self.var_dir))
        return self._fernet

    def add(self, station_id: str, *, actor: str = "cli") -> str:
        """Register a station; returns its new secret (shown once, never stored in clear)."""
        if not STATION_ID.match(station_id):
            raise ValueError("a station id is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
        secret = secrets.token_hex(32)
        token = self.fernet.encrypt(secret.encode("ascii")).decode("ascii")
        try:
            with self.journal.write() as conn:
                conn.execute(insert(stations).values(station_id=station_id, secret=token, created_at=time.time()))
                Journal.record_audit(conn, actor, "station_add", station_id)
        except IntegrityError as exc:
            raise StationExists(f"station {station_id} is already registered") from exc
        return secret

    def revoke(self, station_id: str, *, actor: str = "cli") -> None:
        """Refuse the station's signatures from now on (a gateway already running: once its cache has expired).

        Its row stays, with its uploads: the revocation is audited, and the id cannot be registered again."""
        with self.journal.write() as conn:
            revoked_at = conn.execute(select(stations.c.revoked_at).where(stations.c.station_id == station_id)).first()
            if revoked_at is None:
                raise NoSuchStation(f"station {station_id[:64]!r} is not registered")
            if revoked_at[0] is not None:
                raise NoSuchStation(f"station {station_id} was revoked already, at "
                                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(revoked_at[0]))}")
            conn.execute(update(stations).where(stations.c.station_id == station_id).values(revoked_at=time.time()))
            Journal.record_audit(conn, actor, "station_revoke", station_id, {"revoked": False}, {"revoked": True})
        with self._lock:
            self._cache.pop(station_id, None)

    def station_ids(self) -> list[str]:
        with self.journal.read() as conn:
            rows = conn.execute(select(stations.c.station_id).where(stations.c.revoked_at.is_(None)))
            return sorted(r.station_id for r in rows)

    def secret(self, station_id: str) -> str | None:
        """The station's secret, or None for an unknown or revoked station (a known one is cached a few seconds)."""
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(station_id)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        with self.journal.read() as conn:
            row = conn.execute(
                select(stations.c.secret).where(stations.c.station_id == station_id, stations.c.revoked_at.is_(None))
            ).first()
        value: str | None = None
        if row is not None:
            try:
                value = self.fernet.decrypt(row.secret.encode("ascii")).decode("ascii")
            except InvalidToken as exc:
                raise RuntimeError(f"station secrets cannot be decrypted with {self.var_dir / KEY_FILE}: "
                                   "is it the key file these stations were registered with?") from exc
        if value is not None:  # an unknown id is not cached: a station just added works at once
            with self._lock:
                if len(self._cache) > 50_000:
                    self._cache.clear()
                self._cache[station_id] = (now, value)
        return value


# --- checking a request ---

@dataclass(frozen=True)
class SignedRequest:
    """A request whose headers name a known station and a fresh timestamp; its body not yet checked."""

    station_id: str
    timestamp: int
    signature: str
    secret: str

    def check_body(self, body_sha256: str) -> None:
        expected = sign(self.secret, self.timestamp, body_sha256)
        if not hmac.compare_digest(expected, self.signature):
            raise SignatureError("BAD_SIGNATURE", "the signature does not match the request body and timestamp")


def check_headers(headers: Mapping[str, str], registry: StationRegistry, *, now: float | None = None,
                  window: int = SIGNATURE_WINDOW) -> SignedRequest:
    """Everything that can be checked before reading the body: present, fresh, a known station."""
    station_id = headers.get(STATION_HEADER, "").strip()
    raw_timestamp = headers.get(TIMESTAMP_HEADER, "").strip()
    signature = headers.get(SIGNATURE_HEADER, "").strip().lower()
    if not station_id or not raw_timestamp or not signature:
        raise SignatureError("MISSING_SIGNATURE",
                             f"a signed request needs {STATION_HEADER}, {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}")
    if not raw_timestamp.isascii() or not raw_timestamp.isdigit() or len(raw_timestamp) > 12:  # isdigit() takes "²"
        raise SignatureError("BAD_TIMESTAMP", f"{TIMESTAMP_HEADER} must be whole unix seconds")
    if not re.fullmatch(r"[0-9a-f]{64}", signature):
        raise SignatureError("BAD_SIGNATURE", f"{SIGNATURE_HEADER} must be 64 hex digits (HMAC-SHA256)")
    timestamp = int(raw_timestamp)
    current = time.time() if now is None else now
    if abs(current - timestamp) > window:
        # Rounded up: a timestamp 300.4 s off is refused, and must not be said to be 300 s off.
        way = "behind" if current > timestamp else "ahead of"
        raise SignatureError("STALE_TIMESTAMP",
                             f"the timestamp is {math.ceil(abs(current - timestamp))} s {way} the gateway's clock; "
                             f"at most {window} s either way is accepted: sign the request again with the current "
                             "time (a retry too), and check the station's clock")
    secret = registry.secret(station_id) if STATION_ID.match(station_id) else None
    if secret is None:
        raise SignatureError("UNKNOWN_STATION", f"station {station_id[:64]!r} is not registered")
    return SignedRequest(station_id, timestamp, signature, secret)


def signature_seen(conn: Connection, signature: str) -> bool:
    return conn.execute(select(seen_signatures.c.signature).where(seen_signatures.c.signature == signature)
                        ).first() is not None


def remember_signature(conn: Connection, request: SignedRequest) -> None:
    """Record the signature inside the caller's transaction; raises SignatureError if it was used before."""
    if signature_seen(conn, request.signature):
        raise replayed()
    conn.execute(insert(seen_signatures).values(signature=request.signature, station_id=request.station_id,
                                                seen_at=time.time()))


def claim_signature(request: SignedRequest, redis: Redis | None, journal: Journal, scope: str = "") -> None:
    """For requests that journal nothing else (status reads): Redis SET NX, the journal when Redis is down.

    A status read signs an empty body, so two reads in the same second carry the same signature:
    the memory is kept per `scope` (the path read), letting a station read several uploads in one
    second while a captured signature still cannot be used twice on the same path.
    """
    token = hashlib.sha256(f"{request.signature}\n{scope}".encode()).hexdigest() if scope else request.signature
    scoped = SignedRequest(request.station_id, request.timestamp, token, request.secret)
    if redis is not None:
        try:
            # SET NX answers True when the key was set, None when it already existed.
            fresh = bool(redis.set(f"remontee:pen:sig:{token}", request.station_id, nx=True, ex=REPLAY_MEMORY))
        except RedisError:
            pass  # Redis is down: remember it in the journal instead
        else:
            if not fresh:
                raise replayed()
            return
    try:
        with journal.write() as conn:
            remember_signature(conn, scoped)
    except IntegrityError as exc:  # a concurrent twin won the insert
        raise replayed() from exc


def purge_seen_signatures(journal: Journal, now: float | None = None) -> int:
    with journal.write() as conn:
        return purge_seen_signatures_in(conn, now)


def purge_seen_signatures_in(conn: Connection, now: float | None = None) -> int:
    """Forget signatures too old to be replayed (their timestamp is out of the window anyway)."""
    cutoff = (time.time() if now is None else now) - REPLAY_MEMORY
    return conn.execute(delete(seen_signatures).where(seen_signatures.c.seen_at < cutoff)).rowcount
