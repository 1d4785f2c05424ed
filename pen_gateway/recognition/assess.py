"""From a page reading to a return and its findings: which bureau, which figures, and why a human must look.

The pen channel's own findings come on top of `validation.check_return`:
- `LOW_CONFIDENCE` for each field that may have been read wrong: the probability of its
  reading, with the form's sums as evidence, is under `FIELD_BAR` (or it has an empty box
  between two digits, or pen ink written elsewhere runs through its boxes: struck out?); and
  for a bureau that only the printed text (not the QR) or a disagreeing upload says;
- `UNREADABLE` (field None) when the page could not be located or identified.
A return is accepted only with no finding at all: every sum holds and every digit is confident.

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
from validation import (
    Finding,
    Reason,
    Return,
    check_arithmetic,
    check_return,
    new_return,
    suggest_single_digit_fixes,
    utc_now,
)
from validation.normalize import normalize_bureau_code


@dataclass(frozen=True)
class UploadFacts:
    """What the upload row says about where the page comes from."""

    upload_id: str
    station_id: str
    pen_serial: str | None = None
    bureau: str | None = None  # as declared in the upload's form field
    received_at: float | None = None  # when the gateway acknowledged the upload: the return's received_at


@dataclass
class Assessment:
    ret: Return | None  # None only when no bureau could be determined: nothing can be journaled
    findings: list[Finding] = field(default_factory=list)
    suggestions: list[tuple[str, int]] = field(default_factory=list)
    bureau: str | None = None
    bureau_from: str = "none"  # "qr", "text", "upload", "pen" or "none"
    problem: str | None = None
    confidences: dict[str, float] = field(default_factory=dict)  # per field, with the form's sums as evidence


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


# A field is accepted when the probability that it was read wrong, given the digit model's
# calibrated beliefs and the form's sums, is under 1 in 10,000: the pen channel's policy,
# checked by bench/ocr_accuracy.py (no wrong value accepted on writers never trained on). The
# model's own threshold (digits.json, "recommended_threshold") is a figure about single boxes
# with no sums to check them: the lowest at which no calibration box was wrong, one step up. It
# moves with one odd calibration digit (a looped 3 cut by its crop took it from 0.9999 to
# 0.99999), which is no reason to doubt a form whose sums hold; here it marks the unsure boxes
# whose alternatives the reviewer is offered.
FIELD_BAR = 0.9999
# The prior odds that the president wrote one specific inconsistent form rather than the consistent
# one we read: slips on 10 % of forms (bench/ocr_accuracy.py writes that many), in one of ~12
# candidate digits, 9 wrong values each, about 1e-3. It weighs the recognizer's confidences as they
# come out of its reliability map (pen_gateway/digits/reliability.py): the models' own, fitted on
# single crops, can understate how often a box cut from a form is wrong. Taken at their word with a
# prior of 2e-4, when they understated it on scans from 0.7 to 0.99, a president's 7 written for a
# 1 and read as the 1 at 0.93 made the sums hold and was accepted (BENCHMARKS.md, tenth session).
SLIP_PRIOR = 1e-3
NEGLIGIBLE = 1e-9  # an alternative reading less likely than this, relative to the one read, weighs nothing
# The odds that a president pads a count with a leading zero ("045" for 45) rather than writing the
# number: nobody does, the form asks for a number, not a fixed-width code. One in a hundred, to be safe.
# A reading that would need it (a 6 read where a 0 could stand first) is weighed that much lower.
LEADING_ZERO_PRIOR = 1e-2


@dataclass(frozen=True)
class _Change:
    """Reading `digit` in one box instead of what was read, and what that does to the form's two sums."""

    field_id: str
    ratio: float  # p(alternative) / p(what was read), times LEADING_ZERO_PRIOR if it would write one
    sums: tuple[int, int] | None  # change of (blancs + exprimes - votants, candidates - exprimes); None: emptied
    # The value it gives could be a true count: at most the bureau's inscrits (when the registry knows them).
    possible: bool = True


