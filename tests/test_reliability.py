"""The reliability map (pen_gateway.digits.reliability): what a channel's confidences are worth on whole forms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pen_gateway.digits import fit_reliability
from pen_gateway.digits.recognizer import MODEL_PATH, DigitRecognizer, readings
from pen_gateway.digits.reliability import RELIABILITY_PATH, Knots, ReliabilityMap, load_reliability, odds_against
from pen_gateway.digits.strokes import render_strokes
from tests.filled_forms import needs_handwriting


def _probs(*rows: dict[int, float]) -> np.ndarray:
    """Class probabilities (N, 11) from {class: p}; what is left is spread over the other classes."""
    out = np.zeros((len(rows), 11))
    for i, row in enumerate(rows):
        rest = [k for k in range(11) if k not in row]
        out[i, rest] = (1.0 - sum(row.values())) / len(rest)
        for k, p in row.items():
            out[i, k] = p
    return out


KNOTS = Knots((-8.0, -3.0, -1.0), (1.0, 2.0, 1.5))


def test_the_odds_against_a_reading_are_multiplied_as_the_knots_say() -> None:
    rmap = ReliabilityMap({"inset": KNOTS})
    probs = _probs({1: 1 / (1 + np.exp(-3.0)) - 1e-9, 7: 1 / (1 + np.exp(3.0))})  # log-odds -3: a knot
    mapped = rmap.apply(probs, "inset", np.array([True]))
    assert odds_against(mapped)[0] == pytest.approx(-3.0 + np.log(2.0), abs=1e-6)
    # Between knots: linear in log-odds and log multiplier; past the end knots: the end multiplier.
    between = _probs({4: 1 / (1 + np.exp(-2.0)), 9: 1 - 1 / (1 + np.exp(-2.0))})
    assert odds_against(rmap.apply(between, "inset", np.array([True])))[0] == pytest.approx(
        -2.0 + np.log(2.0) + 0.5 * np.log(1.5 / 2.0), abs=1e-6)
    sure = _probs({3: 1 - 1e-6})
    assert rmap.apply(sure, "inset", np.array([True]))[0, 3] == pytest.approx(1 - 1e-6)


def test_the_map_keeps_the_reading_and_the_order_of_its_alternatives() -> None:
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.full(11, 0.1), size=2000)
    digit = probs.argmax(axis=1) != 10
    mapped = ReliabilityMap({"ink": KNOTS}).apply(probs, "ink", digit)
    assert np.array_equal(mapped.argmax(axis=1), probs.argmax(axis=1))
    assert np.array_equal(np.argsort(-mapped[digit], axis=1, kind="stable")[:, :4],
                          np.argsort(-probs[digit], axis=1, kind="stable")[:, :4])
    assert np.all(mapped.max(axis=1) <= probs.max(axis=1) + 1e-12)  # never surer than the models said
    assert np.allclose(mapped.sum(axis=1), 1.0)
    # A surer reading stays surer: the map keeps the order of confidences between boxes (below about 0.7,
    # where the runner-up may cap a box's multiplier, what is read matters more than that order).
    clear = digit & (probs.max(axis=1) >= 0.7)
    order = np.argsort(probs[clear].max(axis=1))
    assert clear.sum() > 300
    assert np.all(np.diff(mapped[clear].max(axis=1)[order]) >= -1e-12)
    # Boxes read as empty, and crop kinds the map does not name, are left as they are.
    assert np.array_equal(mapped[~digit], probs[~digit])
    assert ReliabilityMap({"ink": KNOTS}).apply(probs, "inset", digit) is probs


def test_knots_that_would_make_a_reading_surer_or_reorder_confidences_are_refused() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Knots((-5.0, -1.0), (0.5, 1.0))
    with pytest.raises(ValueError, match="reorder"):
        Knots((-3.0, -2.5), (3.0, 1.0))  # log-odds -3 + log 3 > -2.5 + 0


def test_the_fit_raises_only_bands_whose_readings_were_wrong_more_often_than_they_said() -> None:
    rng = np.random.default_rng(9)
    n = 4000
    confidence = rng.choice([0.8, 0.95, 0.999999], size=n)
    read = rng.integers(0, 10, n)
    probs = np.zeros((n, 11))
    probs[np.arange(n), read] = confidence
    probs[np.arange(n), (read + 1) % 10] = 1.0 - confidence
    # Boxes read at 0.8 are wrong 40 % of the time (the models said 20 %); the others as often as they said.
    wrong_share = np.where(confidence == 0.8, 0.4, 1.0 - confidence)
    truth = np.where(rng.random(n) < wrong_share, (read + 1) % 10, read)
    knots = fit_reliability.fit_knots(probs, np.ones(n, bool), truth)
    by_band = dict(zip(np.round(-np.asarray(knots.log_odds), 1), knots.multiplier, strict=True))
    assert by_band[round(float(np.log(0.8 / 0.2)), 1)] == pytest.approx((0.4 / 0.2) * 1.0, rel=0.15)
    assert by_band[round(float(np.log(0.95 / 0.05)), 1)] == pytest.approx(1.0, abs=0.25)
    assert by_band[round(float(np.log(0.999999 / 1e-6)), 1)] == 1.0


def test_the_shipped_map_names_both_channels_and_is_its_recorded_fit() -> None:
    meta = json.loads(RELIABILITY_PATH.read_text(encoding="utf-8"))
    rmap = load_reliability(RELIABILITY_PATH)
    assert set(rmap.channels) == {"ink", "inset"}
    assert "calibration writers (pendigits 21-24, MNIST 3500-3999)" in meta["rule"]
    # Each knot is the rule applied to the band it stands for, in the fit's recorded figures (boxes read wrong and
    # expected wrong on the calibration writers' forms), raised only where a less likely reading would come out surer.
    for channel, knots in rmap.channels.items():
        bands = [b for b in meta["figures (calibration writers' forms)"][channel]["bands before"] if b["boxes"]]
        ratios = [(b["wrong"] + fit_reliability.SHRINKAGE) / (b["expected_wrong"] + fit_reliability.SHRINKAGE)
                  for b in reversed(bands)]  # surest band first, as the knots go
        assert len(ratios) == len(knots.multiplier), channel
        for k, (ratio, multiplier) in enumerate(zip(ratios, knots.multiplier, strict=True)):
            raised = k and np.log(multiplier) == pytest.approx(
                np.log(knots.multiplier[k - 1]) - (knots.log_odds[k] - knots.log_odds[k - 1]), abs=1e-3)
            assert multiplier == pytest.approx(max(1.0, ratio), abs=1e-4) or raised, (channel, k)
        # Where the forms showed more errors than the confidences said, the map makes the readings less sure.
        assert max(knots.multiplier) > 1.2, channel


@needs_handwriting
def test_the_scans_temperature_is_fitted_on_scanned_forms_and_written_beside_the_rest(tmp_path: Path) -> None:
    shipped = json.loads(MODEL_PATH.with_suffix(".json").read_text(encoding="utf-8"))
    path = tmp_path / "digits.json"
    path.write_text(json.dumps(shipped), encoding="utf-8")
    temperature = fit_reliability.fit_scan_temperature(6, 7, 1, path)
    meta = json.loads(path.read_text(encoding="utf-8"))
    assert meta["crop_temperatures"] == {"inset": round(temperature, 5)}
    assert [(k, v) for k, v in meta.items() if not k.startswith("crop_temperatures")] == [
        (k, v) for k, v in shipped.items() if not k.startswith("crop_temperatures")]
    figures = meta["crop_temperatures_figures"]["inset"]
    assert figures["boxes"] > 6 * 2 * 9  # the written boxes of 12 forms, at least
    assert figures["nll at its own"] <= figures["nll at the ensemble's temperature"]


def test_the_recognizer_reads_the_same_digits_with_the_map_and_is_never_surer(tmp_path: Path) -> None:
    cells = [render_strokes([[(22, 25), (58, 25), (36, 85)]], (80, 105), 6.0, smooth=False),
             render_strokes([[(40, 20), (40, 90)]], (80, 105), 6.0, smooth=False),
             render_strokes([[(25, 30), (55, 30), (55, 60), (25, 60), (25, 90), (55, 90)]], (80, 105), 6.0,
                            smooth=False)]
    with_map, without = DigitRecognizer(), DigitRecognizer(reliability=None)
    for crop in ("ink", "inset"):
        a, b = with_map.read(cells, crop=crop), without.read(cells, crop=crop)
        assert [r.digit for r in a] == [r.digit for r in b]
        assert all(x.confidence <= y.confidence + 1e-12 for x, y in zip(a, b, strict=True))
        probs, empty = without.beliefs(cells, crop=crop)
        assert [r.confidence for r in readings(probs, empty)] == [r.confidence for r in b]
    # The recognizer reads through the map it is given: odds against every reading ten times the models'.
    (tmp_path / "tenfold.json").write_text(json.dumps({"channels": {"ink": {"log_odds": [0.0], "multiplier": [10.0]}}}))
    tenfold = DigitRecognizer(reliability=tmp_path / "tenfold.json").read(cells, crop="ink")
    models = without.read(cells, crop="ink")
    for x, y in zip(tenfold, models, strict=True):
        assert x.digit == y.digit is not None
        assert x.confidence < y.confidence
        if 10 * y.alternatives[0][1] < y.confidence:  # else the runner-up caps the multiplier
            assert np.log((1 - x.confidence) / x.confidence) == pytest.approx(
                np.log((1 - y.confidence) / y.confidence) + np.log(10.0), abs=1e-3)
    assert sum(10 * y.alternatives[0][1] < y.confidence for y in models) >= 2
