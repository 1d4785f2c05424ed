"""Boxes cut from whole forms (pen_gateway.digits.form_boxes): what the fits and the fine-tuning read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pen_gateway.digits import form_boxes
from pen_gateway.digits.recognizer import DigitRecognizer
from tests.filled_forms import needs_handwriting


@needs_handwriting
def test_harvested_training_boxes_are_the_networks_inputs_with_what_was_written(tmp_path: Path) -> None:
    out = tmp_path / "boxes.npz"
    n = form_boxes.harvest(3, 5, 1, out)
    with np.load(out) as z:
        x, y = z["x"], z["y"]
    assert x.shape == (n, 28, 28) and x.dtype == np.uint8 and y.shape == (n,)
    assert n > 3 * 2 * 9  # the written boxes of 6 forms, at least: the empty ones are left out
    assert set(np.unique(y)) <= set(range(11)) and len(np.unique(y)) >= 8
    # Each input goes with its own box's truth: read back by the shipped networks, nearly all agree.
    recognizer = DigitRecognizer(reliability=None)
    read = recognizer.logits(x[:, None].astype(np.float32) / 255.0).argmax(1)
    assert (read == y).mean() > 0.95


@needs_handwriting
def test_the_training_writers_fill_the_harvest_and_the_calibration_writers_the_fits() -> None:
    from tests.form_fill import load_handwriting

    sets = [load_handwriting(w) for w in ("training", "calibration", "held-out")]
    writers = [{i.split(" s")[0] for ids in hw.pen_ids.values() for i in ids} for hw in sets]
    assert writers[0] == {f"pendigits w{w}" for w in range(1, 21)}
    assert not writers[0] & writers[1] and not writers[0] & writers[2]
    images = [{i for ids in hw.mnist_ids.values() for i in ids} for hw in sets]
    assert max(int(i.split()[1]) for i in images[0]) == 3499
    assert not images[0] & images[1] and not images[0] & images[2]


def test_a_recording_keeps_only_what_it_is_asked_for() -> None:
    with pytest.raises(ValueError, match="nothing called"):
        form_boxes.Recording("pixels")
