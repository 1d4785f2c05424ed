"""Boxes as the pipeline cuts them from whole forms filled by one set of writers (fitting and training time only).

A box cut from a scanned form through the homography is not a made-up training cell: the page was
rotated, rescaled, blurred and JPEG-compressed first. What is fitted or fine-tuned after the
networks' own training is fitted on such boxes. This module fills forms as ``bench/ocr_accuracy.py``
does (``tests/form_fill.py``: the figures drawn by ``consistent_counts``, without the benchmark's
deliberate slips, since a box's truth is what was written in it), reads them with the whole
pipeline, and keeps, for every box, one of:

- ``"beliefs"``: the recognizer's combined beliefs before any reliability map (``fit_reliability``);
- ``"logits"``: the picture ensemble's logits, before any temperature (``fit_reliability --scan-temperature``);
- ``"inputs"``: the networks' inputs (``train.py --extra-cells``, to fine-tune the members on boxes of
  the training writers: this module's command line writes them).

Writers: ``"calibration"`` (pendigits 21-24, MNIST 3500-3999) for the fits, ``"training"`` (pendigits
1-20, MNIST 0-3499) for fine-tuning; never the held-out writers the benchmark measures on.

Harvest the training writers' scanned boxes (25 min here, on two cores shared with two training runs)::

    .venv/bin/python -m pen_gateway.digits.form_boxes --out /tmp/scan-boxes.npz
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from . import preprocess
from .evaluation import softmax
from .recognizer import DigitRecognizer, readings

ELECTION = "primaire-2011-t1"
SCAN_MODES = ("scan-pen", "scan-mnist")  # pen ink printed and scanned, MNIST digits scanned: what a scan stands for


class Recording:
    """A recognizer that keeps, for every box it reads, what `keep` names (see the module's docstring)."""

    def __init__(self, keep: str = "beliefs") -> None:
        if keep not in ("beliefs", "logits", "inputs"):
            raise ValueError(f"nothing called {keep!r} to keep")
        self.inner = DigitRecognizer(reliability=None)
        self.keep = keep
        self.kept: list[np.ndarray] = []
        self.rule_empty: list[np.ndarray] = []

    def read(self, cells: Sequence[np.ndarray], *, crop: str = "box",
             strokes: Sequence[Sequence[np.ndarray]] | None = None) -> list:
        if self.keep == "beliefs":
            probs, rule_empty = self.inner.beliefs(cells, crop=crop, strokes=strokes)  # type: ignore[arg-type]
            self.kept.append(probs)
        else:
            # The pictures alone: no strokes traced, and the readings (which nothing here uses) at the crop's
            # temperature.
            inputs, rule_empty = preprocess.prepare_batch(cells, crop=crop)  # type: ignore[arg-type]
            logits = self.inner.logits(inputs)
            self.kept.append(logits if self.keep == "logits" else inputs)
            probs = softmax(logits, self.inner.temperature_for(crop))  # type: ignore[arg-type]
        self.rule_empty.append(rule_empty)
        return readings(probs, rule_empty)


def collect(
    mode: str, forms: int, seed: int, keep: str = "beliefs", writers: str = "calibration"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(what `keep` names, one row per box; boxes the rules found empty (N,); what was written (N,): 0-9 or 10
    for empty) of every box of `forms` forms of benchmark mode `mode`, filled by `writers`."""
    from forms import load_election
    from pen_gateway.decode import decode_upload
    from pen_gateway.recognition.pipeline import read_page
    from registry import load_registry
    from registry.demo import generate
    from tests.form_fill import consistent_counts, filled_upload, load_handwriting

    cv2.setNumThreads(1)
    election = load_election(ELECTION)
    hw = load_handwriting(writers)
    rng = np.random.default_rng(seed)
    recorder = Recording(keep)
    truth: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(60, Path(tmp) / "registry.csv", Path(tmp) / "pins.csv", scrypt_n=2**8)
        codes = sorted(load_registry(Path(tmp) / "registry.csv").bureaux)
    for i in range(forms):
        counts = consistent_counts(election, rng)
        align = "left" if rng.random() < 0.2 else "right"
        data, content_type, written = filled_upload(mode, election, codes[i % len(codes)], counts, hw, rng, align=align)
        before = len(recorder.kept)
        reading = read_page(decode_upload(data, content_type), recorder, ELECTION)
        if len(recorder.kept) == before:
            continue  # the page was not located: no box was read
        truth.extend(10 if d is None else d for fid in reading.fields for d in written[fid])
    kept = np.concatenate(recorder.kept)
    if len(kept) != len(truth):
        raise RuntimeError(f"{mode}: {len(kept)} boxes read, {len(truth)} written")
    return kept, np.concatenate(recorder.rule_empty), np.array(truth)


def collect_all(
    runs: Sequence[tuple[str, int, int, str, str]], jobs: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`collect` for each (mode, forms, seed, keep, writers), on `jobs` processes; in this one if `jobs` is 1 (a
    process that runs threads, as a test session does, cannot safely fork)."""
    if jobs <= 1:
        return [collect(*run) for run in runs]
    with ProcessPoolExecutor(jobs) as pool:
        return [job.result() for job in [pool.submit(collect, *run) for run in runs]]


def harvest(forms: int, seed: int, jobs: int, out: Path) -> int:
    """The training writers' scanned boxes that reach the networks, as inputs (uint8, ink 255) and what was
    written in them, into `out` (an .npz of `x` (N, 28, 28) and `y` (N,)); returns N."""
    collected = collect_all([(m, forms, seed + k, "inputs", "training") for k, m in enumerate(SCAN_MODES)], jobs)
    inputs, rule_empty, truth = (np.concatenate([c[i] for c in collected]) for i in range(3))
    inputs, truth = inputs[~rule_empty], truth[~rule_empty]
    x = np.round(inputs[:, 0] * 255).astype(np.uint8)
    np.savez_compressed(out, x=x, y=truth.astype(np.int64))
    print(f"{out}: {len(truth)} boxes; per class {np.bincount(truth, minlength=11).tolist()}")
    return len(truth)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", type=int, default=1200, help="forms per scan mode (default 1200)")
    parser.add_argument("--seed", type=int, default=301)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    args = parser.parse_args()
    harvest(args.forms, args.seed, args.jobs, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
