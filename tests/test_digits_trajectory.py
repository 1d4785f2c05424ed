"""Tests of the trajectory features and of reading an InkML box from its strokes and its image together."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pen_gateway.digits import data, synth, trajectory
from pen_gateway.digits.recognizer import RECOMMENDED_THRESHOLD, DigitRecognizer

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "handwriting"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "pendigits-dev.jsonl").exists(), reason=f"handwriting data not found at {DATA_DIR}"
)
SEVEN = [np.array([[10.0, 10.0], [50.0, 10.0], [25.0, 70.0]])]
FOUR = [np.array([[30.0, 0.0], [5.0, 40.0], [45.0, 40.0]]), np.array([[35.0, 20.0], [35.0, 70.0]])]


def test_features_ignore_units_position_and_sampling_rate() -> None:
    base = trajectory.features(SEVEN)
    assert base is not None and base.shape == (trajectory.FEATURES,)
    # The same 7 in centimetres elsewhere on the page, sampled ten times as often.
    dense = []
    for a, b in zip(SEVEN[0][:-1], SEVEN[0][1:], strict=True):
        dense += [a + (b - a) * t for t in np.linspace(0, 1, 10, endpoint=False)]
    moved = [(np.array([*dense, SEVEN[0][-1]]) + 500.0) / 10.0]
    assert np.allclose(trajectory.features(moved), base, atol=0.03)


def test_features_tell_ink_from_the_pens_jumps() -> None:
    one = trajectory.features(SEVEN)
    two = trajectory.features(FOUR)
    assert one is not None and two is not None
    pen = slice(2 * trajectory.POINTS, 3 * trajectory.POINTS)
    assert set(np.unique(one[pen])) == {1.0}
    assert 0.0 in two[pen] and 1.0 in two[pen]  # the lift between a 4's two strokes
    assert trajectory.features([]) is None
    assert trajectory.features([np.zeros((0, 2))]) is None


def test_strokes_must_match_the_cells() -> None:
    rec = DigitRecognizer()
    cell = np.full((105, 80), 255, np.uint8)
    with pytest.raises(ValueError):
        rec.read([cell, cell], borders=False, strokes=[[]])


@needs_data
@pytest.mark.skipif(not trajectory.available(), reason="no trajectory model shipped")
def test_held_out_pen_digits_read_from_strokes_and_image() -> None:
    _, heldout = data.split_pendigits(data.load_pendigits(DATA_DIR))
    sample = [heldout[i] for i in np.linspace(0, len(heldout) - 1, 300).astype(int)]
    rng = np.random.default_rng(5)
    cells = [synth.pen_cell(s.strokes, rng, synth.CLEAN) for s in sample]
    labels = np.array([s.label for s in sample])
    rec = DigitRecognizer()
    image_only = rec.read(cells, borders=False)
    both = rec.read(cells, borders=False, strokes=[list(s.strokes) for s in sample])
    pred = np.array([-1 if r.digit is None else r.digit for r in both])
    conf = np.array([r.confidence for r in both])
    image_pred = np.array([-1 if r.digit is None else r.digit for r in image_only])
    assert (pred == labels).mean() >= max(0.97, (image_pred == labels).mean() - 0.01)
    accepted = conf >= RECOMMENDED_THRESHOLD
    assert not (accepted & (pred != labels)).any()
    assert accepted.mean() >= 0.5
    # An empty box stays empty whatever strokes are claimed for it: emptiness is the image's call.
    blank = np.full((105, 80), 255, np.uint8)
    (r,) = rec.read([blank], borders=False, strokes=[[]])
    assert r.digit is None
