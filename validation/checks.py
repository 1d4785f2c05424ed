"""The checks on a return, like a linter: pure functions over plain data returning findings.

Each finding carries a reason code from DESIGN.md, the field it concerns, a French message a
supervisor or a caller can understand, and the figures behind it (for the IVR to say "by how
much", for the review UI to highlight, for the OCR to choose between readings).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from forms.definitions import Election
from validation.returns import Return


class Reason(StrEnum):
    UNKNOWN_BUREAU = "UNKNOWN_BUREAU"
    TOTAL_MISMATCH = "TOTAL_MISMATCH"
    SUM_MISMATCH = "SUM_MISMATCH"
    OVER_REGISTERED = "OVER_REGISTERED"
    LOW_CONFIDENCE = "LOW_CONFIDENCE"
    UNREADABLE = "UNREADABLE"
    CHANNEL_CONFLICT = "CHANNEL_CONFLICT"
    CORRECTION = "CORRECTION"
    DUPLICATE = "DUPLICATE"


@dataclass(frozen=True)
class Finding:
    code: Reason
    field: str | None
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"code": str(self.code), "field": self.field, "message": self.message, "details": dict(self.details)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        return cls(Reason(data["code"]), data.get("field"), data["message"], dict(data.get("details") or {}))


class RegisteredBureau(Protocol):
    inscrits: int | None


def check_counts(counts: Mapping[str, int | None], election: Election) -> list[Finding]:
    """Every field present, a whole number within the form's digits."""
    findings = []
    for f in election.fields:
        value = counts.get(f.id)
        if value is None:
            findings.append(Finding(Reason.UNREADABLE, f.id, f"{f.label} : valeur absente ou illisible"))
        elif value > f.max_value:
            findings.append(
                Finding(
                    Reason.UNREADABLE,
                    f.id,
                    f"{f.label} : {value} dépasse {f.max_digits} chiffres",
                    {"value": value, "max": f.max_value},
                )
            )
    return findings


def check_arithmetic(counts: Mapping[str, int | None], election: Election) -> list[Finding]:
    """blancs_nuls + exprimes == votants, and the candidates add up to exprimes; unknown values are skipped."""
    findings = []
    votants, blancs_nuls, exprimes = (counts.get(k) for k in ("votants", "blancs_nuls", "exprimes"))
    if votants is not None and blancs_nuls is not None and exprimes is not None:
        difference = blancs_nuls + exprimes - votants
        if difference:
            findings.append(
                Finding(
                    Reason.TOTAL_MISMATCH,
                    "votants",
                    f"blancs et nuls ({blancs_nuls}) + exprimés ({exprimes}) = {blancs_nuls + exprimes}, "
                    f"mais votants = {votants} (écart {difference:+d})",
                    {"votants": votants, "blancs_nuls": blancs_nuls, "exprimes": exprimes, "difference": difference},
                )
            )
    votes = [counts.get(c) for c in election.candidate_ids]
    if exprimes is not None and all(v is not None for v in votes):
        total = sum(v for v in votes if v is not None)
        difference = total - exprimes
        if difference:
            findings.append(
                Finding(
                    Reason.SUM_MISMATCH,
                    "exprimes",
                    f"la somme des voix des candidats ({total}) diffère des exprimés ({exprimes}) "
                    f"(écart {difference:+d})",
                    {"exprimes": exprimes, "candidates_sum": total, "difference": difference},
                )
            )
    return findings


def check_registry(ret: Return, bureau: RegisteredBureau | None) -> list[Finding]:
    if bureau is None:
        return [
            Finding(Reason.UNKNOWN_BUREAU, None, f"bureau {ret.bureau} inconnu du registre", {"bureau": ret.bureau})
        ]
    votants = ret.counts.get("votants")
    if bureau.inscrits is not None and votants is not None and votants > bureau.inscrits:
        return [
            Finding(
                Reason.OVER_REGISTERED,
                "votants",
                f"{votants} votants pour {bureau.inscrits} inscrits",
                {"votants": votants, "inscrits": bureau.inscrits},
            )
        ]
    return []


