"""Benchmark of the handwritten-digit recogniser (pen_gateway.digits) on held-out data.

Prints, through the run-time API ``DigitRecognizer.read`` (cv2.dnn, no torch):

* accuracy on pendigits writers 25-30 and MNIST dev images 4000-4999, never
  trained on, per render condition (clean pen strokes, simulated scan, harsh
  scan), plus generated empty boxes;
* the confidence / coverage / error table at several thresholds, for the
  renders the threshold was chosen on and for fresh renders (new seeds) of
  the same held-out samples;
* digits per second through ``read`` in batches;
* Tesseract as a second opinion on a few hundred held-out cells, when the
  ``tesseract`` binary and ``pytesseract`` are installed, and whether
  combining it with the CNN would help.

Figures are printed, never asserted. Run from the repository root::

    python bench/digit_accuracy.py [--tesseract-n 300] [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1])
)  # run as a plain script from anywhere

from pen_gateway.digits import evaluation, preprocess, synth
from pen_gateway.digits.preprocess import Crop
from pen_gateway.digits.recognizer import RECOMMENDED_THRESHOLD, DigitRecognizer

THRESHOLDS = (0.9, 0.99, 0.999, RECOMMENDED_THRESHOLD)


def answers(
    rec: DigitRecognizer, cells: list[np.ndarray], crop: Crop = "box"
) -> tuple[np.ndarray, np.ndarray]:
    """(class 0-9 or EMPTY, confidence) per cell, exactly as ``read`` reports them."""
    readings = rec.read(cells, crop=crop)
    pred = np.array(
        [evaluation.EMPTY if r.digit is None else r.digit for r in readings]
    )
    return pred, np.array([r.confidence for r in readings])


def table(
    title: str,
    pred: np.ndarray,
    conf: np.ndarray,
    labels: np.ndarray,
    names: np.ndarray,
) -> None:
    print(f"\n{title}")
    groups = {
        "pendigits w25-30": np.char.startswith(names, "pendigits"),
        "mnist 4000-4999": np.char.startswith(names, "mnist"),
        "empty boxes": names == "empty boxes",
        "all": np.ones(len(names), bool),
    }
    print(
        f"  {'set':<18} {'threshold':>9} {'coverage':>9} {'wrong/accepted':>15} {'error':>8}"
    )
    for g, sel in groups.items():
        for t in THRESHOLDS:
            r = evaluation.reliability(pred[sel], conf[sel], labels[sel], t)
            mark = " (recommended)" if t == RECOMMENDED_THRESHOLD else ""
            print(
                f"  {g:<18} {t:>9} {r.coverage:>9.2%} {f'{r.wrong}/{r.accepted}':>15} {r.error_rate:>8.3%}{mark}"
            )


def run_sets(
    rec: DigitRecognizer, sets: list[evaluation.EvalSet]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pred, conf, labels, set names) over all cells of ``sets``."""
    out = [answers(rec, s.cells, s.crop) for s in sets]
    labels = np.concatenate([s.labels for s in sets])
    names = np.concatenate([[s.name] * len(s.labels) for s in sets])
    return (
        np.concatenate([o[0] for o in out]),
        np.concatenate([o[1] for o in out]),
        labels,
        names,
    )


def accuracy_lines(
    title: str,
    sets: list[evaluation.EvalSet],
    pred: np.ndarray,
    labels: np.ndarray,
    names: np.ndarray,
) -> None:
    print(f"\n{title}")
    for s in sets:
        sel = names == s.name
        print(
            f"  {s.name:<36} n={sel.sum():>5}  accuracy {np.mean(pred[sel] == labels[sel]):7.2%}"
        )


def throughput(rec: DigitRecognizer, cells: list[np.ndarray]) -> None:
    print("\nThroughput (one process, cv2.dnn; includes preprocessing)")
    for batch in (1, 16, 64, 256):
        n = min(len(cells), 256 if batch == 1 else 1024)
        t = time.perf_counter()
        for i in range(0, n, batch):
            rec.read(cells[i : i + batch])
        dt = time.perf_counter() - t
        print(f"  batch {batch:>4}: {n / dt:8.0f} digits/s")
    n = min(len(cells), 1024)
    t = time.perf_counter()
    x, _ = preprocess.prepare_batch(cells[:n])
    t_pre = time.perf_counter() - t
    t = time.perf_counter()
    rec.probabilities(x)
    t_net = time.perf_counter() - t
    print(
        f"  split at batch 256: preprocessing {n / t_pre:.0f} cells/s, network {n / t_net:.0f} cells/s"
    )


