"""Fit the recognizer's reliability map on whole forms of the calibration writers (fitting time only).

This module owns the recipe of ``reliability.json``. The digit models are calibrated on single
crops (``digits.json``'s temperature, the stroke models' weights), but a box cut from a whole form
is not such a crop: a scan is rotated, rescaled, blurred and JPEG-compressed before its boxes are
cut through the fitted homography, and the confidences the models give such boxes are not what
the crops promised (BENCHMARKS.md: on scans, boxes read at 0.7-0.99 were once wrong up to 5.5
times as often as they said; the map shipped on 2026-12-06 was fitted where those read at 0.7-0.9
were wrong 1.6 times as often, on InkML 2.7 times). The decision (``recognition/assess.py``)
weighs each reading by those confidences, so they must be honest where they are used.

The map (``reliability.py``), per channel (the crop kind the pipeline reads with: ``"ink"`` for
InkML, ``"inset"`` for scans), multiplies the odds against a box's reading by what forms bear out.
Boxes read as a digit are put in bands by their confidence (`BANDS`). In each band, the multiplier
is (boxes read wrong + α) / (wrong readings the confidences expect + α), at least 1, with α = 2
expected errors of shrinkage towards 1, so that a band with few errors stays as it is. It sits at
the band's mean log-odds. The boxes come from forms filled by the calibration writers (pendigits
21-24, MNIST 3500-3999; never trained on, and never the held-out writers the benchmark measures
on), filled, distorted and read as ``bench/ocr_accuracy.py`` does (``form_boxes``): InkML for
``"ink"``; pen ink printed and scanned, and MNIST digits scanned, half each, for ``"inset"``.

Reproduce the shipped map (about 25 min on two cores)::

    cd <repo> && .venv/bin/python -m pen_gateway.digits.fit_reliability --out pen_gateway/digits/reliability.json

It also owns, with ``--scan-temperature``, the step that comes before the traced model's weight and
the map: the picture ensemble's temperature for a scan's boxes (``digits.json``'s
``crop_temperatures``), fitted on the same kind of forms (``fit_scan_temperature``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .evaluation import fit_temperature, softmax
from .form_boxes import SCAN_MODES, collect_all
from .recognizer import MODEL_PATH
from .reliability import RELIABILITY_PATH, Knots, ReliabilityMap, odds_against, read_as_digit

# Which benchmark modes stand for each channel's uploads.
CHANNELS = {"ink": ("inkml",), "inset": SCAN_MODES}
BANDS = (0.0, 0.7, 0.9, 0.97, 0.99, 0.999, 0.9999, 1.0)  # of the confidence of a box's reading
SHRINKAGE = 2.0  # α: pseudo-errors, expected and seen, in every band


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(probs[np.arange(len(truth)), truth], 1e-300))))


def in_bands(confidence: np.ndarray) -> Iterator[tuple[float, float, np.ndarray]]:
    """(low, high, mask) of the boxes whose reading's `confidence` is in each of `BANDS`."""
    for lo, hi in itertools.pairwise(BANDS):
        yield lo, hi, (confidence >= lo) & ((confidence < hi) if hi < 1.0 else True)


