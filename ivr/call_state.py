"""What the phone channel keeps in Redis across calls: PIN lockouts and interrupted entries.

Blocking (redis-py): the call flow calls these methods in a thread. redis-py rather than the
Twisted client txredisapi because the rest of Remontée (relay, RQ, consolidation) already uses
it, its connection pool is thread-safe, and the handful of Redis calls per phone call cost less
in a thread than a second client library to keep up to date.

- Three wrong PINs for a bureau within 15 minutes lock the bureau for 15 minutes, across every
  call and every server; the same for a caller id. The failures are a sorted set of
  timestamps (a sliding window), counted and locked by one Lua script, so two servers cannot
  both see "two failures" and let a fourth try through.
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
_RECORD_FAILURE = """
local failures, lock = KEYS[1], KEYS[2]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local max_failures, lock_seconds = tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', failures, '-inf', now - window)
redis.call('ZADD', failures, now, ARGV[5])
redis.call('EXPIRE', failures, math.ceil(window))
local count = redis.call('ZCARD', failures)
if count >= max_failures then
  redis.call('SET', lock, now, 'EX', lock_seconds)
  redis.call('DEL', failures)
end
return count
"""
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


class CallState:
    def __init__(
        self,
        redis: Redis,
        *,
        max_failures: int = 3,
        window_seconds: int = 15 * 60,
        lock_seconds: int = 15 * 60,
        resume_seconds: int = 30 * 60,
    ) -> None:
        self.redis = redis
        self.max_failures, self.window, self.lock_seconds = max_failures, window_seconds, lock_seconds
        self.resume_seconds = resume_seconds
        self._record_failure = redis.register_script(_RECORD_FAILURE)

    # --- lockouts ---

    @staticmethod
    def _lock_key(kind: str, who: str) -> str:
        return f"{KEY}:lock:{kind}:{who}"

    @staticmethod
    def _failures_key(kind: str, who: str) -> str:
        return f"{KEY}:pin-failures:{kind}:{who}"

    def locked_for(self, kind: str, who: str) -> int:
        """Seconds left on the lock of this bureau or caller id (0 when not locked)."""
        if kind == "caller" and who.lower() in ANONYMOUS:
            return 0
        ttl = self.redis.ttl(self._lock_key(kind, who))
        return max(0, int(ttl))

    def record_pin_failure(self, bureau: str, caller_id: str) -> list[str]:
        """Count a wrong PIN against the bureau and the caller id; what is now locked ("bureau", "caller")."""
        now, locked = time.time(), []
        whos = [("bureau", bureau)] + ([("caller", caller_id)] if caller_id.lower() not in ANONYMOUS else [])
        for kind, who in whos:
            count = self._record_failure(
                keys=[self._failures_key(kind, who), self._lock_key(kind, who)],
                args=[now, self.window, self.max_failures, self.lock_seconds, f"{now}:{uuid.uuid4().hex}"],
            )
            if int(count) >= self.max_failures:
                locked.append(kind)
        return locked

    def pin_accepted(self, bureau: str) -> None:
        """The bureau's own failures are forgiven; a caller's are not (so one good PIN cannot reset probing)."""
        self.redis.delete(self._failures_key("bureau", bureau))

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
