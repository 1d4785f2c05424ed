"""What the phone channel keeps in Redis across calls: PIN lockouts and interrupted entries.

Blocking (redis-py): the call flow calls these methods in a thread. redis-py rather than the
Twisted client txredisapi because the rest of Remontée (relay, RQ, consolidation) already uses
it, its connection pool is thread-safe, and the handful of Redis calls per phone call cost less
in a thread than a second client library to keep up to date.

- Three wrong PINs for a bureau within 15 minutes lock the bureau for 15 minutes, across every
  call and every server; the same for a caller id. The failures are a sorted set of
  timestamps (a sliding window), counted and locked by one Lua script, so two servers cannot
  both see "two failures" and let a fourth try through.
- Every PIN attempt is let in by a Lua script before the PIN is checked (`begin_pin_attempt`),
  so a call that started before the lock cannot try on after it, not even with the right PIN.
  An attempt is pending until its PIN is checked, and a bureau's pending attempts count with its
  failures: three calls keying PINs for one bureau at the same moment are the three tries, a
  fourth is refused as for a locked bureau. A caller id is only refused once locked (calls from
  one switchboard legitimately key PINs together, for different bureaux, each behind its own).
- When Redis is unreachable the lockouts are kept in this process (`LocalLockouts`, the same
  thresholds and lock times): phone reporting goes on, the lockout does not lift. A lock taken
  then holds until it ends, Redis back or not; each process counts on its own.
- A call that drops keeps the counts entered so far for 30 minutes; the bureau calling back is
  offered to resume.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

KEY = "remontee:ivr"
# Keys: failures, pending and lock of the bureau, then (when the caller id names someone) of the
# caller id. 0 when the attempt is let in (and is then pending), else 1 for the bureau, 2 for the
# caller id: locked, or for the bureau its failures and pending attempts already fill its tries.
_BEGIN_ATTEMPT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_failures, pending_seconds = tonumber(ARGV[3]), tonumber(ARGV[4])
for i = 1, #KEYS, 3 do
  if redis.call('EXISTS', KEYS[i + 2]) == 1 then
    return (i + 2) / 3
  end
end
local failures, pending = KEYS[1], KEYS[2]
redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', pending, '-inf', now - pending_seconds)
if redis.call('ZCARD', failures) + redis.call('ZCARD', pending) >= max_failures then
  return 1
end
for i = 1, #KEYS, 3 do
  redis.call('ZADD', KEYS[i + 1], now, ARGV[5])
  redis.call('EXPIRE', KEYS[i + 1], math.ceil(pending_seconds))
end
return 0
"""
# A wrong PIN: no longer pending, counted; the kinds (1 bureau, 2 caller id) it locked.
_RECORD_FAILURE = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_failures, lock_seconds = tonumber(ARGV[3]), tonumber(ARGV[4])
local locked = {}
for i = 1, #KEYS, 3 do
  local failures, pending, lock = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  redis.call('ZREM', pending, ARGV[5])
  redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
  redis.call('ZADD', failures, now, ARGV[5])
  redis.call('EXPIRE', failures, math.ceil(window))
  if redis.call('ZCARD', failures) >= max_failures then
    redis.call('SET', lock, now, 'EX', lock_seconds)
    redis.call('DEL', failures)
    table.insert(locked, (i + 2) / 3)
  end
end
return locked
"""
KINDS = ("bureau", "caller")
# Caller ids that name nobody: locking them would lock every withheld number at once.
ANONYMOUS = frozenset({"", "unknown", "anonymous", "restricted", "private", "withheld"})


@dataclass(frozen=True)
class Partial:
    """An interrupted entry: the counts keyed so far, in the form's order."""

    election: str
    bureau: str
    counts: dict[str, int]
    caller_id: str
    call_id: str
    saved_at: float


@dataclass(frozen=True)
class PinAttempt:
    """One PIN attempt let in (or not) before its PIN is checked."""

    bureau: str
    caller_id: str  # "" when it names nobody: then only the bureau counts
    token: str
    refused: str | None = None  # "bureau" or "caller": locked; the PIN must not be checked
    in_redis: bool = True  # where it is pending, so where its outcome is counted

    def whos(self) -> list[tuple[str, str]]:
        return [("bureau", self.bureau)] + ([("caller", self.caller_id)] if self.caller_id else [])


