"""Tests of the scans' second reader: strokes traced from a digit's picture (pen_gateway.digits.skeleton)
and the stroke network trained on them (traced.onnx), as the recognizer uses them for inset crops.

Real digits come from ``shared/data/handwriting`` (MNIST 4000-4999 and pendigits writers 25-30,
never trained nor tuned on); tests needing them skip with a message when the data is absent.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from pen_gateway.digits import evaluation, preprocess, synth
from pen_gateway.digits.recognizer import DigitRecognizer
from pen_gateway.digits.skeleton import SCALE, thin, trace, traced_strokes
from pen_gateway.digits.trajectory import CHANNELS, POINTS, TRACED_MODEL_PATH, TrajectoryModel
from tests.handwriting import DATA_DIR, needs_data

SAMPLE = 250  # held-out digits per source


def picture(*polylines: list[tuple[float, float]]) -> np.ndarray:
    """A 28 x 28 input (ink 1 on 0) with these polylines drawn 2 px wide, as preprocess.prepare would hand it."""
    img = np.zeros((28, 28), np.float32)
    for line in polylines:
        pts = np.round(np.array(line) * 16).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(img, [pts], False, 1.0, 2, cv2.LINE_AA, 4)
    return img


def test_thinning_leaves_a_connected_line_one_pixel_wide() -> None:
    bar = np.zeros((20, 50), bool)
    bar[7:13, 5:45] = True  # six pixels thick
    skeleton = thin(bar)
    assert skeleton.any() and not (skeleton & ~bar).any()  # only ink is kept
    columns = skeleton[:, 10:40].sum(axis=0)
    assert (columns == 1).all()  # one pixel wide along the bar
    assert cv2.connectedComponents(skeleton.astype(np.uint8), connectivity=8)[0] == 2  # one piece (and background)
    assert not thin(np.zeros((5, 5), bool)).any()


def test_a_seven_is_walked_from_its_top_left_along_the_bar_then_down() -> None:
    (strokes,) = traced_strokes(picture([(7, 6), (21, 6), (11, 23)])[None])
    assert len(strokes) == 1
    (s,) = strokes
    start, end = s[0] / SCALE, s[-1] / SCALE
    assert np.hypot(*(start - (7, 6))) < 2.5
    assert np.hypot(*(end - (11, 23))) < 2.5
    corner = int(np.argmin(np.hypot(*(s / SCALE - (21, 6)).T)))
    assert np.hypot(*(s[corner] / SCALE - (21, 6))) < 2.5 and 0 < corner < len(s) - 1  # the bar first, then down


def test_a_loop_is_one_stroke_from_its_top_heading_left_and_a_cross_two_straight_ones() -> None:
    ring = np.zeros((28, 28), np.float32)
    cv2.ellipse(ring, (14, 14), (6, 9), 0, 0, 360, 1.0, 2, cv2.LINE_AA)
    ((loop,),) = traced_strokes(ring[None])
    assert loop[0][1] == loop[:, 1].min()  # starts at the top
    assert loop[6][0] < loop[0][0]  # heading left, as a 0 is written
    assert np.hypot(*(loop[-1] - loop[0])) <= 2 * SCALE  # and comes back round
    (cross,) = traced_strokes(picture([(5, 5), (22, 22)], [(22, 5), (5, 22)])[None])
    assert len(cross) == 2  # straight on through the crossing, not turning into the other arm
    for s in cross:
        direction = (s[-1] - s[0]) / np.hypot(*(s[-1] - s[0]))
        deviation = np.abs((s[:, 0] - s[0, 0]) * direction[1] - (s[:, 1] - s[0, 1]) * direction[0])
        assert deviation.max() < 2 * SCALE
    assert traced_strokes(np.zeros((2, 28, 28), np.float32)) == [[], []]
    dot = np.zeros((28, 28), bool)
    dot[10, 10] = True
    assert trace(dot) == []  # a lone pixel is no stroke


def test_the_traced_model_loads_and_its_metadata_matches() -> None:
    meta = json.loads(TRACED_MODEL_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    assert (meta["input"]["channels"], meta["input"]["points"]) == (CHANNELS, POINTS)
    assert 0 < meta["weight"] <= 3
    assert TrajectoryModel(TRACED_MODEL_PATH).weight == meta["weight"]
    assert TrajectoryModel(TRACED_MODEL_PATH).logits([[np.array([[0.0, 0.0], [5.0, 9.0]])]]).shape == (1, 10)


@pytest.fixture(scope="module")
def heldout_crops() -> list[evaluation.EvalSet]:
    return evaluation.heldout_sets(DATA_DIR, conditions=(synth.CROP,), limit=SAMPLE, n_empty=0)


@needs_data
def test_the_traced_model_reads_held_out_scanned_digits(heldout_crops: list[evaluation.EvalSet]) -> None:
    model = TrajectoryModel(TRACED_MODEL_PATH)
    for s in heldout_crops:
        inputs, empty = preprocess.prepare_batch(s.cells, crop=s.crop)
        strokes = traced_strokes(inputs[~empty, 0])
        right = model.logits(strokes).argmax(1) == s.labels[~empty]
        assert right.mean() >= 0.92, s.name
        # Each picture is traced on its own: how many are thinned at once changes nothing.
        in_threes = traced_strokes(inputs[~empty, 0], chunk=3)
        assert [[p.tolist() for p in d] for d in in_threes] == [[p.tolist() for p in d] for d in strokes], s.name


@needs_data
def test_a_scanned_box_is_read_at_least_as_well_and_more_boxes_are_sure_none_wrongly(
    heldout_crops: list[evaluation.EvalSet],
) -> None:
    recognizer = DigitRecognizer()
    for s in heldout_crops:
        both = recognizer.read(s.cells, crop="inset")
        # The picture model alone, on the same inputs.
        inputs, _ = preprocess.prepare_batch(s.cells, crop="inset")
        alone = recognizer.probabilities(inputs, "inset")
        right_both = sum(r.digit == y for r, y in zip(both, s.labels, strict=True))
        assert right_both >= (alone.argmax(1) == s.labels).sum() - 1, s.name
        sure = [(r, y) for r, y in zip(both, s.labels, strict=True) if r.confidence >= 0.9999]
        assert len(sure) > (alone.max(1) >= 0.9999).sum(), s.name  # more boxes need no human
        assert all(r.digit == y for r, y in sure), s.name  # and none of them is wrong
    blank = np.full((100, 80), 255, np.uint8)
    (reading,) = recognizer.read([blank], crop="inset")
    assert reading.digit is None
