"""bench/ocr_accuracy.py's `slip_undo`: the odds that a misread undoes a president's slip and passes.

The benchmark is a script, not a package: it is loaded from its file. Its readings here are made up (the
boxes and confidences of tests/test_recognition.py); the decision they go through is the real one.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from forms import Election
from tests.form_fill import written_digits
from tests.test_recognition import CONSISTENT, Box, _reading

BENCH = Path(__file__).resolve().parents[1] / "bench" / "ocr_accuracy.py"


@pytest.fixture(scope="module")
def ocr_accuracy():
    spec = importlib.util.spec_from_file_location("ocr_accuracy", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _written(values: dict[str, int]) -> dict[str, list[int | None]]:
    return {fid: written_digits(value, 4) for fid, value in values.items()}


def test_a_lone_misread_that_would_pass_as_an_undone_slip_is_counted(ocr_accuracy, election_t1: Election) -> None:
    written = _written(CONSISTENT)
    samples = {fid: [None if d is None else f"{fid} {i}" for i, d in enumerate(boxes)]
               for fid, boxes in written.items()}
    tally = ocr_accuracy.Tally()
    # Aubry's 120 read as 170, sure of its 7: had the president meant 170 and slipped to 120, it would pass.
    sure = _reading(election_t1, {**CONSISTENT, "aubry": 170}, {("aubry", 2): Box(7, 0.99, ((2, 0.009),))})
    ocr_accuracy.note_lone_misread(tally, sure, written, samples, election_t1, 900)
    # The same misread, unsure of its 7: it would be held.
    unsure = _reading(election_t1, {**CONSISTENT, "aubry": 170}, {("aubry", 2): Box(7, 0.9, ((2, 0.095),))})
    ocr_accuracy.note_lone_misread(tally, unsure, written, samples, election_t1, 900)
    # Two misreads: no undone slip looks like that.
    twice = _reading(election_t1, {**CONSISTENT, "aubry": 170, "royal": 80}, {})
    ocr_accuracy.note_lone_misread(tally, twice, written, samples, election_t1, 900)
    assert tally.lone_misreads == 2
    assert tally.passing == {(2, 7): 1}
    assert tally.passing_samples == {"aubry 2 (2→7)": 1}
    # The candidates' digits, counted on every form: 120, 10, 160, 60, 30, 25, three times.
    assert tally.candidate_boxes[0] == 3 * 5 and tally.candidate_boxes[2] == 3 * 2
    # Where a slip lands: one candidate in six, one digit of its figure (Aubry's 2 is one of three).
    assert tally.slip_lands_on[2] == pytest.approx(3 * (1 / 18 + 1 / 12))


def test_the_odds_weigh_each_passing_misread_by_the_digits_a_slip_meets(ocr_accuracy) -> None:
    tally = ocr_accuracy.Tally(consistent=10, erroneous=4)
    tally.candidate_boxes.update({7: 20, 1: 40})
    tally.slip_lands_on.update({1: 3.0, 7: 0.5})
    tally.passing[(7, 1)] = 2  # two of the twenty 7s read as 1, and passing: a slip from 1 to 7 undone
    per_slip = 3.0 / 10 / 9 * 2 / 20  # P(the slip lands on a 1), writes a 7 one time in nine, read back as 1
    figures = tally.slip_undo()
    assert figures["expected_wrong_accepted_per_10000_slips"] == round(1e4 * per_slip, 2)
    assert figures["expected_wrong_accepted_on_this_run"] == round(4 * per_slip, 4)
