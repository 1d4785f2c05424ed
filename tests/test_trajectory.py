"""Tests of the stroke-order digit model (pen_gateway.digits.trajectory) and of its part in reading ink.

Real pen digits come from ``shared/data/handwriting`` (pendigits writers 25-30, never trained
on); tests needing them skip with a message when the data is absent.
"""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest

from pen_gateway.digits import data, evaluation, synth
from pen_gateway.digits.recognizer import DigitRecognizer
from pen_gateway.digits.trajectory import CHANNELS, MODEL_PATH, POINTS, TrajectoryModel, combine, features
from tests.handwriting import DATA_DIR, needs_data

SAMPLE = 300  # held-out digits, spread over the six writers


@pytest.fixture(scope="module")
def heldout() -> list[data.PenSample]:
    _, val = data.split_pendigits(data.load_pendigits(DATA_DIR))
    return [val[i] for i in np.linspace(0, len(val) - 1, SAMPLE).astype(int)]


def test_the_model_loads_in_cv2_dnn_and_its_metadata_matches() -> None:
    meta = json.loads(MODEL_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    assert (meta["input"]["channels"], meta["input"]["points"]) == (CHANNELS, POINTS)
    assert 0 < meta["weight"] <= 3
    net = cv2.dnn.readNetFromONNX(str(MODEL_PATH))
    net.setInput(np.zeros((4, CHANNELS, 1, POINTS), np.float32))
    assert np.array(net.forward()).reshape(4, -1).shape == (4, 10)


def test_features_ignore_where_the_digit_is_its_size_and_the_pens_sampling_rate() -> None:
    seven = [np.array([[0.0, 0.0], [10.0, 0.0], [4.0, 15.0]]), np.array([[3.0, 8.0], [8.0, 8.0]])]
    f = features(seven)
    assert f.shape == (CHANNELS, POINTS) and f.dtype == np.float32
    moved = [s * 0.1 + (120.0, 40.0) for s in seven]  # tablet units to millimetres, elsewhere on the page
    np.testing.assert_allclose(features(moved), f, atol=1e-5)
    dense = [np.vstack([np.linspace(a, b, 9)[:-1] for a, b in itertools.pairwise(s)] + [s[-1:]]) for s in seven]
    np.testing.assert_allclose(features(dense), f, atol=1e-5)  # the same path, sampled 8 times as often
    # The bar of the 7 is a second stroke: the pen lifts once, where the first one ends.
    lifts = np.flatnonzero(f[4])
    assert len(lifts) == 1
    np.testing.assert_allclose(f[:2, lifts[0]], [-0.13, 1.0], atol=0.08)  # near the 7's foot: bottom of the box
    assert not features([]).any()
    assert np.isfinite(features([np.array([[5.0, 5.0]])])).all()  # a single dot


@needs_data
def test_the_stroke_model_reads_held_out_writers(heldout: list[data.PenSample]) -> None:
    logits = TrajectoryModel().logits([s.strokes for s in heldout])
    labels = np.array([s.label for s in heldout])
    assert (logits.argmax(1) == labels).mean() >= 0.97
    # Written backwards (each stroke reversed), a digit is still mostly read: a president's 9
    # drawn from its foot must not look like anything else with confidence.
    backwards = TrajectoryModel().logits([[s[::-1] for s in d.strokes] for d in heldout])
    assert (backwards.argmax(1) == labels).mean() >= 0.9


def test_combining_changes_only_which_digit_not_whether_the_box_is_empty() -> None:
    image = np.array([[0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.45, 0.0, 0.0, 0.5]])
    image[0, :10] += 1e-6
    image /= image.sum()
    strokes_say_seven = np.full((1, 10), -5.0)
    strokes_say_seven[0, 7] = 5.0
    out = combine(image, strokes_say_seven, 1.0, 10)
    assert out.sum() == pytest.approx(1.0)
    assert out[0, 10] == pytest.approx(image[0, 10])
    assert out[0, 7] > image[0, 7] and out[0, 0] < image[0, 0]
    np.testing.assert_allclose(combine(image, strokes_say_seven, 0.0, 10), image)


@needs_data
def test_with_its_strokes_an_ink_box_is_read_at_least_as_well_and_no_worse_calibrated(
    heldout: list[data.PenSample],
) -> None:
    rng = np.random.default_rng(5)
    cells = [synth.pen_cell(s.strokes, rng, synth.CLEAN) for s in heldout]
    labels = np.array([s.label for s in heldout])
    recognizer = DigitRecognizer()
    alone = recognizer.read(cells, crop="ink")
    both = recognizer.read(cells, crop="ink", strokes=[s.strokes for s in heldout])
    right_alone = sum(r.digit == y for r, y in zip(alone, labels, strict=True))
    right_both = sum(r.digit == y for r, y in zip(both, labels, strict=True))
    assert right_both >= right_alone - 1
    trusted = [s.id not in evaluation.KNOWN_LABEL_ERRORS for s in heldout]
    sure = [(r, y) for r, y, t in zip(both, labels, trusted, strict=True) if t and r.confidence >= 0.9999]
    assert len(sure) > sum(r.confidence >= 0.9999 for r in alone)  # more boxes need no human
    assert all(r.digit == y for r, y in sure)  # and none of them is wrong
    # An empty box stays the picture model's call, strokes or none.
    blank = np.full((120, 100), 255, np.uint8)
    (reading,) = recognizer.read([blank], crop="ink", strokes=[[]])
    assert reading.digit is None
    with pytest.raises(ValueError):
        recognizer.read(cells[:2], crop="ink", strokes=[heldout[0].strokes])
