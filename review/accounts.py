"""Supervisors' accounts: users and roles, server-side sessions, login attempts and the lockout.

The tables live in the journal's database (SQLAlchemy Core, through `Journal.write()/read()`),
so a login, a correction and their audit rows share one durable store. Passwords are hashed
with Argon2id (argon2-cffi): memory-hard, salted, and `check_needs_rehash` lets us raise the
cost later and upgrade each hash at its owner's next login. (werkzeug's scrypt would do too;
Argon2id is OWASP's first recommendation and argon2-cffi's `PasswordHasher` carries its own
parameters in each hash, so tests can use a cheap hasher and production a dear one.)

Sessions are rows, not just signed cookies: the cookie carries a random token whose SHA-256
is the key here, so logout and disabling a user end a session at once, and a session expires
after an idle time and after an absolute lifetime, whatever the cookie says.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    select,
    update,
)

from returns_queue.journal import Journal

ROLES = ("supervisor", "admin")
ROLE_LABELS = {"supervisor": "superviseur", "admin": "administrateur"}
USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
MIN_PASSWORD = 10

metadata = MetaData()

users = Table(
    "review_users",
    metadata,
    Column("username", String(64), primary_key=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

sessions = Table(
    "review_sessions",
    metadata,
    Column("token_hash", String(64), primary_key=True),  # SHA-256 of the cookie's token: a DB leak opens nothing
    Column("username", String(64), nullable=False, index=True),
    Column("created_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("expires_at", Float, nullable=False),  # the absolute lifetime
    Column("address", String(64)),
)

login_attempts = Table(
    "review_login_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False),
    Column("address", String(64)),
    Column("at", Float, nullable=False),
    Column("success", Boolean, nullable=False),
    Index("ix_login_attempts_user", "username", "at"),
    Index("ix_login_attempts_address", "address", "at"),
)


class AccountError(ValueError):
    """A request about an account that cannot be done; the message is French, for the person who asked."""


class AccountLocked(AccountError):
    """The name or the address is locked out by too many wrong passwords; `retry_after` seconds to wait."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("trop d'échecs de mot de passe")
        self.retry_after = retry_after


@dataclass(frozen=True)
class User:
    username: str
    role: str
    active: bool
    created_at: float

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def role_label(self) -> str:
        return ROLE_LABELS.get(self.role, self.role)


@dataclass(frozen=True)
class LockoutPolicy:
    """`max_failures` wrong passwords for one name within `window` seconds lock that name until they age out;
    `max_address_failures` from one address lock that address (password spraying over many names)."""

    max_failures: int = 5
    max_address_failures: int = 20
    window: float = 15 * 60


@dataclass(frozen=True)
class SessionPolicy:
    idle: float = 30 * 60
    lifetime: float = 12 * 3600
    touch_every: float = 60  # write last_seen at most this often: the journal's writer is shared with the channels


@dataclass(frozen=True)
class LoginResult:
    user: User | None
    locked: bool = False
    retry_after: float = 0.0


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_username(username: str) -> str:
    username = username.strip().lower()
    if not USERNAME.match(username):
        raise AccountError("identifiant : 2 à 64 caractères, minuscules, chiffres, point, tiret ou souligné")
    return username


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"le mot de passe doit compter au moins {MIN_PASSWORD} caractères")
    if len(password) > 1024:
        raise AccountError("le mot de passe est trop long (1024 caractères au plus)")
    return password


def check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"rôle inconnu : {role} (superviseur ou administrateur)")
    return role


def _user(row: Any) -> User:
    return User(row.username, row.role, bool(row.active), row.created_at)


