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
- A call that drops keeps the counts entered so far for 30 minutes; the bureau calling back is
  offered to resume.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from redis import Redis

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

    def whos(self) -> list[tuple[str, str]]:
        return [("bureau", self.bureau)] + ([("caller", self.caller_id)] if self.caller_id else [])


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
        """Seconds left on the lock of this bureau or caller id (0 when not locked)."""
        if kind == "caller" and who.lower() in ANONYMOUS:
            return 0
        ttl = self.redis.ttl(self._lock_key(kind, who))
        return max(0, int(ttl))

    def begin_pin_attempt(self, bureau: str, caller_id: str) -> PinAttempt:
        """Let a PIN attempt in before its PIN is checked, or refuse it (`refused`) because of a lock."""
        caller = "" if caller_id.lower() in ANONYMOUS else caller_id
        attempt = PinAttempt(bureau, caller, uuid.uuid4().hex)
        answer = int(self._begin_attempt(keys=self._keys(attempt), args=[
            time.time(), self.window, self.max_failures, self.pending_seconds, attempt.token]))
        return PinAttempt(bureau, caller, attempt.token, KINDS[answer - 1] if answer else None)

    def pin_wrong(self, attempt: PinAttempt) -> list[str]:
        """Count a wrong PIN against the bureau and the caller id; what is now locked ("bureau", "caller")."""
        locked = self._record_failure(keys=self._keys(attempt), args=[
            time.time(), self.window, self.max_failures, self.lock_seconds, attempt.token])
        return [KINDS[int(kind) - 1] for kind in locked]

    def pin_right(self, attempt: PinAttempt) -> None:
        """The bureau's own failures are forgiven; a caller's are not (so one good PIN cannot reset probing)."""
        with self.redis.pipeline() as pipe:
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
