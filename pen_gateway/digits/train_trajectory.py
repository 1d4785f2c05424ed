"""Train the trajectory digit model, fit its combination with the image CNN, export ONNX (training time only).

This module owns the recipe of ``trajectory.onnx`` and its metadata ``trajectory.json``
(see ``trajectory.py`` for the features and the combination). Data: UCI pendigits
writers 1-20, each sample's strokes augmented (slant, rotation, width, smooth warp,
tremor, denser or sparser sampling). The model's temperature, and the weight and
temperature of its combination with the image model (``--cnn``, default the shipped
``digits.onnx``), are fitted on writers 21-24, never trained on. Writers 25-30 are held
out and only measured.

    PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train_trajectory        # ~5 min on 1 core
    PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train_trajectory --refit-combination

``--refit-combination`` keeps the trained network and fits only the combination again
(after a new image model).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from . import data, evaluation, preprocess, synth, trajectory
from .recognizer import MODEL_PATH, DigitRecognizer

HERE = Path(__file__).resolve().parent
SEED = 20261


class TrajectoryNet(nn.Module):
    """A small 1-D CNN along the resampled path: (x, y, pen) x POINTS -> 10 logits (~170k weights)."""

    def __init__(self) -> None:
        super().__init__()

        def block(i: int, o: int, k: int) -> list[nn.Module]:
            return [nn.Conv1d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm1d(o), nn.ReLU(inplace=True)]

        self.body = nn.Sequential(
            *block(3, 64, 5),
            *block(64, 64, 5),
            nn.MaxPool1d(2),
            *block(64, 128, 3),
            nn.MaxPool1d(2),
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128 * trajectory.POINTS // 4, 128),
            nn.ReLU(inplace=True),
            nn.Dropout(0.3),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The features are flat (x..., y..., pen...) so that run time needs no reshaping of its own.
        return self.body(x.reshape(-1, 3, trajectory.POINTS))


def augment(strokes: tuple[np.ndarray, ...], rng: np.random.Generator) -> list[np.ndarray]:
    """Another writer's hand, roughly: the image trainer's geometric jitter, then resampling."""
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes]
    allp = np.vstack(arrays)
    centre = (allp.min(axis=0) + allp.max(axis=0)) / 2
    m = synth._pen_transform(rng, True)
    pts = [(a - centre) @ m.T for a in arrays]
    ext = float(np.ptp(allp[:, 1])) or 1.0
    k = rng.normal(0, 0.6, (2, 2)) / ext
    phase = rng.uniform(0, 2 * np.pi, 2)
    amp = rng.uniform(0, 0.06, 2) * ext
    pts = [p + amp * np.sin(2 * np.pi * (p @ k.T) + phase) for p in pts]
    pts = [p + rng.normal(0, 0.012 * ext, p.shape) for p in pts]
    out = []
    for p in pts:
        r = rng.random()
        if r < 0.25 and len(p) > 4:
            p = p[:: 2] if len(p) % 2 else np.vstack([p[::2], p[-1:]])  # a slower pen: half the samples
        elif r < 0.5 and len(p) > 1:
            t = np.linspace(0, len(p) - 1, 3 * len(p))  # a faster one: three times as many
            p = np.stack([np.interp(t, np.arange(len(p)), p[:, j]) for j in range(2)], axis=1)
        out.append(p)
    return out


def feature_set(samples: list[data.PenSample], variants: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    xs, ys = [], []
    for s in samples:
        for v in range(variants):
            f = trajectory.features(s.strokes if v == 0 else augment(s.strokes, rng))
            if f is not None:
                xs.append(f)
                ys.append(s.label)
    return np.array(xs, np.float32), np.array(ys, np.int64)


def trusted(samples: list[data.PenSample]) -> np.ndarray:
    """False for the samples whose label is known to be wrong: left out of every fit, kept in every figure."""
    return np.array([f"pendigits w{s.writer} s{s.sample}" not in evaluation.KNOWN_LABEL_ERRORS for s in samples])


def raw_features(samples: list[data.PenSample]) -> tuple[np.ndarray, np.ndarray]:
    f = [trajectory.features(s.strokes) for s in samples]
    return np.array(f, np.float32), np.array([s.label for s in samples], np.int64)


def ink_cells(samples: list[data.PenSample], salt: int) -> list[np.ndarray]:
    """The samples as the InkML pipeline shows them to the image model: pen ink in a box, no border."""
    rng = np.random.default_rng(salt)
    return [synth.pen_cell(s.strokes, rng, synth.CLEAN) for s in samples]


def image_probabilities(cnn: DigitRecognizer, cells: list[np.ndarray]) -> np.ndarray:
    x, _ = preprocess.prepare_batch(cells, borders=False)
    return cnn.probabilities(x)


def fit_combination(lp_traj: np.ndarray, p_img: np.ndarray, labels: np.ndarray) -> tuple[float, float, float]:
    """(weight, temperature, NLL): the weight minimising the combined NLL on the calibration writers.

    The temperature is tied to the weight, T = 1 + weight: the combination is a weighted
    geometric mean of two calibrated probabilities, which is never sharper than its parts
    agree. Fitting T freely on four writers that both models read almost perfectly
    sharpened it to overconfidence (wrong digits above the threshold on other writers).
    """
    li = np.log(np.maximum(p_img, 1e-300))
    lt = np.concatenate([lp_traj, lp_traj.min(axis=1, keepdims=True)], axis=1)
    best = (0.0, 1.0, np.inf)
    for w in np.arange(0.0, 1.51, 0.1):
        z = li + w * lt
        loss = evaluation.nll(z, labels, 1.0 + w)
        if loss < best[2]:
            best = (float(round(w, 2)), float(1.0 + round(w, 2)), loss)
    return best


def combined(lp_traj: np.ndarray, p_img: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    li = np.log(np.maximum(p_img, 1e-300))
    lt = np.concatenate([lp_traj, lp_traj.min(axis=1, keepdims=True)], axis=1)
    return evaluation.softmax(li + weight * lt, temperature)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--variants", type=int, default=20)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--out-dir", type=Path, default=HERE)
    ap.add_argument("--cnn", type=Path, default=None, help="the image model to combine with (default: shipped)")
    ap.add_argument("--refit-combination", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    samples = data.load_pendigits()
    train = data.training_pendigits(samples)
    calib = data.calibration_pendigits(samples)
    _, heldout = data.split_pendigits(samples)
    onnx_path = args.out_dir / "trajectory.onnx"
    meta_path = onnx_path.with_suffix(".json")

    cx, cy = raw_features(calib)
    ok = trusted(calib)
    hx, hy = raw_features(heldout)
    if args.refit_combination:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    else:
        x, y = feature_set(train, args.variants, rng)
        print(f"training vectors: {len(y)} in {time.time() - t0:.0f} s", flush=True)
        model = TrajectoryNet()
        batch = 256
        steps = (len(y) + batch - 1) // batch
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps)
        gen = torch.Generator().manual_seed(args.seed)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        loss_fn = nn.CrossEntropyLoss()
        for epoch in range(args.epochs):
            model.train()
            perm = torch.randperm(len(yt), generator=gen)
            total = 0.0
            for i in range(steps):
                idx = perm[i * batch : (i + 1) * batch]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            model.eval()
            with torch.no_grad():
                acc = float((model(torch.from_numpy(cx)).argmax(1).numpy() == cy).mean())
            print(f"epoch {epoch + 1}/{args.epochs}: loss {total / len(yt):.4f}, calibration acc {acc:.4f}",
                  flush=True)
        model.eval()
        args.out_dir.mkdir(parents=True, exist_ok=True)
        torch.onnx.export(
            model, (torch.zeros(1, trajectory.FEATURES),), str(onnx_path), dynamo=False, opset_version=13,
            input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}},
        )
        with torch.no_grad():
            cal_logits = model(torch.from_numpy(cx)).numpy().astype(np.float64)
        net = cv2.dnn.readNetFromONNX(str(onnx_path))
        net.setInput(cx)
        diff = float(np.abs(np.array(net.forward()).reshape(len(cx), -1) - cal_logits).max())
        print(f"cv2.dnn vs torch: max |logit diff| {diff:.2e}", flush=True)
        if diff > 1e-3:
            print("cv2.dnn disagrees with torch", file=sys.stderr)
            return 1
        meta = {
            "model": "trajectory.onnx",
            "input": {"points": trajectory.POINTS, "features": "pen_gateway.digits.trajectory.features"},
            "temperature": round(evaluation.fit_temperature(cal_logits[ok], cy[ok]), 5),
            "training": {
                "command": "PYTHONPATH=. .torchvenv/bin/python -m pen_gateway.digits.train_trajectory",
                "seed": args.seed, "epochs": args.epochs, "variants": args.variants, "vectors": len(y),
                "train_split": "pendigits writers 1-20",
                "calibration_split": "pendigits writers 21-24",
                "heldout_split": "pendigits writers 25-30",
                "torch": torch.__version__,
                "data_sha256": {data.PENDIGITS_FILE: data.data_hashes()[data.PENDIGITS_FILE]},
            },
        }
        # The combination's own parameters are filled below; a placeholder lets the model load.
        meta["combination"] = {"weight": 1.0, "temperature": 1.0}
        meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    traj = trajectory.TrajectoryModel(onnx_path)
    cnn_path = args.cnn or MODEL_PATH
    cnn = DigitRecognizer(cnn_path, trajectory_path=Path("/nonexistent"))  # the image model alone
    threshold = float(json.loads(cnn_path.with_suffix(".json").read_text(encoding="utf-8"))["recommended_threshold"])
    lp_cal = traj.log_probabilities(cx)
    p_img_cal = image_probabilities(cnn, ink_cells(calib, 1))
    weight, temperature, loss = fit_combination(lp_cal[ok], p_img_cal[ok], cy[ok])
    # The combined probabilities must keep the image model's promise at its threshold on the calibration writers.
    p_cal = combined(lp_cal, p_img_cal, weight, temperature)
    cal_rel = [vars(evaluation.reliability(p_cal.argmax(1), p_cal.max(1), cy, t)) for t in evaluation.THRESHOLDS]
    lp_held = traj.log_probabilities(hx)
    p_img_held = image_probabilities(cnn, ink_cells(heldout, 2))
    p_held = combined(lp_held, p_img_held, weight, temperature)
    figures = {}
    for name, feats_lp, img, comb, labels in (
        ("calibration w21-24", lp_cal, p_img_cal, p_cal, cy),
        ("held-out w25-30", lp_held, p_img_held, p_held, hy),
    ):
        figures[name] = {
            "n": len(labels),
            "trajectory_accuracy": round(float((feats_lp.argmax(1) == labels).mean()), 5),
            "image_accuracy": round(float((img.argmax(1) == labels).mean()), 5),
            "combined_accuracy": round(float((comb.argmax(1) == labels).mean()), 5),
            "combined_at_threshold": vars(
                evaluation.reliability(comb.argmax(1), comb.max(1), labels, threshold)
            ),
            "image_at_threshold": vars(
                evaluation.reliability(img.argmax(1), img.max(1), labels, threshold)
            ),
        }
    meta["combination"] = {
        "weight": weight,
        "temperature": round(temperature, 5),
        "calibration_nll": round(loss, 5),
        "image_model": cnn_path.name,
        "image_threshold": threshold,
        "fitted_on": "pendigits writers 21-24, each as the InkML pipeline draws it (CLEAN render, no border)",
        "calibration_reliability": cal_rel,
    }
    meta["figures"] = figures
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({"combination": {k: meta["combination"][k] for k in ("weight", "temperature")},
                      "figures": figures}, indent=2))
    print(f"wrote {onnx_path}; {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
