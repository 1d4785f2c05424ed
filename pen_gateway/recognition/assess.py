"""From a page reading to a return and its findings: which bureau, which figures, and why a human must look.

The pen channel's own findings come on top of `validation.check_return`:
- `LOW_CONFIDENCE` for each field whose least confident box is under the recognizer's
  threshold (or that has an empty box between two digits), and for a bureau that only the
  printed text (not the QR) or a disagreeing upload says;
- `UNREADABLE` (field None) when the page could not be located or identified.
A return is accepted only with no finding at all: every sum holds and every box is confident.

When the sums fail, the form's arithmetic is a checksum: if exactly one change of one digit
(among the recognizer's alternatives for its unsure boxes, else any digit of the unsure
fields, else any digit) makes every sum hold, it becomes a suggestion for the reviewer. It
is never applied here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from forms.definitions import Election, load_election
from pen_gateway.recognition.pipeline import FieldReading, PageReading
from registry import Registry
from validation import Finding, Reason, Return, check_arithmetic, check_return, new_return, suggest_single_digit_fixes
from validation.normalize import normalize_bureau_code


@dataclass(frozen=True)
class UploadFacts:
    """What the upload row says about where the page comes from."""

    upload_id: str
    station_id: str
    pen_serial: str | None = None
    bureau: str | None = None  # as declared in the upload's form field


@dataclass
class Assessment:
    ret: Return | None  # None only when no bureau could be determined: nothing can be journaled
    findings: list[Finding] = field(default_factory=list)
    suggestions: list[tuple[str, int]] = field(default_factory=list)
    bureau: str | None = None
    bureau_from: str = "none"  # "qr", "text", "upload", "pen" or "none"
    problem: str | None = None


def resolve_bureau(
    reading: PageReading, facts: UploadFacts, registry: Registry | None
) -> tuple[str | None, str, list[Finding]]:
    """The bureau the page reports for, how we know it, and what casts doubt on it."""
    declared = normalize_bureau_code(facts.bureau) if facts.bureau else None
    by_pen = None
    if facts.pen_serial and registry is not None:
        entry = registry.bureau_for_pen(facts.pen_serial)
        by_pen = entry.code if entry else None
    witnesses = {w for w in (declared, by_pen) if w}
    findings: list[Finding] = []
    if reading.identity is not None:
        bureau, how = reading.identity.bureau, reading.identified_by
        disagreeing = sorted(w for w in witnesses if w != bureau)
        if disagreeing:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, None,
                f"le formulaire porte le bureau {bureau}, l'envoi indique {', '.join(disagreeing)}",
                {"form": bureau, "upload": declared, "pen": by_pen},
            ))
        elif how == "text" and bureau not in witnesses:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, None,
                f"QR illisible : bureau {bureau} lu sur le texte imprimé, sans confirmation",
                {"form": bureau},
            ))
        return bureau, how, findings
    if declared:
        bureau, how = declared, "upload"
    elif by_pen:
        bureau, how = by_pen, "pen"
    else:
        return None, "none", findings
    if declared and by_pen and declared != by_pen:
        findings.append(Finding(
            Reason.LOW_CONFIDENCE, None,
            f"l'envoi indique le bureau {declared}, le stylo {facts.pen_serial} est enregistré au bureau {by_pen}",
            {"upload": declared, "pen": by_pen},
        ))
    if reading.kind == "image":
        findings.append(Finding(
            Reason.LOW_CONFIDENCE, None,
            f"QR et texte d'identification illisibles : bureau {bureau} pris de l'envoi",
            {"upload": declared, "pen": by_pen},
        ))
    return bureau, how, findings


def confidence_findings(reading: PageReading, election: Election, threshold: float) -> list[Finding]:
    findings = []
    for f in election.fields:
        fr = reading.fields.get(f.id)
        if fr is None or fr.value is None:
            continue  # check_return says UNREADABLE for it
        if fr.confidence < threshold:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, f.id,
                f"{f.label} : lecture incertaine ({fr.value}, confiance {fr.confidence:.3f})",
                {"value": fr.value, "confidence": round(fr.confidence, 6), "threshold": threshold},
            ))
        elif fr.gap:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, f.id, f"{f.label} : case vide au milieu du nombre ({fr.value})",
                {"value": fr.value},
            ))
    return findings


def _with_box(reading: FieldReading, index: int, digit: int | None) -> int | None:
    boxes = [d.digit for d in reading.digits]
    boxes[index] = digit
    text = "".join(str(d) for d in boxes if d is not None)
    return int(text) if text else None


def suggest_fixes(
    counts: Mapping[str, int | None], reading: PageReading, election: Election, threshold: float
) -> list[tuple[str, int]]:
    """The one single-digit change that makes every sum hold, if there is exactly one; else nothing."""
    if any(v is None for v in counts.values()) or not check_arithmetic(counts, election):
        return []
    unsure = [fr for fr in reading.fields.values() if fr.confidence < threshold]
    # First the recognizer's own second thoughts on its unsure boxes.
    fixes: set[tuple[str, int]] = set()
    for fr in unsure:
        for i, d in enumerate(fr.digits):
            if d.confidence >= threshold:
                continue
            for alternative, _p in d.alternatives:
                if alternative == d.digit:
                    continue
                value = _with_box(fr, i, alternative)
                if value is not None and not check_arithmetic({**counts, fr.field_id: value}, election):
                    fixes.add((fr.field_id, value))
    if fixes:
        return sorted(fixes) if len(fixes) == 1 else []
    # Then any digit of the unsure fields, or of any field when the model was sure (a slip of the pen).
    candidates = suggest_single_digit_fixes(counts, election, fields=[fr.field_id for fr in unsure] or None)
    return candidates if len(candidates) == 1 else []


def assess(
    reading: PageReading, facts: UploadFacts, registry: Registry | None, configured_election: str, threshold: float
) -> Assessment:
    """The return to journal for this page, the findings that send it to review, and the reviewer's suggestion."""
    bureau, how, findings = resolve_bureau(reading, facts, registry)
    problem = reading.problem
    if bureau is None:
        problem = problem or "bureau introuvable : ni QR lisible, ni bureau dans l'envoi, ni stylo enregistré"
        return Assessment(None, findings, [], None, how, problem)
    election = reading.election
    if election is None:
        # The page was not located or its election is unknown: journal it as the configured election's, unread.
        election = load_election(configured_election)
    source = {"upload_id": facts.upload_id, "station_id": facts.station_id}
    if facts.pen_serial:
        source["pen_serial"] = facts.pen_serial
    raw = {fid: fr.value for fid, fr in reading.fields.items()}
    ret = new_return(election, bureau, raw, "pen", source)
    entry = registry.get(bureau) if registry is not None else None
    if problem:
        findings.append(Finding(Reason.UNREADABLE, None, problem))
    if election.id != configured_election:
        findings.append(Finding(
            Reason.UNREADABLE, None,
            f"formulaire de l'élection {election.id}, or l'élection en cours est {configured_election}",
            {"form": election.id, "configured": configured_election},
        ))
    findings.extend(check_return(ret, election, entry))
    findings.extend(confidence_findings(reading, election, threshold))
    suggestions = suggest_fixes(ret.counts, reading, election, threshold) if not problem else []
    return Assessment(ret, findings, suggestions, bureau, how, problem)