class LocalLockouts:
    """The PIN lockouts of this process while Redis is unreachable: the same rules, in memory.

    Thread-safe (the call flow runs in threads). A lock taken here is honoured whatever Redis
    says, until it ends; failures counted here lock only here (they are not carried into Redis).
    """

    def __init__(self, max_failures: int, window: float, lock_seconds: float, pending_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures, self.window, self.lock_seconds = max_failures, window, lock_seconds
        self.pending_seconds, self.clock = pending_seconds, clock
        self._mutex = threading.Lock()
        self._failures: dict[tuple[str, str], list[float]] = {}
        self._pending: dict[tuple[str, str], dict[str, float]] = {}
        self._locked_until: dict[tuple[str, str], float] = {}
        self._swept_at = clock()

    def locked_for(self, kind: str, who: str) -> int:
        with self._mutex:
            return self._locked_for((kind, who), self.clock())

    def _locked_for(self, key: tuple[str, str], now: float) -> int:
        left = self._locked_until.get(key, 0.0) - now
        if left <= 0:
            self._locked_until.pop(key, None)
            return 0
        return max(1, int(left))

    def _recent(self, key: tuple[str, str], now: float) -> list[float]:
        failures = [t for t in self._failures.get(key, ()) if t > now - self.window]
        if failures:
            self._failures[key] = failures
        else:
            self._failures.pop(key, None)
        return failures

    def _pending_of(self, key: tuple[str, str], now: float) -> dict[str, float]:
        pending = {t: at for t, at in self._pending.get(key, {}).items() if at > now - self.pending_seconds}
        if pending:
            self._pending[key] = pending
        else:
            self._pending.pop(key, None)
        return pending

    def refused(self, attempt: PinAttempt) -> str | None:
        """Which of the attempt's bureau or caller id is locked here (None: neither)."""
        with self._mutex:
            now = self.clock()
            return next((kind for kind, who in attempt.whos() if self._locked_for((kind, who), now)), None)

    def begin(self, attempt: PinAttempt) -> str | None:
        """As `_BEGIN_ATTEMPT`: the kind that refuses the attempt, else None and the attempt is pending."""
        with self._mutex:
            now = self.clock()
            self._sweep(now)
            for kind, who in attempt.whos():
                if self._locked_for((kind, who), now):
                    return kind
            bureau = ("bureau", attempt.bureau)
            if len(self._recent(bureau, now)) + len(self._pending_of(bureau, now)) >= self.max_failures:
                return "bureau"
            for key in attempt.whos():
                self._pending.setdefault(key, {})[attempt.token] = now
            return None

    def failed(self, attempt: PinAttempt) -> list[str]:
        """As `_RECORD_FAILURE`: the kinds this wrong PIN locked."""
        locked = []
        with self._mutex:
            now = self.clock()
            for kind, who in attempt.whos():
                key = (kind, who)
                self._pending.get(key, {}).pop(attempt.token, None)
                failures = self._recent(key, now)
                failures.append(now)
                self._failures[key] = failures
                if len(failures) >= self.max_failures:
                    self._locked_until[key] = now + self.lock_seconds
                    del self._failures[key]
                    locked.append(kind)
        return locked

    def right(self, attempt: PinAttempt) -> None:
        """The bureau's failures are forgiven, a caller id's are not; the attempt is no longer pending."""
        with self._mutex:
            for key in attempt.whos():
                self._pending.get(key, {}).pop(attempt.token, None)
            self._failures.pop(("bureau", attempt.bureau), None)

    def _sweep(self, now: float) -> None:
        """Forget what has ended, once a minute: caller ids are many and cost nothing to invent."""
        if now - self._swept_at < 60:
            return
        self._swept_at = now
        for key in list(self._locked_until):
            self._locked_for(key, now)
        for key in list(self._failures):
            self._recent(key, now)
        for key in list(self._pending):
            self._pending_of(key, now)


class CallState:
    def __init__(
        self,
        redis: Redis,
        *,
        max_failures: int = 3,
        window_seconds: int = 15 * 60,
        lock_seconds: int = 15 * 60,
        resume_seconds: int = 30 * 60,
        pending_seconds: int = 2 * 60,
    ) -> None:
        self.redis = redis
        self.max_failures, self.window, self.lock_seconds = max_failures, window_seconds, lock_seconds
        # Longer than any PIN check takes, queue included: a pending attempt left by a server that
        # stopped in the middle of one stops counting after that.
        self.pending_seconds = pending_seconds
        self.resume_seconds = resume_seconds
        self.local = LocalLockouts(max_failures, window_seconds, lock_seconds, pending_seconds)
        self._begin_attempt = redis.register_script(_BEGIN_ATTEMPT)
        self._record_failure = redis.register_script(_RECORD_FAILURE)

    # --- lockouts ---

    @staticmethod
    def _lock_key(kind: str, who: str) -> str:
        return f"{KEY}:lock:{kind}:{who}"

    @staticmethod
    def _failures_key(kind: str, who: str) -> str:
        return f"{KEY}:pin-failures:{kind}:{who}"

    @staticmethod
    def _pending_key(kind: str, who: str) -> str:
        return f"{KEY}:pin-pending:{kind}:{who}"

    def _keys(self, attempt: PinAttempt) -> list[str]:
        return [key for kind, who in attempt.whos()
                for key in (self._failures_key(kind, who), self._pending_key(kind, who), self._lock_key(kind, who))]

    def locked_for(self, kind: str, who: str) -> int:
        """Seconds left on the lock of this bureau or caller id (0 when not locked), here or in Redis."""
        if kind == "caller" and who.lower() in ANONYMOUS:
            return 0
        local = self.local.locked_for(kind, who)
        try:
            ttl = self.redis.ttl(self._lock_key(kind, who))
        except RedisError as exc:
            log.warning("Redis unavailable for the %s lock (%s): this server's own lockouts hold", kind, exc)
            return local
        return max(0, local, int(ttl))

    def begin_pin_attempt(self, bureau: str, caller_id: str) -> PinAttempt:
        """Let a PIN attempt in before its PIN is checked, or refuse it (`refused`) because of a lock."""
        caller = "" if caller_id.lower() in ANONYMOUS else caller_id
        attempt = PinAttempt(bureau, caller, uuid.uuid4().hex)
        refused = self.local.refused(attempt)  # a lock taken while Redis was away outlives the outage
        if refused is not None:
            return PinAttempt(bureau, caller, attempt.token, refused)
        try:
            answer = int(self._begin_attempt(keys=self._keys(attempt), args=[
                time.time(), self.window, self.max_failures, self.pending_seconds, attempt.token]))
        except RedisError as exc:
            log.warning("Redis unavailable for the PIN lockout (%s): counted by this server alone", exc)
            refused = self.local.begin(attempt)
            return PinAttempt(bureau, caller, attempt.token, refused, in_redis=False)
        return PinAttempt(bureau, caller, attempt.token, KINDS[answer - 1] if answer else None)

    def pin_wrong(self, attempt: PinAttempt) -> list[str]:
        """Count a wrong PIN against the bureau and the caller id; what is now locked ("bureau", "caller")."""
        if attempt.in_redis:
            try:
                locked = self._record_failure(keys=self._keys(attempt), args=[
                    time.time(), self.window, self.max_failures, self.lock_seconds, attempt.token])
                return [KINDS[int(kind) - 1] for kind in locked]
            except RedisError as exc:
                log.warning("Redis unavailable to count a wrong PIN (%s): counted by this server alone", exc)
        return self.local.failed(attempt)

    def pin_right(self, attempt: PinAttempt) -> None:
        """The bureau's own failures are forgiven; a caller's are not (so one good PIN cannot reset probing)."""
        self.local.right(attempt)
        if not attempt.in_redis:
            return
        with self.redis.pipeline() as pipe:  # Redis away: the call flow goes on without it (nothing is at stake)
            pipe.delete(self._failures_key("bureau", attempt.bureau))
            for kind, who in attempt.whos():
                pipe.zrem(self._pending_key(kind, who), attempt.token)
            pipe.execute()

    # --- interrupted entries ---

    @staticmethod
    def _partial_key(election: str, bureau: str) -> str:
        return f"{KEY}:partial:{election}:{bureau}"

    def save_partial(self, election: str, bureau: str, counts: dict[str, int], caller_id: str, call_id: str) -> None:
        value: dict[str, Any] = {"counts": counts, "caller_id": caller_id, "call_id": call_id, "saved_at": time.time()}
        self.redis.set(self._partial_key(election, bureau), json.dumps(value), ex=self.resume_seconds)

    def load_partial(self, election: str, bureau: str) -> Partial | None:
        raw = self.redis.get(self._partial_key(election, bureau))
        if raw is None:
            return None
        value = json.loads(raw)
        counts = {str(k): int(v) for k, v in value.get("counts", {}).items()}
        return Partial(election, bureau, counts, value.get("caller_id", ""), value.get("call_id", ""),
                       float(value.get("saved_at", 0)))

    def clear_partial(self, election: str, bureau: str) -> None:
        self.redis.delete(self._partial_key(election, bureau))