def check_return(ret: Return, election: Election, bureau: RegisteredBureau | None) -> list[Finding]:
    """All the checks that need only the return, its election and its registry entry."""
    if ret.election != election.id:
        raise ValueError(f"return for {ret.election} checked against {election.id}")
    return [*check_registry(ret, bureau), *check_counts(ret.counts, election), *check_arithmetic(ret.counts, election)]


def check_history(ret: Return, latest_accepted: Return | None, pending: Sequence[Return] = ()) -> list[Finding]:
    """Compare with what the bureau already sent: the latest accepted return and returns waiting in review
    (`pending`, the latest first).

    Identical figures are a DUPLICATE (answered idempotently). Different figures from a bureau
    that already has an accepted return are a CORRECTION from the same channel or after a
    supervisor's decision, a CHANNEL_CONFLICT from the other one; from a bureau whose figures
    all wait in review, the same against the latest of them: two sets of figures, and a human
    to say which holds (accepted alone, the second would be overwritten by the supervisor's
    decision on the first). A supervisor's return (it supersedes another) is the decision
    itself and is not compared.
    """
    if ret.supersedes is not None:
        return []
    for earlier in ([latest_accepted] if latest_accepted else []) + list(pending):
        if earlier.election == ret.election and dict(earlier.counts) == dict(ret.counts):
            return [
                Finding(
                    Reason.DUPLICATE, None, f"identique au retour {earlier.return_id}", {"return_id": earlier.return_id}
                )
            ]
    earlier = latest_accepted or (pending[0] if pending else None)
    if earlier is None:
        return []
    changed = sorted(k for k, v in ret.counts.items() if earlier.counts.get(k) != v)
    details = {"return_id": earlier.return_id, "channel": earlier.channel, "fields": changed}
    waiting = "" if earlier is latest_accepted else ", en attente de vérification"
    # A supervisor's return is the bureau's figures as decided, not a reporting channel: what differs from it,
    # by phone or by pen, corrects it.
    if earlier.channel in (ret.channel, "review"):
        before = ("un superviseur avait déjà arrêté les chiffres du bureau" if earlier.channel == "review"
                  else f"le bureau avait déjà transmis{waiting}")
        return [Finding(Reason.CORRECTION, None, f"{before} ({', '.join(changed)} diffèrent)", details)]
    state = "accepté" if earlier is latest_accepted else "en attente de vérification"
    return [
        Finding(
            Reason.CHANNEL_CONFLICT,
            None,
            f"diffère du retour {state} par {earlier.channel} ({', '.join(changed)})",
            details,
        )
    ]


def decide(findings: Iterable[Finding]) -> str:
    """The journal status: accepted with no finding, duplicate for an identical resubmission, else review.

    A resubmission identical to figures already accepted or already waiting in review is
    answered with the first one's fate, whatever else is found: they were judged once.
    """
    codes = {f.code for f in findings}
    if not codes:
        return "accepted"
    if Reason.DUPLICATE in codes:
        return "duplicate"
    return "review"


def suggest_single_digit_fixes(
    counts: Mapping[str, int | None], election: Election, fields: Iterable[str] | None = None
) -> list[tuple[str, int]]:
    """Every (field, value) that changes one digit of one field and makes all the sums hold.

    The form's arithmetic is a checksum: when exactly one such fix exists it is a strong
    suggestion for a reviewer, never a value to accept alone.
    """
    if check_counts(counts, election):
        return []
    candidates = []
    for f in election.fields:
        if fields is not None and f.id not in fields:
            continue
        text = f"{counts[f.id]:0{f.max_digits}d}"
        for pos in range(len(text)):
            for digit in "0123456789":
                if digit == text[pos]:
                    continue
                value = int(text[:pos] + digit + text[pos + 1 :])
                trial = {**counts, f.id: value}
                if not check_arithmetic(trial, election):
                    candidates.append((f.id, value))
    return candidates
