"""The pen's own evidence: a digit read from its strokes, to combine with the image model on InkML pages.

This module owns the trajectory features (``features``: a box's strokes, in writing order,
normalised and resampled by arc length to ``POINTS`` points with a pen-down flag), the
small network that reads them (``trajectory.onnx``, trained by ``train_trajectory.py``,
read with ``cv2.dnn``) and how its answer is combined with the image CNN's
(``TrajectoryModel.combine``): a weighted sum of the two models' log-probabilities,
re-calibrated by one temperature. The weight and the temperature are fitted on the
calibration writers (pendigits 21-24), never on the held-out ones; see
``trajectory.json``. numpy and OpenCV only.

Two models that look at different things (the order and direction of the pen's moves,
against the ink's shape) make different mistakes: a 7 whose bar curls like a 2's head is
drawn top-left to right then down, a 2 ends with a bar to the right.
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

POINTS = 32  # resampled points per box
FEATURES = 3 * POINTS  # x, y, pen down
MODEL_PATH = Path(__file__).resolve().with_name("trajectory.onnx")


def features(strokes: Sequence[np.ndarray]) -> np.ndarray | None:
    """A box's strokes (any units, y down, in writing order) -> (FEATURES,) float32; None without ink.

    The ink's bounding box is centred and its longer side scaled to 1 (the aspect ratio is
    kept: a 1 stays thin). The path runs through every stroke in order, pen-up jumps
    included, and is resampled at ``POINTS`` equal steps of its length; each point says
    whether it lies on ink (1) or on a jump (0). Sampling rate and units drop out.
    """
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes if len(s)]
    if not arrays:
        return None
    allp = np.vstack(arrays)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    scale = float(max(hi - lo)) or 1.0
    pts, down = [], []
    for k, a in enumerate(arrays):
        a = (a - (lo + hi) / 2) / scale
        if len(a) == 1:
            a = np.vstack([a, a])  # a dot is a stroke of no length
        pts.append(a)
        # Flag per segment that ends at each point: the first point of a stroke closes a jump.
        down.append(np.r_[0.0 if k else 1.0, np.ones(len(a) - 1)])
    path = np.vstack(pts)
    seg_down = np.concatenate(down)[1:]  # per segment path[i] -> path[i + 1]
    steps = np.hypot(*np.diff(path, axis=0).T)
    length = np.r_[0.0, np.cumsum(steps)]
    if length[-1] <= 0:
        out = np.zeros((POINTS, 3))
        out[:, 2] = 1.0
        return out.T.reshape(-1).astype(np.float32)
    at = np.linspace(0.0, length[-1], POINTS)
    x = np.interp(at, length, path[:, 0])
    y = np.interp(at, length, path[:, 1])
    seg = np.clip(np.searchsorted(length, at, side="right") - 1, 0, len(seg_down) - 1)
    flag = seg_down[seg]
    # Channels first: all x, then all y, then the pen flags.
    return np.concatenate([x, y, flag]).astype(np.float32)


@dataclass
class _Loaded:
    net: cv2.dnn.Net
    lock: threading.Lock
    temperature: float  # of the trajectory model alone
    weight: float  # of its log-probabilities against the image model's
    combined_temperature: float


_cache: dict[tuple[int, str], _Loaded] = {}
_cache_lock = threading.Lock()


def available(path: Path = MODEL_PATH) -> bool:
    return path.is_file() and path.with_suffix(".json").is_file()


class TrajectoryModel:
    """Reads digits from strokes, and combines that reading with the image model's probabilities."""

    def __init__(self, model_path: Path | None = None) -> None:
        path = Path(model_path) if model_path is not None else MODEL_PATH
        key = (os.getpid(), str(path.resolve()))  # a forked worker must not share its parent's net
        with _cache_lock:
            loaded = _cache.get(key)
            if loaded is None:
                meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
                if int(meta["input"]["points"]) != POINTS:
                    raise ValueError(f"{path}: model for {meta['input']['points']} points, not {POINTS}")
                combine = meta["combination"]
                loaded = _Loaded(
                    cv2.dnn.readNetFromONNX(str(path)),
                    threading.Lock(),
                    float(meta["temperature"]),
                    float(combine["weight"]),
                    float(combine["temperature"]),
                )
                _cache[key] = loaded
        self._m = loaded

    def log_probabilities(self, feats: np.ndarray) -> np.ndarray:
        """(N, 10) log-probabilities of digits 0-9 for (N, FEATURES) features."""
        if len(feats) == 0:
            return np.zeros((0, 10))
        with self._m.lock:
            self._m.net.setInput(np.ascontiguousarray(feats, dtype=np.float32))
            logits = np.array(self._m.net.forward(), dtype=np.float64).reshape(len(feats), -1)
        z = logits / self._m.temperature
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def combine(self, image_probs: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Combined class probabilities (N, 11) for boxes with ink: digits from both models, empty from the image.

        The trajectory model has no "empty" class (a box with strokes is not empty to it); it
        gives the empty class the log-probability of its least likely digit, a vote against.
        """
        lt = self.log_probabilities(feats)
        li = np.log(np.maximum(image_probs, 1e-300))
        lt = np.concatenate([lt, lt.min(axis=1, keepdims=True)], axis=1)
        z = (li + self._m.weight * lt) / self._m.combined_temperature
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)
