#!/usr/bin/env python3
"""OCR accuracy and speed on forms filled with real held-out handwriting, through the whole pipeline.

Each form gets a bureau's figures (sums consistent; `--error-share` of them with one digit
deliberately wrong, as a president's slip), written in the boxes right-aligned (a fifth
left-aligned) by pendigits writers 25-30 or MNIST images 4000-4999, which the digit model
never trained on (nor was anything fitted on them: the recognizer's reliability map was fitted on
forms of the calibration writers, `pen_gateway.digits.fit_reliability`). Three modes:
- `inkml`: the strokes as the InkML a docking station uploads;
- `scan-pen`: the same strokes printed into the 300 dpi form, then scanned: rotation ±5°,
  scale 90-110 %, offset, grey paper, noise, blur, JPEG 45-90;
- `scan-mnist`: MNIST's scanned digits pasted into the form, then scanned the same way.
Every upload goes decode → locate → identify → cut → read → validate → the reviewer's artefacts
(no Redis, no journal: the decision is the findings' — an upload with none is accepted).

Figures: digit accuracy (written boxes), empty-box accuracy, field accuracy, straight-through
share of consistent forms (with its 95 % interval), wrong values accepted without a human (must
be 0), suggestions that restore the true figure on the deliberately wrong forms, forms per
second on one core, and the reliability of the confidences: written boxes read as a digit, by the
confidence of their reading, [read wrong, expected wrong (the sum of 1 - confidence), boxes]
(`--without-reliability-map`: the models' own confidences, before the recognizer's map); and what
holds the forms read entirely right: the held-out samples in the least sure box of their unsure
fields, by the number of such forms each held (with the lowest and highest confidence it was read at).

A wrong value is accepted when a misread undoes the president's slip: the misread makes the sums
hold. Such a form is rare (about one in ten thousand slips, BENCHMARKS.md), so the count of wrong
values accepted says little about the odds of one. `slip_undo` measures them on the consistent
forms, many more: a form with one box misread (a candidate's digit w read as r) is what a slip from
r to w, undone by the same misread, would look like, and `assess.confidences_if_sums_hold` says
whether that reading would pass. A slip changes one digit of one candidate (its figure, then its
digit, at random) from r to one of the other nine, w: it is undone and accepted when the president's
w is read as r and passes. Per slip, that is about the sum over (w, r) of the chance that the slip
lands on an r, over 9, times the share of the boxes written w that were misread as r alone and would
pass (`Tally.slip_undo`).

    .venv/bin/python bench/ocr_accuracy.py [--forms 200] [--modes inkml,scan-pen,scan-mnist]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from forms import Election, load_election  # noqa: E402
from pen_gateway.decode import decode_upload  # noqa: E402
from pen_gateway.digits.fit_reliability import bands  # noqa: E402
from pen_gateway.recognition.assess import (  # noqa: E402
    FIELD_BAR,
    Assessment,
    UploadFacts,
    assess,
    confidences_if_sums_hold,
)
from pen_gateway.recognition.job import write_artefacts  # noqa: E402
from pen_gateway.recognition.pipeline import PageReading, read_page  # noqa: E402
from registry import load_registry  # noqa: E402
from registry.demo import generate  # noqa: E402
from tests.form_fill import (  # noqa: E402
    break_one_digit,
    consistent_counts,
    filled_upload,
    handwriting_available,
    load_handwriting,
)


@dataclass
class Tally:
    forms: int = 0
    consistent: int = 0
    accepted_consistent: int = 0
    read_right_consistent: int = 0  # consistent forms read entirely right: what could go straight through
    accepted_read_right: int = 0
    erroneous: int = 0
    accepted_erroneous: int = 0
    suggestion_restores: int = 0
    wrong_accepted: int = 0
    digits: int = 0
    digits_right: int = 0
    empties: int = 0
    empties_right: int = 0
    fields: int = 0
    fields_right: int = 0
    seconds_cpu: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)
    confusions: Counter[str] = field(default_factory=Counter)
    # Written boxes read as a digit: the confidence of their reading, and whether it is right.
    confidences: list[float] = field(default_factory=list)
    rights: list[bool] = field(default_factory=list)
    # Consistent forms read entirely right yet held: per held-out sample, the confidence of its box
    # each time it was the least sure box of a field held as unsure.
    held_by: dict[str, list[float]] = field(default_factory=dict)
    # The consistent forms' candidates' boxes: how many were written with each digit, and the chance that the
    # bench's slip lands on a box written so (summed over the forms); their lone misreads, digit for digit (what
    # an undone slip looks like), and those that would pass, by (written, read) and by the held-out sample.
    candidate_boxes: Counter[int] = field(default_factory=Counter)
    slip_lands_on: dict[int, float] = field(default_factory=lambda: dict.fromkeys(range(10), 0.0))
    lone_misreads: int = 0
    passing: Counter[tuple[int, int]] = field(default_factory=Counter)
    passing_samples: Counter[str] = field(default_factory=Counter)

    def slip_undo(self) -> dict[str, object]:
        """A slip from r to w (w drawn among the nine other digits) is undone and passes when the president's w
        is read as r and passes: per slip, the sum over (w, r) of P(the slip's box holds r) / 9 times the share of
        boxes written w that were misread as r and would pass."""
        per_slip = sum(self.slip_lands_on[r] / self.consistent / 9 * n / self.candidate_boxes[w]
                       for (w, r), n in self.passing.items())
        return {
            "lone_candidate_misreads": self.lone_misreads,
            "would_pass_as_an_undone_slip": dict(self.passing_samples.most_common()),
            "expected_wrong_accepted_per_10000_slips": round(1e4 * per_slip, 2),
            "expected_wrong_accepted_on_this_run": round(per_slip * self.erroneous, 4),
        }

    def report(self) -> dict[str, object]:
        def pct(a: int, b: int) -> float | None:
            return round(100.0 * a / b, 2) if b else None

        def interval(a: int, b: int) -> list[float] | None:
            """Wilson's 95 % interval, in %, counting forms as independent: they are not quite (the held-out
            samples recur from form to form), so the true uncertainty is somewhat wider."""
            if not b:
                return None
            z, share = 1.96, a / b
            centre = (share + z * z / (2 * b)) / (1 + z * z / b)
            half = z * math.sqrt(share * (1 - share) / b + z * z / (4 * b * b)) / (1 + z * z / b)
            return [round(100.0 * (centre - half), 1), round(100.0 * (centre + half), 1)]

        return {
            "forms": self.forms,
            "digit_accuracy_pct": pct(self.digits_right, self.digits),
            "empty_box_accuracy_pct": pct(self.empties_right, self.empties),
            "field_accuracy_pct": pct(self.fields_right, self.fields),
            "straight_through_pct": pct(self.accepted_consistent, self.consistent),
            "straight_through_95pct_interval": interval(self.accepted_consistent, self.consistent),
            "read_entirely_right_pct": pct(self.read_right_consistent, self.consistent),
            "straight_through_of_read_right_pct": pct(self.accepted_read_right, self.read_right_consistent),
            "wrong_values_accepted": self.wrong_accepted,
            "slip_undo": self.slip_undo(),
            "erroneous_forms": self.erroneous,
            "erroneous_accepted": self.accepted_erroneous,
            "suggestion_restores_pct": pct(self.suggestion_restores, self.erroneous),
            "forms_per_second_per_core": round(self.forms / self.seconds_cpu, 2) if self.seconds_cpu else None,
            "review_reasons": dict(self.reasons.most_common()),
            "top_confusions": dict(self.confusions.most_common(8)),
            # What holds the forms read right: [right forms held, lowest and highest confidence of its box].
            "right_forms_held_by": {
                sample: [len(c), round(min(c), 3), round(max(c), 3)]
                for sample, c in sorted(self.held_by.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:12]
            },
            # By the reliability map's bands (its fit's figures): [read wrong, expected wrong, boxes].
            "reliability_wrong_expected_boxes": {
                f"{b['band'][0]}-{b['band'][1]}": [b["wrong"], b["expected_wrong"], b["boxes"]]
                for b in bands(np.array(self.confidences), np.array(self.rights, dtype=bool))
            },
        }


def run(mode: str, n: int, seed: int, error_share: float, recognizer: object, threshold: float,
        registry_path: Path, election_id: str, artefacts_dir: Path) -> Tally:
    election = load_election(election_id)
    registry = load_registry(registry_path)
    bureaux = sorted(registry.bureaux.values(), key=lambda b: b.code)
    hw = load_handwriting()
    rng = np.random.default_rng(seed)
    tally = Tally()
    fields = [f.id for f in election.fields]
    for i in range(n):
        bureau = bureaux[i % len(bureaux)]
        truth = consistent_counts(election, rng, inscrits=bureau.inscrits)
        restored_field = None
        if rng.random() < error_share:
            written_counts, restored_field = break_one_digit(truth, election, rng)
        else:
            written_counts = truth
        align = "left" if rng.random() < 0.2 else "right"
        drawn: list[str] = []
        data, content_type, written = filled_upload(
            mode, election, bureau.code, written_counts, replace(hw, drawn=drawn), rng, align=align
        )
        # A docking station names the bureau with an InkML upload; a scan's is read from the page.
        facts = UploadFacts(f"bench{i}", "bench-station", None, bureau.code if mode == "inkml" else None)
        started = time.process_time()
        reading = read_page(decode_upload(data, content_type), recognizer, election_id)  # type: ignore[arg-type]
        outcome = assess(reading, facts, registry, election_id, threshold)
        write_artefacts(artefacts_dir, f"{mode.replace('-', '')}{i}", reading, outcome, threshold)
        tally.seconds_cpu += time.process_time() - started

        tally.forms += 1
        accepted = outcome.ret is not None and not outcome.findings
        values_right = True
        for f in election.fields:
            fr = reading.fields.get(f.id)
            truth_value = written_counts[f.id]
            tally.fields += 1
            if fr is not None and fr.value == truth_value:
                tally.fields_right += 1
            else:
                values_right = False
            boxes = written[f.id]
            got = [(d.digit, float(d.confidence)) for d in fr.digits] if fr is not None else [(None, 0.0)] * len(boxes)
            for want, (have, confidence) in zip(boxes, got, strict=True):
                if want is None:
                    tally.empties += 1
                    tally.empties_right += have is None
                else:
                    tally.digits += 1
                    tally.digits_right += have == want
                    if have != want:
                        tally.confusions[f"{want}→{'empty' if have is None else have}"] += 1
                    if have is not None:
                        tally.confidences.append(confidence)
                        tally.rights.append(have == want)
        if restored_field is None:
            tally.consistent += 1
            tally.accepted_consistent += accepted
            tally.read_right_consistent += values_right
            tally.accepted_read_right += accepted and values_right
            samples = samples_by_box(written, drawn, fields)
            if values_right and not accepted:
                note_held(tally, reading, outcome, samples)
            note_lone_misread(tally, reading, written, samples, election, bureau.inscrits)
        else:
            tally.erroneous += 1
            tally.accepted_erroneous += accepted
            if outcome.suggestions == [(restored_field, truth[restored_field])]:
                tally.suggestion_restores += 1
        if accepted and not values_right:
            tally.wrong_accepted += 1
        if not accepted:
            tally.reasons.update({str(f.code) for f in outcome.findings})
    return tally


def samples_by_box(
    written: dict[str, list[int | None]], drawn: list[str], fields: list[str]
) -> dict[str, list[str | None]]:
    """Each box's held-out sample (None: left empty), from the samples named in writing order."""
    names = iter(drawn)
    return {fid: [None if d is None else next(names) for d in written[fid]] for fid in fields}