class Accounts:
    """Users, sessions and logins; every change writes its audit row in the same transaction."""

    def __init__(
        self,
        journal: Journal,
        hasher: PasswordHasher | None = None,
        lockout: LockoutPolicy | None = None,
        session_policy: SessionPolicy | None = None,
    ) -> None:
        self.journal = journal
        self.hasher = hasher or PasswordHasher()
        self.lockout = lockout or LockoutPolicy()
        self.session_policy = session_policy or SessionPolicy()
        journal.create_tables(metadata)
        # Verified against when the name is unknown, so a wrong name costs as long as a wrong password.
        self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))

    # --- users ---

    def get_user(self, username: str) -> User | None:
        with self.journal.read() as conn:
            row = conn.execute(select(users).where(users.c.username == username)).first()
        return _user(row) if row else None

    def list_users(self) -> list[User]:
        with self.journal.read() as conn:
            return [_user(r) for r in conn.execute(select(users).order_by(users.c.username))]

    def add_user(self, username: str, password: str, role: str, actor: str) -> User:
        username, role = check_username(username), check_role(role)
        password_hash = self.hasher.hash(check_password(password))
        now = time.time()
        with self.journal.write() as conn:
            if conn.execute(select(users.c.username).where(users.c.username == username)).first():
                raise AccountError(f"l'utilisateur {username} existe déjà")
            conn.execute(
                insert(users).values(
                    username=username, password_hash=password_hash, role=role, active=True,
                    created_at=now, updated_at=now,
                )
            )
            Journal.record_audit(conn, actor, "user_add", username, None, {"role": role, "active": True})
        return User(username, role, True, now)

    def set_role(self, username: str, role: str, actor: str) -> None:
        role = check_role(role)
        with self.journal.write() as conn:
            current = self._locked_user(conn, username)
            if current.role == role:
                return
            if current.role == "admin" and self._other_active_admins(conn, username) == 0:
                raise AccountError("impossible de retirer le dernier administrateur actif")
            conn.execute(update(users).where(users.c.username == username).values(role=role, updated_at=time.time()))
            Journal.record_audit(conn, actor, "user_role", username, {"role": current.role}, {"role": role})

    def set_active(self, username: str, active: bool, actor: str) -> None:
        with self.journal.write() as conn:
            current = self._locked_user(conn, username)
            if current.active == active:
                return
            if not active and current.role == "admin" and self._other_active_admins(conn, username) == 0:
                raise AccountError("impossible de désactiver le dernier administrateur actif")
            conn.execute(
                update(users).where(users.c.username == username).values(active=active, updated_at=time.time())
            )
            if not active:  # a disabled supervisor is out at once, not at the end of a session
                conn.execute(delete(sessions).where(sessions.c.username == username))
            Journal.record_audit(
                conn, actor, "user_enable" if active else "user_disable", username,
                {"active": current.active}, {"active": active},
            )

    def set_password(self, username: str, password: str, actor: str) -> None:
        password_hash = self.hasher.hash(check_password(password))
        with self.journal.write() as conn:
            self._locked_user(conn, username)
            conn.execute(
                update(users)
                .where(users.c.username == username)
                .values(password_hash=password_hash, updated_at=time.time())
            )
            # Other sessions of that user end: a password change after a suspected leak must lock the thief out.
            conn.execute(delete(sessions).where(sessions.c.username == username))
            # The failures before it were guesses at the old password: the name's lockout starts afresh, as after
            # a login (a locked supervisor is told to ask an administrator, and this is what one can do). The
            # row names no address, so the guesser's address keeps its count.
            conn.execute(insert(login_attempts).values(username=username, address=None, at=time.time(), success=True))
            Journal.record_audit(conn, actor, "user_password", username, None, None)

    def _locked_user(self, conn: Any, username: str) -> User:
        row = conn.execute(select(users).where(users.c.username == username)).first()
        if row is None:
            raise AccountError(f"utilisateur inconnu : {username}")
        return _user(row)

    def _other_active_admins(self, conn: Any, username: str) -> int:
        return conn.execute(
            select(func.count())
            .select_from(users)
            .where(users.c.role == "admin", users.c.active.is_(True), users.c.username != username)
        ).scalar_one()

    # --- logins ---

    def _lock_state(self, conn: Any, username: str, address: str | None, now: float) -> float:
        """Seconds until this name (or address) may try again; 0 when it may try now."""
        policy = self.lockout
        since = now - policy.window
        last_success = conn.execute(
            select(func.max(login_attempts.c.at)).where(
                login_attempts.c.username == username, login_attempts.c.success.is_(True)
            )
        ).scalar_one()
        # A successful login clears the failures before it: the owner is not locked by old typos.
        name_since = max(since, last_success or 0.0)
        waits = [0.0]
        failures = [
            r.at for r in conn.execute(
                select(login_attempts.c.at)
                .where(login_attempts.c.username == username, login_attempts.c.success.is_(False),
                       login_attempts.c.at > name_since)
                .order_by(login_attempts.c.at)
            )
        ]
        if len(failures) >= policy.max_failures:
            waits.append(failures[len(failures) - policy.max_failures] + policy.window - now)
        if address:
            by_address = [
                r.at for r in conn.execute(
                    select(login_attempts.c.at)
                    .where(login_attempts.c.address == address, login_attempts.c.success.is_(False),
                           login_attempts.c.at > since)
                    .order_by(login_attempts.c.at)
                )
            ]
            if len(by_address) >= policy.max_address_failures:
                waits.append(by_address[len(by_address) - policy.max_address_failures] + policy.window - now)
        return max(waits)

    def authenticate(self, username: str, password: str, address: str | None) -> LoginResult:
        """Check a login; on success it goes on the audit trail as a `login`."""
        return self._check_password(username.strip().lower()[:64], password, address)

    def _check_password(self, username: str, password: str, address: str | None,
                        during: str | None = None) -> LoginResult:
        """Every check of a password goes through here, so the lockout counts them all and the audit trail
        shows every failure. The attempt is written as a failure *before* the password is verified, and
        turned into a success after, so parallel guesses cannot slip past the lockout.

        `during` names the form that asked when it is not the login (the own-password change); it goes on
        the audit rows, and a success there is audited by what follows it, not as a login."""
        address = (address or "")[:64] or None
        where = {"address": address} if during is None else {"address": address, "during": during}
        now = time.time()
        with self.journal.write() as conn:
            wait = self._lock_state(conn, username, address, now)
            if wait > 0:
                Journal.record_audit(conn, username or "?", "login_locked", username, None,
                                     {**where, "retry_after_s": round(wait)})
                return LoginResult(None, locked=True, retry_after=wait)
            attempt_id = conn.execute(
                insert(login_attempts).values(username=username, address=address, at=now, success=False)
            ).inserted_primary_key[0]
            row = conn.execute(select(users).where(users.c.username == username)).first()
        # The hash is checked outside the transaction: Argon2 is slow on purpose and the writer lock is shared.
        stored = row.password_hash if row is not None else self._dummy_hash
        try:
            ok = self.hasher.verify(stored, password) and row is not None and bool(row.active)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        with self.journal.write() as conn:
            if not ok:
                why = "unknown" if row is None else ("inactive" if not row.active else "password")
                Journal.record_audit(conn, username or "?", "login_failed", username, None, {**where, "why": why})
                return LoginResult(None)
            conn.execute(update(login_attempts).where(login_attempts.c.id == attempt_id).values(success=True))
            if self.hasher.check_needs_rehash(stored):
                conn.execute(
                    update(users).where(users.c.username == username).values(password_hash=self.hasher.hash(password))
                )
            if during is None:
                Journal.record_audit(conn, username, "login", username, None, where)
        return LoginResult(_user(row))

    # --- sessions ---

    def open_session(self, username: str, address: str | None) -> str:
        """A new session for `username`; the token goes in the cookie and only its hash is kept."""
        token = secrets.token_urlsafe(32)
        now = time.time()
        with self.journal.write() as conn:
            # Expired sessions are swept here, at a login, rather than by a timer nobody would run.
            conn.execute(delete(sessions).where(
                (sessions.c.expires_at < now) | (sessions.c.last_seen < now - self.session_policy.idle)
            ))
            conn.execute(
                insert(sessions).values(
                    token_hash=hash_token(token), username=username, created_at=now, last_seen=now,
                    expires_at=now + self.session_policy.lifetime, address=(address or "")[:64] or None,
                )
            )
        return token

    def session_user(self, token: str, touch: bool = True) -> User | None:
        """The user of a live session, or None when it is unknown, idle too long, past its lifetime or disabled.

        `touch=False` for a request the page makes by itself (the claim heartbeat): it is not the supervisor's
        activity, and the session goes idle as if it had not been made."""
        now = time.time()
        key = hash_token(token)
        with self.journal.read() as conn:
            row = conn.execute(
                select(sessions.c.last_seen, sessions.c.expires_at, users)
                .join(users, users.c.username == sessions.c.username)
                .where(sessions.c.token_hash == key)
            ).first()
        if row is None or not row.active:
            return None
        if row.expires_at < now or row.last_seen < now - self.session_policy.idle:
            self.close_session(token)
            return None
        if touch and now - row.last_seen > self.session_policy.touch_every:
            with self.journal.write() as conn:
                conn.execute(update(sessions).where(sessions.c.token_hash == key).values(last_seen=now))
        return _user(row)

    def close_session(self, token: str, actor: str | None = None) -> None:
        """End a session; with `actor`, it is a logout and goes on the audit trail."""
        with self.journal.write() as conn:
            conn.execute(delete(sessions).where(sessions.c.token_hash == hash_token(token)))
            if actor is not None:
                Journal.record_audit(conn, actor, "logout", actor, None, None)

    def change_own_password(self, username: str, current: str, new: str, address: str | None) -> None:
        """A supervisor's own change, proved by the current password. That proof is a login's check, lockout
        and audit included: a stolen session must not become a way to guess the owner's password."""
        check_password(new)  # a refused new password costs no attempt
        result = self._check_password(username, current, address, during="password_change")
        if result.locked:
            raise AccountLocked(result.retry_after)
        if result.user is None:
            raise AccountError("le mot de passe actuel est incorrect")
        self.set_password(username, new, username)