def _sum_coefficients(field_id: str, election: Election) -> tuple[int, int]:
    """How a field enters the form's two sums (validation.check_arithmetic): total, then candidates."""
    if field_id == "votants":
        return (-1, 0)
    if field_id == "blancs_nuls":
        return (1, 0)
    if field_id == "exprimes":
        return (1, -1)
    return (0, 1) if field_id in election.candidate_ids else (0, 0)


def _changes(
    reading: PageReading, election: Election, inscrits: int | None
) -> tuple[list[_Change], dict[str, float]]:
    """Every alternative the recognizer gave for every box, and per field the probability mass it left out."""
    changes, left_out = [], dict.fromkeys(reading.fields, 0.0)
    for fr in reading.fields.values():
        coefficients = _sum_coefficients(fr.field_id, election)
        written = sum(d.digit is not None for d in fr.digits)
        for i, d in enumerate(fr.digits):
            p0 = max(float(d.confidence), 1e-12)
            others = [(a, float(p)) for a, p in d.alternatives if a != d.digit and p > 0]
            # What the top alternatives leave out (a digit read where the box may be empty) is counted
            # as a change that breaks a sum: it stands only with a slip, conservatively.
            left_out[fr.field_id] += max(0.0, 1.0 - p0 - sum(p for _, p in others)) / p0
            for digit, p in others:
                value = _with_box(fr, i, digit)
                if value is None or fr.value is None:
                    sums = None
                else:
                    delta = value - fr.value
                    sums = (coefficients[0] * delta, coefficients[1] * delta)
                padded = value is not None and written > 1 and len(str(value)) < written
                possible = value is None or inscrits is None or value <= inscrits
                changes.append(_Change(fr.field_id, p / p0 * (LEADING_ZERO_PRIOR if padded else 1.0), sums, possible))
    return changes, left_out


def checked_confidences(
    counts: Mapping[str, int | None], reading: PageReading, election: Election, inscrits: int | None = None
) -> dict[str, float]:
    """Each field's probability of being read right, given the digit model's beliefs and the form's sums.

    The form's arithmetic is a checksum. When the figures read make every sum hold, the other
    readings the model thought possible are weighed against the one read: a reading that
    changes one box breaks a sum, so it stands only if the president slipped (SLIP_PRIOR);
    two or three changes in different fields that keep the sums holding (the same misread in
    votants and exprimes, two candidates off by opposite amounts) are weighed at full odds, unless
    one of them gives a count above the bureau's `inscrits`, which no true count can be. A
    reading that would make a number start with 0 is weighed by LEADING_ZERO_PRIOR. A
    field's confidence is the posterior share of the readings that leave it as read (the
    probabilities are the recognizer's calibrated ones), to be held against `FIELD_BAR`. When
    the sums do not hold, a field's confidence is its least confident box.
    """
    raw = {fid: fr.confidence for fid, fr in reading.fields.items()}
    if not raw or any(v is None for v in counts.values()) or check_arithmetic(counts, election):
        return raw
    return confidences_if_sums_hold(reading, election, inscrits)


