"""The reference consolidation job (the default `REMONTEE_CONSOLIDATE_JOB`) and the totals it keeps.

It keeps, per election in Redis, the latest accepted return of each bureau and running totals.
One Lua script applies a return atomically, so a job run twice, or two workers racing, count
it once; an older return arriving after a newer one for the same bureau changes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from redis import Redis
from rq import get_current_job

_APPLY = """
local latest, totals, applied = KEYS[1], KEYS[2], KEYS[3]
local return_id, bureau, payload = ARGV[1], ARGV[2], ARGV[3]
if redis.call('SADD', applied, return_id) == 0 then return 0 end
local previous = redis.call('HGET', latest, bureau)
local new = cjson.decode(payload)
if previous then
  local old = cjson.decode(previous)
  if old['return_id'] > return_id then return 0 end
  for k, v in pairs(old['counts']) do redis.call('HINCRBY', totals, k, -v) end
else
  redis.call('HINCRBY', totals, 'bureaux', 1)
end
for k, v in pairs(new['counts']) do redis.call('HINCRBY', totals, k, v) end
redis.call('HSET', latest, bureau, payload)
return 1
"""


def _keys(election: str) -> list[str]:
    base = f"remontee:consolidation:{election}"
    return [f"{base}:latest", f"{base}:totals", f"{base}:applied"]


def _flat_counts(ret: dict[str, Any]) -> dict[str, int]:
    counts = ret["counts"]
    flat = {k: int(counts[k]) for k in ("votants", "blancs_nuls", "exprimes")}
    flat.update({f"candidate:{k}": int(v) for k, v in counts["candidates"].items()})
    return flat


def apply_return(redis: Redis, ret: dict[str, Any]) -> bool:
    """Count `ret` into its election's totals; False if it was already counted or is older than the bureau's."""
    payload = json.dumps({"return_id": ret["return_id"], "counts": _flat_counts(ret), "return": ret})
    script = redis.register_script(_APPLY)
    return bool(script(keys=_keys(ret["election"]), args=[ret["return_id"], ret["bureau"], payload]))


def consolidate(ret: dict[str, Any]) -> bool:
    """The RQ job: one accepted `remontee.return/1` dict."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("consolidate runs as an RQ job (use apply_return directly otherwise)")
    return apply_return(job.connection, ret)


def totals(redis: Redis, election: str) -> dict[str, Any]:
    """The consolidated figures: general counts, votes per candidate, bureaux reported."""
    raw = {k.decode(): int(v) for k, v in redis.hgetall(_keys(election)[1]).items()}
    return {
        "bureaux": raw.get("bureaux", 0),
        "votants": raw.get("votants", 0),
        "blancs_nuls": raw.get("blancs_nuls", 0),
        "exprimes": raw.get("exprimes", 0),
        "candidates": {k.removeprefix("candidate:"): v for k, v in raw.items() if k.startswith("candidate:")},
    }


def latest_returns(redis: Redis, election: str) -> dict[str, dict[str, Any]]:
    """The latest consolidated return of every bureau that reported."""
    return {
        k.decode(): json.loads(v)["return"] for k, v in redis.hgetall(_keys(election)[0]).items()
    }
