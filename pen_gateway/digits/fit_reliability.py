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
on), filled, distorted and read as ``bench/ocr_accuracy.py`` does (``tests/form_fill.py``; the
figures drawn by ``consistent_counts``, without the benchmark's deliberate slips, since a box's
truth is what was written in it): InkML for ``"ink"``; pen ink printed and scanned, and MNIST
digits scanned, half each, for ``"inset"``.

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
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from . import preprocess
from .evaluation import fit_temperature, softmax
from .recognizer import MODEL_PATH, DigitRecognizer, readings
from .reliability import RELIABILITY_PATH, Knots, ReliabilityMap, odds_against, read_as_digit

# Which benchmark modes stand for each channel's uploads.
CHANNELS = {"ink": ("inkml",), "inset": ("scan-pen", "scan-mnist")}
BANDS = (0.0, 0.7, 0.9, 0.97, 0.99, 0.999, 0.9999, 1.0)  # of the confidence of a box's reading
SHRINKAGE = 2.0  # α: pseudo-errors, expected and seen, in every band
ELECTION = "primaire-2011-t1"


class _Recording:
    """A recognizer that keeps the combined beliefs of every box it reads, before any reliability map
    (with `logits`: the picture ensemble's logits instead, before any temperature)."""

    def __init__(self, logits: bool = False) -> None:
        self.inner = DigitRecognizer(reliability=None)
        self.keep_logits = logits
        self.probs: list[np.ndarray] = []
        self.rule_empty: list[np.ndarray] = []

    def read(self, cells: Sequence[np.ndarray], *, crop: str = "box",
             strokes: Sequence[Sequence[np.ndarray]] | None = None) -> list:
        if self.keep_logits:
            # The pictures alone: no strokes traced, and the readings (which the fit does not use) at the
            # crop's temperature.
            inputs, rule_empty = preprocess.prepare_batch(cells, crop=crop)  # type: ignore[arg-type]
            logits = self.inner.logits(inputs)
            self.probs.append(logits)
            probs = softmax(logits, self.inner.temperature_for(crop))  # type: ignore[arg-type]
        else:
            probs, rule_empty = self.inner.beliefs(cells, crop=crop, strokes=strokes)  # type: ignore[arg-type]
            self.probs.append(probs)
        self.rule_empty.append(rule_empty)
        return readings(probs, rule_empty)


def collect(mode: str, forms: int, seed: int, logits: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(combined beliefs (N, 11) (with `logits`: the picture ensemble's logits), boxes the rules found empty
    (N,), what was written (N,): 0-9 or 10 for empty) of every box of `forms` forms."""
    from forms import load_election
    from pen_gateway.decode import decode_upload
    from pen_gateway.recognition.pipeline import read_page
    from registry import load_registry
    from registry.demo import generate
    from tests.form_fill import consistent_counts, filled_upload, load_handwriting

    cv2.setNumThreads(1)
    election = load_election(ELECTION)
    hw = load_handwriting("calibration")
    rng = np.random.default_rng(seed)
    recorder = _Recording(logits)
    truth: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(60, Path(tmp) / "registry.csv", Path(tmp) / "pins.csv", scrypt_n=2**8)
        codes = sorted(load_registry(Path(tmp) / "registry.csv").bureaux)
    for i in range(forms):
        counts = consistent_counts(election, rng)
        align = "left" if rng.random() < 0.2 else "right"
        data, content_type, written = filled_upload(mode, election, codes[i % len(codes)], counts, hw, rng, align=align)
        before = len(recorder.probs)
        reading = read_page(decode_upload(data, content_type), recorder, ELECTION)
        if len(recorder.probs) == before:
            continue  # the page was not located: no box was read
        truth.extend(10 if d is None else d for fid in reading.fields for d in written[fid])
    probs = np.concatenate(recorder.probs)
    if len(probs) != len(truth):
        raise RuntimeError(f"{mode}: {len(probs)} boxes read, {len(truth)} written")
    return probs, np.concatenate(recorder.rule_empty), np.array(truth)


def collect_all(
    runs: Sequence[tuple[str, int, int, bool]], jobs: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`collect` for each (mode, forms, seed, logits), on `jobs` processes; in this one if `jobs` is 1 (a
    process that runs threads, as a test session does, cannot safely fork)."""
    if jobs <= 1:
        return [collect(*run) for run in runs]
    with ProcessPoolExecutor(jobs) as pool:
        return [job.result() for job in [pool.submit(collect, *run) for run in runs]]


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
    collected = collect_all([(m, forms, seed + 100 + k, True) for k, m in enumerate(modes)], jobs)
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
    runs = collect_all([(m, args.forms, args.seed + k, False) for k, m in enumerate(modes)], args.jobs)
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
