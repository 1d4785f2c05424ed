"""Reading a pen digit from its strokes, in the order they were written (numpy + OpenCV only, no torch).

An InkML box carries more than its picture: where the pen went down, which way it moved, where
it lifted. This module owns that second reader: ``features`` turns a box's strokes into a fixed
sequence (48 points spread evenly along the ink, each with its position, its direction of travel
and whether the pen lifts after it), and ``TrajectoryModel`` runs the small 1-D CNN that
``train_trajectory.py`` trained on it (``trajectory.onnx``, read with ``cv2.dnn``).

The two readers fail differently (the picture model confuses shapes, this one confuses pen
paths), so the recognizer multiplies their beliefs for ink boxes: ``combine`` weighs this model's
log-probabilities by ``trajectory.json``'s ``weight``, fitted on the calibration writers. Only the
split among the ten digits changes; whether the box is empty stays the picture model's call.
A scan's box is read the same way from strokes traced from its picture (``skeleton.py``), by the
same network trained on traced strokes: ``TrajectoryModel(TRACED_MODEL_PATH)`` (``traced.json``'s weight).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

MODEL_PATH = Path(__file__).resolve().with_name("trajectory.onnx")
# The same network trained on strokes traced from scanned digits (``skeleton.py``, ``train_traced.py``).
TRACED_MODEL_PATH = MODEL_PATH.with_name("traced.onnx")
POINTS = 48  # samples along the ink
CHANNELS = 5  # x, y, dx, dy, pen lifts after this point
STEP_GAIN = 10.0  # dx, dy are about 1/POINTS of the extent: brought to the scale of x and y

__all__ = [
    "CHANNELS", "MODEL_PATH", "POINTS", "TRACED_MODEL_PATH", "TrajectoryModel", "combine", "features", "model_input",
]


def features(strokes: Sequence[np.ndarray]) -> np.ndarray:
    """(CHANNELS, POINTS) float32 for one digit's strokes (any units, y down, in writing order).

    Centred on the ink's bounding box and scaled by half its larger side, so neither the box's
    size nor the pen's units matter; resampled by arc length along the pen-down ink, so neither
    does the pen's sampling rate. A digit of one dot gives that dot everywhere.
    """
    parts = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes if len(s)]
    if not parts:
        return np.zeros((CHANNELS, POINTS), np.float32)
    allp = np.vstack(parts)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-9)
    stroke_of = np.concatenate([np.full(len(p), k) for k, p in enumerate(parts)])
    pts = (allp - centre) / half
    # The jump from one stroke's end to the next one's start is no ink: it takes no arc length.
    step = np.hypot(*np.diff(pts, axis=0).T) * (np.diff(stroke_of) == 0)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    if arc[-1] <= 0:
        arc = np.linspace(0.0, 1.0, len(pts))
    at = np.linspace(0.0, arc[-1], POINTS)
    if len(pts) == 1:
        xy, which = np.repeat(pts, POINTS, axis=0), np.zeros(POINTS, int)
    else:
        # The segment each sample falls in; equal arcs (a jump) resolve to the later stroke.
        seg = np.clip(np.searchsorted(arc, at, side="right") - 1, 0, len(pts) - 2)
        span = np.maximum(arc[seg + 1] - arc[seg], 1e-12)
        t = np.clip((at - arc[seg]) / span, 0.0, 1.0)[:, None]
        xy = pts[seg] * (1 - t) + pts[seg + 1] * t
        which = np.where(t[:, 0] >= 1.0, stroke_of[seg + 1], stroke_of[seg])
    d = np.vstack([np.diff(xy, axis=0), np.zeros((1, 2))])
    lift = np.append(np.diff(which) != 0, False).astype(np.float64)
    return np.vstack([xy.T, d.T * STEP_GAIN, lift[None]]).astype(np.float32)


def model_input(digits: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """(N, CHANNELS, 1, POINTS) float32, one row per digit's strokes: each sequence as a one-row image,
    which every cv2.dnn version reads."""
    return np.ascontiguousarray(np.stack([features(s) for s in digits])[:, :, None, :])


def combine(image_probs: np.ndarray, trajectory_logits: np.ndarray, weight: float, empty_class: int) -> np.ndarray:
    """The picture model's probabilities (N, 11) with the stroke model's logits (N, 10) as further evidence.

    p(digit) = (1 - p_img(empty)) * normalize(p_img(digit) * softmax(trajectory)^weight); p(empty) unchanged.
    """
    digits = image_probs[:, :empty_class]
    z = np.log(np.maximum(digits, 1e-300)) + weight * (
        trajectory_logits - trajectory_logits.max(axis=1, keepdims=True)
    )
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out = image_probs.copy()
    out[:, :empty_class] = e / e.sum(axis=1, keepdims=True) * (1.0 - image_probs[:, empty_class : empty_class + 1])
    return out


@dataclass
class _Loaded:
    net: cv2.dnn.Net
    lock: threading.Lock
    weight: float


_cache: dict[tuple[int, str], _Loaded] = {}
_cache_lock = threading.Lock()


class TrajectoryModel:
    """The stroke-order digit model; one cv2.dnn net per process, behind a lock (nets are not thread-safe)."""

    def __init__(self, model_path: Path | None = None) -> None:
        path = Path(model_path) if model_path is not None else MODEL_PATH
        key = (os.getpid(), str(path.resolve()))
        with _cache_lock:
            if key not in _cache:
                meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
                if (meta["input"]["channels"], meta["input"]["points"]) != (CHANNELS, POINTS):
                    raise ValueError(f"{path}: model input {meta['input']} is not ({CHANNELS}, {POINTS})")
                _cache[key] = _Loaded(cv2.dnn.readNetFromONNX(str(path)), threading.Lock(), float(meta["weight"]))
            self._model = _cache[key]

    @property
    def weight(self) -> float:
        return self._model.weight

    def logits(self, digits: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """(N, 10) logits, one row per digit's strokes."""
        if not digits:
            return np.zeros((0, 10))
        blob = model_input(digits)
        with self._model.lock:
            self._model.net.setInput(blob)
            out = self._model.net.forward()
        return np.array(out, dtype=np.float64).reshape(len(digits), -1)