def read_right(probs: np.ndarray, digit: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the confidence of each reading, whether it is right) of the boxes read as a digit (`digit`)."""
    return probs[digit].max(axis=1), probs[digit].argmax(axis=1) == truth[digit]


def fit_knots(probs: np.ndarray, digit: np.ndarray, truth: np.ndarray) -> Knots:
    """One knot per confidence band of the boxes read as a digit (`digit`; see the module's docstring)."""
    confidence, right = read_right(probs, digit, truth)
    log_odds = odds_against(probs[digit])
    xs, ms = [], []
    for _, _, band in in_bands(confidence):
        if band.any():
            wrong, expected = float((~right[band]).sum()), float((1.0 - confidence[band]).sum())
            xs.append(float(log_odds[band].mean()))
            ms.append(max(1.0, (wrong + SHRINKAGE) / (expected + SHRINKAGE)))
    order = np.argsort(xs)
    x, m = np.array(xs)[order], np.log(np.array(ms)[order])
    # A reading the models found less likely must not come out surer: raise a knot that would say so.
    for k in range(1, len(x)):
        m[k] = max(m[k], m[k - 1] - (x[k] - x[k - 1]))
    return Knots(tuple(float(v) for v in np.round(x, 4)), tuple(float(v) for v in np.round(np.exp(m), 4)))


def bands(confidence: np.ndarray, right: np.ndarray) -> list[dict[str, object]]:
    """Boxes read as a digit by the `confidence` of their reading: how many, how many read wrong (`right` false),
    how many the confidences expect (also what bench/ocr_accuracy.py prints)."""
    return [{"band": [lo, hi], "boxes": int(band.sum()), "wrong": int((~right[band]).sum()),
             "expected_wrong": round(float((1.0 - confidence[band]).sum()), 2)}
            for lo, hi, band in in_bands(confidence)]


def fit_scan_temperature(forms: int, seed: int, jobs: int, path: Path | None = None) -> float:
    """The temperature of the picture ensemble for a scan's boxes as the pipeline cuts them, written into `path`
    (the shipped digits.json by default).

    The ensemble's own temperature is fitted on calibration cells (digits.json), made up single
    crops; a box cut from a scanned form through the homography is another thing, and the
    ensemble's logits are not as sure of it as they could be. Its temperature is the one that
    maximises the likelihood of what was written in the boxes that reached the networks (not found
    empty by the rules) on forms filled by the calibration writers and scanned as for the map.
    """
    modes = CHANNELS["inset"]
    collected = collect_all([(m, forms, seed + 100 + k, "logits", "calibration") for k, m in enumerate(modes)], jobs)
    logits, rule_empty, truth = (np.concatenate([c[i] for c in collected]) for i in range(3))
    logits, truth = logits[~rule_empty], truth[~rule_empty]
    temperature = fit_temperature(logits, truth)
    path = path or MODEL_PATH.with_suffix(".json")
    meta = json.loads(path.read_text(encoding="utf-8"))
    before = float(meta["temperature"])
    meta["crop_temperatures"] = {"inset": round(temperature, 5)}
    meta["crop_temperatures_rule"] = (
        "inset (scans): NLL of the ensemble's logits on the boxes that reached the networks on forms filled by the "
        f"calibration writers (pendigits 21-24, MNIST 3500-3999), {forms} a mode, scanned and cut as "
        "bench/ocr_accuracy.py does (pen_gateway.digits.fit_reliability --scan-temperature)"
    )
    was, now = nll(softmax(logits, before), truth), nll(softmax(logits, temperature), truth)
    meta["crop_temperatures_figures"] = {"inset": {
        "boxes": len(truth), "nll at the ensemble's temperature": round(was, 5), "nll at its own": round(now, 5),
    }}
    path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"inset: temperature {before} -> {temperature:.5f} on {len(truth)} boxes; NLL {was:.5f} -> {now:.5f}")
    return temperature


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", type=int, default=1000, help="forms per benchmark mode (default 1000)")
    parser.add_argument("--seed", type=int, default=101)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RELIABILITY_PATH)
    parser.add_argument("--scan-temperature", action="store_true",
                        help="fit nothing but the temperature of the picture ensemble for scans' boxes "
                        "(digits.json's crop_temperatures), the step before train_traced.py --refit and the map")
    args = parser.parse_args()
    if args.scan_temperature:
        fit_scan_temperature(args.forms, args.seed, args.jobs)
        return 0
    modes = [m for ms in CHANNELS.values() for m in ms]
    runs = collect_all(
        [(m, args.forms, args.seed + k, "beliefs", "calibration") for k, m in enumerate(modes)], args.jobs)
    collected = dict(zip(modes, runs, strict=True))
    channels, figures = {}, {}
    for channel, channel_modes in CHANNELS.items():
        probs, rule_empty, truth = (np.concatenate([collected[m][i] for m in channel_modes]) for i in range(3))
        digit = read_as_digit(probs, rule_empty)
        knots = fit_knots(probs, digit, truth)
        channels[channel] = {"log_odds": list(knots.log_odds), "multiplier": list(knots.multiplier)}
        mapped = ReliabilityMap({channel: knots}).apply(probs, channel, digit)
        figures[channel] = {
            "modes": list(channel_modes), "boxes": len(truth), "read_as_digit": int(digit.sum()),
            "nll": {"before": round(nll(probs, truth), 5), "after": round(nll(mapped, truth), 5)},
            "bands before": bands(*read_right(probs, digit, truth)),
            "bands after": bands(*read_right(mapped, digit, truth)),
        }
        print(f"{channel}: {channels[channel]}; NLL {nll(probs, truth):.5f} -> {nll(mapped, truth):.5f}")
    meta = {
        "channels": channels,
        "rule": "per channel and confidence band of the boxes read as a digit, the odds against the reading are "
                f"multiplied by max(1, (wrong + {SHRINKAGE}) / (expected wrong + {SHRINKAGE})), at the band's mean "
                "log-odds; measured on forms filled by the calibration writers (pendigits 21-24, MNIST 3500-3999), "
                "filled, distorted and read as bench/ocr_accuracy.py does",
        "forms_per_mode": args.forms, "seed": args.seed,
        "figures (calibration writers' forms)": figures,
    }
    args.out.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