def note_held(tally: Tally, reading: PageReading, outcome: Assessment, samples: dict[str, list[str | None]]) -> None:
    """A form read right but held: the sample in the least sure box of each field held as unsure."""
    for finding in outcome.findings:
        fr = reading.fields.get(finding.field) if finding.field else None
        if fr is None or "least_sure_box" not in (finding.details or {}):
            continue
        named = samples[fr.field_id]
        boxes = [(d.confidence, d.digit, named[i]) for i, d in enumerate(fr.digits) if d.digit is not None]
        confidence, digit, sample = min(boxes, key=lambda b: b[0])
        if sample is not None:
            tally.held_by.setdefault(f"{sample} ({digit})", []).append(float(confidence))


def note_lone_misread(
    tally: Tally, reading: PageReading, written: dict[str, list[int | None]], samples: dict[str, list[str | None]],
    election: Election, inscrits: int,
) -> None:
    """A consistent form: its candidates' digits, where a slip may land (one candidate of them all, then one digit of
    its figure, as `break_one_digit` picks); and, if exactly one box is misread, a candidate's digit as another
    that could stand there, whether that reading would pass had the president slipped to the digit read wrong and
    the misread undone it (see the module's docstring)."""
    for fid in election.candidate_ids:
        figure = [d for d in written[fid] if d is not None]
        for d in figure:
            tally.candidate_boxes[d] += 1
            tally.slip_lands_on[d] += 1.0 / (len(election.candidate_ids) * len(figure))
    wrong = [(fid, i) for fid, boxes in written.items() for i, want in enumerate(boxes)
             if (fr := reading.fields.get(fid)) is None or fr.digits[i].digit != want]
    if len(wrong) != 1:
        return
    (fid, i), = wrong
    want, have = written[fid][i], reading.fields[fid].digits[i].digit
    if fid not in election.candidate_ids or want is None or have is None:
        return
    tally.lone_misreads += 1
    if have == 0 and all(d is None for d in written[fid][:i]) and sum(d is not None for d in written[fid]) > 1:
        return  # no figure the president meant starts with 0
    if min(confidences_if_sums_hold(reading, election, inscrits).values()) >= FIELD_BAR:
        tally.passing[(want, have)] += 1
        tally.passing_samples[f"{samples[fid][i]} ({want}→{have})"] += 1