def confidences_if_sums_hold(reading: PageReading, election: Election, inscrits: int | None = None) -> dict[str, float]:
    """`checked_confidences` of a reading whose figures make every sum hold, without checking that they do.

    Also what bench/ocr_accuracy.py weighs a misread with: had the president slipped to the digit
    that was misread, the same reading would make every sum hold (the slip undone), and be
    accepted if these confidences pass `FIELD_BAR`.
    """
    raw = {fid: fr.confidence for fid, fr in reading.fields.items()}
    changes, left_out = _changes(reading, election, inscrits)
    against = dict.fromkeys(raw, 0.0)
    total = 1.0  # the reading itself; every weight is relative to it
    spread = sum(c.ratio for c in changes) + sum(left_out.values())
    for field_id in raw:
        mine = sum(c.ratio for c in changes if c.field_id == field_id) + left_out[field_id]
        # Changes that break a sum need a slip: one change alone, and (bounded from above) any
        # set of several that does not add up either.
        weight = SLIP_PRIOR * mine * (1.0 + spread)
        against[field_id] += weight
        total += weight
    # Sets of changes in different fields that keep both sums holding, each to a count the bureau can have (no
    # slip needed): found through their effect on the sums.
    by_effect: dict[tuple[int, int], list[int]] = {}
    for k, c in enumerate(changes):
        if c.sums is not None and c.possible:
            by_effect.setdefault(c.sums, []).append(k)
    likely = [k for k, c in enumerate(changes) if c.sums is not None and c.possible and c.ratio >= NEGLIGIBLE]
    for a_pos, a in enumerate(likely):
        ca = changes[a]
        for b in likely[a_pos + 1 :]:
            cb = changes[b]
            if cb.field_id == ca.field_id or ca.ratio * cb.ratio < NEGLIGIBLE:
                continue
            assert ca.sums is not None and cb.sums is not None
            pair = (ca.sums[0] + cb.sums[0], ca.sums[1] + cb.sums[1])
            if pair == (0, 0):
                weight = ca.ratio * cb.ratio
                total += weight
                against[ca.field_id] += weight
                against[cb.field_id] += weight
                continue
            for c in by_effect.get((-pair[0], -pair[1]), ()):
                cc = changes[c]
                if c > b and cc.field_id not in (ca.field_id, cb.field_id):
                    weight = ca.ratio * cb.ratio * cc.ratio
                    total += weight
                    for field_id in (ca.field_id, cb.field_id, cc.field_id):
                        against[field_id] += weight
    return {fid: max(0.0, 1.0 - against[fid] / total) for fid in raw}


def confidence_findings(
    reading: PageReading, election: Election, checked: Mapping[str, float]
) -> list[Finding]:
    findings = []
    for f in election.fields:
        fr = reading.fields.get(f.id)
        if fr is None or fr.value is None:
            continue  # check_return says UNREADABLE for it
        if checked[f.id] < FIELD_BAR:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, f.id,
                f"{f.label} : lecture incertaine ({fr.value}, confiance {checked[f.id]:.4f})",
                {"value": fr.value, "confidence": round(checked[f.id], 6), "least_sure_box": round(fr.confidence, 6),
                 "threshold": FIELD_BAR},
            ))
        elif f.id in reading.crossed:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, f.id, f"{f.label} : un trait traverse les cases (chiffres barrés ?)",
                {"value": fr.value},
            ))
        elif f.id in reading.stray:
            findings.append(Finding(
                Reason.LOW_CONFIDENCE, f.id,
                f"{f.label} : de l'encre à côté des cases ({fr.value} lu dans les cases ; un chiffre en trop ?)",
                {"value": fr.value},
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
    # Then any digit of the unsure fields; then of any field (the model was right, the president slipped).
    for fields in ([fr.field_id for fr in unsure], None):
        if fields == []:
            continue
        candidates = suggest_single_digit_fixes(counts, election, fields=fields)
        if candidates:
            return candidates if len(candidates) == 1 else []
    return []


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
    # Received when the station was answered 202, not when a worker got to read it (minutes later in a backlog).
    received_at = utc_now(facts.received_at) if facts.received_at is not None else None
    ret = new_return(election, bureau, raw, "pen", source, received_at=received_at)
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
    checked = checked_confidences(
        {fid: fr.value for fid, fr in reading.fields.items()}, reading, election, entry.inscrits if entry else None
    )
    findings.extend(confidence_findings(reading, election, checked))
    suggestions = suggest_fixes(ret.counts, reading, election, threshold) if not problem else []
    return Assessment(ret, findings, suggestions, bureau, how, problem, checked)
