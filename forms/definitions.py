"""The election definitions under `forms/elections/`: loading, checking and the field order.

A definition is a TOML file. Its `[[counts]]` then `[[candidates]]`, in file order, are the
fields in the order the IVR asks them and the paper form prints them.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

DEFAULT_ELECTIONS_DIR = Path(__file__).resolve().parent / "elections"

# The general counts every form carries, in this order; the arithmetic in validation/ relies on them.
GENERAL_COUNTS = ("votants", "blancs_nuls", "exprimes")
_ID = re.compile(r"^[a-z][a-z0-9_]*$")
_ELECTION_ID = re.compile(r"^[a-z0-9][a-z0-9-]*$")


class ElectionDefinitionError(ValueError):
    """A definition file that cannot be used, with the file, the key and why."""

    def __init__(self, file: Path | str, key: str, why: str) -> None:
        super().__init__(f"{file}: {key}: {why}")
        self.file, self.key, self.why = str(file), key, why


@dataclass(frozen=True)
class CountField:
    """One count on the form: a general count or a candidate's votes."""

    id: str  # "votants", or the candidate id
    label: str  # printed on the paper form
    spoken: str  # said by the IVR: "le nombre de votants", "Martine Aubry"
    max_digits: int
    candidate: bool

    @property
    def max_value(self) -> int:
        return 10**self.max_digits - 1


@dataclass(frozen=True)
class Candidate:
    id: str
    ballot_name: str
    spoken_name: str


@dataclass(frozen=True)
class Election:
    id: str
    title: str
    spoken_title: str
    round: int
    date: str
    form_version: int
    candidates: tuple[Candidate, ...]
    fields: tuple[CountField, ...]  # general counts then candidates, in asking/printing order

    @property
    def candidate_ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.candidates)

    def field(self, field_id: str) -> CountField:
        for f in self.fields:
            if f.id == field_id:
                return f
        raise KeyError(field_id)


def _require(table: dict[str, Any], key: str, kind: type, file: Path, where: str) -> Any:
    if key not in table:
        raise ElectionDefinitionError(file, f"{where}{key}", "missing")
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ElectionDefinitionError(
            file, f"{where}{key}", f"must be {kind.__name__}, not {type(value).__name__}"
        )
    if kind is str and not value.strip():
        raise ElectionDefinitionError(file, f"{where}{key}", "must not be empty")
    return value


def _max_digits(table: dict[str, Any], file: Path, where: str) -> int:
    digits = _require(table, "max_digits", int, file, where)
    if not 1 <= digits <= 5:
        raise ElectionDefinitionError(file, f"{where}max_digits", "must be between 1 and 5")
    return digits


def parse_election(data: dict[str, Any], file: Path) -> Election:
    """Build an Election from parsed TOML, or say precisely what is wrong."""
    election_id = _require(data, "id", str, file, "")
    if not _ELECTION_ID.match(election_id):
        raise ElectionDefinitionError(file, "id", "lowercase letters, digits and dashes only")
    if file.suffix == ".toml" and file.stem != election_id:
        raise ElectionDefinitionError(file, "id", f"must equal the file name {file.stem!r}")
    counts = data.get("counts")
    if not isinstance(counts, list) or not counts:
        raise ElectionDefinitionError(file, "counts", "missing: a list of [[counts]] tables")
    raw_candidates = data.get("candidates")
    if not isinstance(raw_candidates, list) or not raw_candidates:
        raise ElectionDefinitionError(file, "candidates", "missing: a list of [[candidates]] tables")

    fields: list[CountField] = []
    for i, count in enumerate(counts):
        where = f"counts[{i}]."
        field_id = _require(count, "id", str, file, where)
        fields.append(
            CountField(
                id=field_id,
                label=_require(count, "label", str, file, where),
                spoken=_require(count, "spoken", str, file, where),
                max_digits=_max_digits(count, file, where),
                candidate=False,
            )
        )
    if tuple(f.id for f in fields) != GENERAL_COUNTS:
        raise ElectionDefinitionError(
            file, "counts", f"must be exactly {', '.join(GENERAL_COUNTS)}, in that order"
        )

    candidates: list[Candidate] = []
    for i, cand in enumerate(raw_candidates):
        where = f"candidates[{i}]."
        cand_id = _require(cand, "id", str, file, where)
        if not _ID.match(cand_id):
            raise ElectionDefinitionError(file, f"{where}id", "lowercase letters, digits, underscores")
        candidate = Candidate(
            id=cand_id,
            ballot_name=_require(cand, "ballot_name", str, file, where),
            spoken_name=_require(cand, "spoken_name", str, file, where),
        )
        candidates.append(candidate)
        fields.append(
            CountField(
                id=cand_id,
                label=candidate.ballot_name,
                spoken=candidate.spoken_name,
                max_digits=_max_digits(cand, file, where),
                candidate=True,
            )
        )
    from forms.layout import MAX_FIELDS  # the paper form's geometry, which itself imports this module

    if len(fields) > MAX_FIELDS:
        most = MAX_FIELDS - len(GENERAL_COUNTS)
        raise ElectionDefinitionError(
            file, "candidates", f"{len(raw_candidates)} candidates do not fit on the paper form: at most {most}"
        )
    ids = [f.id for f in fields]
    for field_id in ids:
        if ids.count(field_id) > 1:
            raise ElectionDefinitionError(file, "candidates", f"id {field_id!r} appears twice")

    round_ = _require(data, "round", int, file, "")
    if round_ not in (1, 2):
        raise ElectionDefinitionError(file, "round", "must be 1 or 2")
    return Election(
        id=election_id,
        title=_require(data, "title", str, file, ""),
        spoken_title=_require(data, "spoken_title", str, file, ""),
        round=round_,
        date=_require(data, "date", str, file, ""),
        form_version=_require(data, "form_version", int, file, ""),
        candidates=tuple(candidates),
        fields=tuple(fields),
    )


def load_election_file(path: Path) -> Election:
    try:
        raw = path.read_bytes()
        # utf-8-sig: Windows' Notepad starts a UTF-8 file with a byte-order mark, which is not TOML.
        data = tomllib.loads(raw.decode("utf-8-sig"))
    except OSError as exc:
        raise ElectionDefinitionError(path, "(file)", exc.strerror or str(exc)) from exc
    except UnicodeDecodeError as exc:  # an "ANSI" (cp1252) save: Ségolène's è is one byte
        line = raw[: exc.start].count(b"\n") + 1
        raise ElectionDefinitionError(path, "(encoding)", f"not UTF-8 text at line {line} (save it as UTF-8)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ElectionDefinitionError(path, "(syntax)", str(exc)) from exc
    return parse_election(data, path)


def available_elections(directory: Path = DEFAULT_ELECTIONS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


@cache
def load_election(election_id: str, directory: Path = DEFAULT_ELECTIONS_DIR) -> Election:
    """The election `election_id`, from `directory/<id>.toml`."""
    path = directory / f"{election_id}.toml"
    if not path.is_file():
        known = ", ".join(available_elections(directory)) or "none"
        raise ElectionDefinitionError(path, "id", f"no such election (known: {known})")
    return load_election_file(path)