def tesseract_second_opinion(recognizer: object, cells: int, seed: int) -> dict[str, object]:
    """How often Tesseract reads a held-out handwritten box right: is it worth asking on unsure boxes?"""
    import pytesseract

    from pen_gateway.digits.synth import SCAN, pen_cell

    hw = load_handwriting()
    rng = np.random.default_rng(seed)
    right = 0
    started = time.perf_counter()
    for _ in range(cells):
        digit = int(rng.integers(10))
        cell = pen_cell(list(hw.pen_digit(digit, rng)), rng, SCAN)
        big = cv2.copyMakeBorder(cv2.resize(cell, None, fx=1.5, fy=1.5), 30, 30, 30, 30, cv2.BORDER_CONSTANT,
                                 value=255)
        text = pytesseract.image_to_string(big, config="--psm 10 -c tessedit_char_whitelist=0123456789").strip()
        right += text == str(digit)
    return {"cells": cells, "accuracy_pct": round(100.0 * right / cells, 1),
            "seconds_per_box": round((time.perf_counter() - started) / cells, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", type=int, default=200, help="forms per mode (default 200)")
    parser.add_argument("--modes", default="inkml,scan-pen,scan-mnist")
    parser.add_argument("--error-share", type=float, default=0.1, help="forms with a deliberate one-digit error")
    parser.add_argument("--seed", type=int, default=2011)
    parser.add_argument("--election", default="primaire-2011-t1")
    parser.add_argument("--tesseract-cells", type=int, default=100,
                        help="held-out boxes for the Tesseract second-opinion check (0: skip)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--without-reliability-map", action="store_true",
                        help="read with the models' own confidences (what the reliability map corrects)")
    args = parser.parse_args()
    if not handwriting_available():
        print("the handwriting data (../shared/data/handwriting) is not there: nothing to measure", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)  # figures per core
    from pen_gateway.digits.recognizer import RECOMMENDED_THRESHOLD, DigitRecognizer

    recognizer = DigitRecognizer(reliability=None) if args.without_reliability_map else DigitRecognizer()
    figures: dict[str, object] = {"threshold": RECOMMENDED_THRESHOLD,
                                  "reliability_map": not args.without_reliability_map}
    with tempfile.TemporaryDirectory() as tmp:
        registry_path = Path(tmp) / "registry.csv"
        generate(60, registry_path, Path(tmp) / "pins.csv", scrypt_n=2**8)
        for k, mode in enumerate(args.modes.split(",")):
            tally = run(mode, args.forms, args.seed + k, args.error_share, recognizer, RECOMMENDED_THRESHOLD,
                        registry_path, args.election, Path(tmp) / "var")
            figures[mode] = tally.report()
            print(f"\n== {mode}: {args.forms} forms ==")
            for key, value in figures[mode].items():  # type: ignore[union-attr]
                print(f"  {key:<28} {value}")
    if args.tesseract_cells:
        figures["tesseract_on_handwritten_boxes"] = tesseract_second_opinion(recognizer, args.tesseract_cells,
                                                                            args.seed)
        print(f"\n== Tesseract on held-out handwritten boxes ==\n  {figures['tesseract_on_handwritten_boxes']}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
