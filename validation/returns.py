"""The normalized return, `remontee.return/1`: the one shape both channels produce and the back office reads."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
from ulid import ULID

from forms.definitions import GENERAL_COUNTS, Election
from validation.normalize import parse_count

SCHEMA = "remontee.return/1"
CHANNELS = ("ivr", "pen", "review")
_JSON_SCHEMA = json.loads((Path(__file__).with_name("return.schema.json")).read_text(encoding="utf-8"))
_VALIDATOR = jsonschema.Draft202012Validator(_JSON_SCHEMA)


class ReturnSchemaError(ValueError):
    """A dict that is not a `remontee.return/1`; the message names the path and why."""


_last_id = ULID.from_int(0)
_id_lock = threading.Lock()


def new_return_id(after: str | None = None) -> str:
    """Unique and sortable by time of receipt: a ULID, monotonic within a process, and sorting after `after`.

    Monotonic as the ULID spec describes (same millisecond: previous + 1), so a correction made
    in this process always sorts after what it corrects, which consolidation relies on. A return
    made by another process sorts by that process's reading of the wall clock, which NTP may have
    stepped back since: a return that must sort after another one (a supervisor's, after the
    figures it replaces) names it as `after` and is then at least its id + 1.
    """
    global _last_id
    with _id_lock:
        fresh = ULID()
        floor = _last_id
        if after is not None:
            with contextlib.suppress(ValueError):  # not one of our ULIDs: nothing to sort after
                floor = max(floor, ULID.from_str(after), key=int)
        if fresh.milliseconds <= floor.milliseconds:
            fresh = ULID.from_int(int(floor) + 1)
        _last_id = fresh
        return str(fresh)


def utc_now(at: float | None = None) -> str:
    """The `received_at` form of now, or of the Unix time `at`."""
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Return:
    """One bureau's figures from one channel. A count is None when it could not be read."""

    return_id: str
    election: str
    bureau: str
    counts: Mapping[str, int | None]  # flat: general counts and candidate ids, in the form's order
    channel: str
    source: Mapping[str, str]
    received_at: str
    supersedes: str | None = None
    status: str = "accepted"
    candidate_ids: tuple[str, ...] = field(default=(), compare=False)

    def complete(self) -> bool:
        return all(v is not None for v in self.counts.values())

    def with_status(self, status: str) -> Return:
        return replace(self, status=status)

    def to_dict(self) -> dict[str, Any]:
        """The contract's JSON-compatible dict (nested `candidates`)."""
        return {
            "schema": SCHEMA,
            "return_id": self.return_id,
            "election": self.election,
            "bureau": self.bureau,
            "counts": {
                **{k: self.counts.get(k) for k in GENERAL_COUNTS},
                "candidates": {c: self.counts.get(c) for c in self.candidate_ids},
            },
            "channel": self.channel,
            "source": dict(self.source),
            "received_at": self.received_at,
            "supersedes": self.supersedes,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Return:
        """Check `data` against the JSON schema and build the Return, or raise ReturnSchemaError."""
        errors = sorted(_VALIDATOR.iter_errors(data), key=lambda e: list(e.absolute_path))
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "(top)"
            raise ReturnSchemaError(f"{where}: {first.message}")
        counts = data["counts"]
        candidates = counts["candidates"]
        return cls(
            return_id=data["return_id"],
            election=data["election"],
            bureau=data["bureau"],
            counts={**{k: counts[k] for k in GENERAL_COUNTS}, **candidates},
            channel=data["channel"],
            source=dict(data["source"]),
            received_at=data["received_at"],
            supersedes=data.get("supersedes"),
            status=data.get("status", "accepted"),
            candidate_ids=tuple(candidates),
        )


def new_return(
    election: Election,
    bureau: str,
    raw_counts: Mapping[str, object],
    channel: str,
    source: Mapping[str, str],
    *,
    supersedes: str | None = None,
    received_at: str | None = None,
    after: str | None = None,
) -> Return:
    """Normalize a channel's raw figures (keyed text, OCR text or ints) into a Return for `election`.

    Every field of the election is present; a missing or unparseable one is None, for the
    checks to report. Fields the election does not know are dropped here and never reach
    the queue. The return id sorts after `after` (see `new_return_id`).
    """
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    return Return(
        return_id=new_return_id(after),
        election=election.id,
        bureau=bureau,
        counts={f.id: parse_count(raw_counts.get(f.id)) for f in election.fields},
        channel=channel,
        source=dict(source),
        received_at=received_at or utc_now(),
        supersedes=supersedes,
        candidate_ids=election.candidate_ids,
    )