def tesseract_opinion(
    rec: DigitRecognizer, sets: list[evaluation.EvalSet], n: int
) -> None:
    print(f"\nTesseract second opinion ({n} held-out cells)")
    if shutil.which("tesseract") is None:
        print("  skipped: `tesseract` not installed (apt-get install -y tesseract-ocr)")
        return
    try:
        import pytesseract  # type: ignore[import-untyped]
    except ImportError:
        print("  skipped: pytesseract not installed (pip install pytesseract)")
        return
    import cv2

    digit_sets = [s for s in sets if s.name != "empty boxes"]
    per = max(1, n // len(digit_sets))
    cells, labels = [], []
    for s in digit_sets:
        idx = np.linspace(0, len(s.cells) - 1, per).astype(int)
        cells += [s.cells[i] for i in idx]
        labels += [int(s.labels[i]) for i in idx]
    y = np.array(labels)
    readings = rec.read(cells)
    cnn = np.array([-1 if r.digit is None else r.digit for r in readings])
    conf = np.array([r.confidence for r in readings])
    config = "--psm 10 -c tessedit_char_whitelist=0123456789"
    t = time.perf_counter()
    tess = []
    for c in cells:
        # White margin as Tesseract expects text on a page, not against the crop edge.
        padded = cv2.copyMakeBorder(c, 24, 24, 24, 24, cv2.BORDER_CONSTANT, value=255)
        txt = pytesseract.image_to_string(padded, config=config).strip()
        tess.append(int(txt[0]) if txt[:1].isdigit() else -1)
    dt = (time.perf_counter() - t) / len(cells)
    ts = np.array(tess)
    print(f"  CNN accuracy       {np.mean(cnn == y):7.2%}")
    print(
        f"  Tesseract accuracy {np.mean(ts == y):7.2%} (no answer {np.mean(ts < 0):.1%}, {dt:.3f} s/digit)"
    )
    acc = conf >= RECOMMENDED_THRESHOLD
    agree = cnn == ts
    print(
        f"  CNN accepted at p>={RECOMMENDED_THRESHOLD}: {acc.sum()} cells, wrong {int((acc & (cnn != y)).sum())}; "
        f"Tesseract disagrees on {int((acc & ~agree).sum())} of them"
    )
    rej = ~acc
    print(
        f"  CNN rejected: {rej.sum()} cells; Tesseract agrees with the CNN on {int((rej & agree).sum())}, "
        f"of which wrong {int((rej & agree & (cnn != y)).sum())}"
    )
    # Would "accept when p >= threshold OR (CNN and Tesseract agree and p >= 0.9)" gain anything?
    combo = acc | (agree & (conf >= 0.9))
    print(
        f"  combined rule (p>=thr, or agree & p>=0.9): coverage {combo.mean():.2%} vs {acc.mean():.2%} CNN alone, "
        f"wrong {int((combo & (cnn != y)).sum())} vs {int((acc & (cnn != y)).sum())}"
    )
    gained = int((combo & ~acc).sum())
    extra_wrong = int((combo & ~acc & (cnn != y)).sum())
    print(
        f"  verdict: combining would add {gained} accepted cells ({gained / len(y):.1%}), {extra_wrong} of them "
        f"wrong, for {dt:.2f} s of Tesseract per digit"
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tesseract-n",
        type=int,
        default=300,
        help="held-out cells for Tesseract (0 = skip)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="200 samples per set, no fresh renders"
    )
    args = ap.parse_args()
    limit = 200 if args.quick else None
    rec = DigitRecognizer()
    print(
        f"model: temperature {rec.temperature:.4f}, recommended threshold {RECOMMENDED_THRESHOLD}"
    )
    t = time.perf_counter()
    sets = evaluation.heldout_sets(limit=limit, n_empty=200 if args.quick else 1000)
    print(f"rendered held-out cells in {time.perf_counter() - t:.1f} s")

    pred, conf, labels, names = run_sets(rec, sets)
    accuracy_lines(
        "Held-out accuracy (an empty answer on a digit counts as wrong)",
        sets,
        pred,
        labels,
        names,
    )
    table(
        "Reliability: auto-accept p >= threshold (renders used to fit T and pick the threshold)",
        pred,
        conf,
        labels,
        names,
    )
    if not args.quick:
        fresh = evaluation.heldout_sets(salt=1)
        fpred, fconf, flabels, fnames = run_sets(rec, fresh)
        accuracy_lines(
            "Fresh renders (new augmentation seeds, same held-out samples)",
            fresh,
            fpred,
            flabels,
            fnames,
        )
        table("Reliability on fresh renders", fpred, fconf, flabels, fnames)

    scan = [c for s in sets if s.name.endswith(synth.SCAN.name) for c in s.cells]
    throughput(rec, scan)
    if args.tesseract_n:
        scan_sets = [
            s
            for s in sets
            if s.name.endswith(f"/ {synth.SCAN.name}")
            or s.name.endswith(synth.CLEAN.name)
        ]
        tesseract_opinion(rec, scan_sets, args.tesseract_n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
