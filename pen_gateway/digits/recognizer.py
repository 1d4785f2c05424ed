"""Run-time digit recognition for form boxes (numpy + OpenCV only, no torch).

This module owns the public API the pen gateway and the scan pipeline call:
``DigitRecognizer.read`` turns grayscale box crops (dark ink on light paper)
into calibrated ``DigitReading``s, and ``RECOMMENDED_THRESHOLD`` is the
confidence above which a reading may be auto-accepted (chosen on held-out
writers so that no wrong value was accepted; see ``digits.json``).

The ONNX networks (``digits.onnx`` and the other ensemble members that
``digits.json`` lists, trained by ``train.py``; their logits are averaged) are
loaded once per process and model path with ``cv2.dnn``; cv2.dnn nets are not thread-safe, so
every forward pass holds that net's lock. For pen ink, the caller may also hand each box's
strokes: the stroke-order model (``trajectory.py``) then weighs in on which digit it is. A scan's
box (an ``"inset"`` crop) has no strokes, so they are traced from its picture (``skeleton.py``) and
read by the same network trained on traced strokes (``traced.onnx``), which weighs in the same way.
Last, the channel's reliability map (``reliability.py``) makes those combined confidences what whole
forms of unseen writers bear out; ``beliefs`` gives them before it, for the map's own fitting.
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

from . import preprocess
from .preprocess import Crop
from .reliability import RELIABILITY_PATH, load_reliability, read_as_digit
from .skeleton import traced_strokes
from .trajectory import MODEL_PATH as STROKE_MODEL_PATH
from .trajectory import TRACED_MODEL_PATH, TrajectoryModel, combine

MODEL_PATH = Path(__file__).resolve().with_name("digits.onnx")
# Copied from digits.json ("recommended_threshold") of the shipped model; a
# test keeps the two equal.
RECOMMENDED_THRESHOLD: float = 0.99995
_BATCH = 256  # cells per cv2.dnn forward pass

__all__ = ["MODEL_PATH", "RECOMMENDED_THRESHOLD", "DigitReading", "DigitRecognizer"]


@dataclass(frozen=True)
class DigitReading:
    digit: int | None  # None = empty box
    confidence: float  # calibrated probability of `digit` (or of emptiness)
    alternatives: tuple[
        tuple[int, float], ...
    ]  # other digits by probability, best first (top 3)


@dataclass
class _Loaded:
    nets: list[cv2.dnn.Net]  # one per ensemble member; their logits are averaged
    lock: threading.Lock
    temperature: float
    empty_class: int
    # A crop kind's own temperature, where its boxes are not like the calibration cells (digits.json's
    # "crop_temperatures": scans' boxes as the pipeline cuts them, fitted by fit_reliability.py --scan-temperature).
    crop_temperatures: dict[str, float]


_cache: dict[tuple[int, str], _Loaded] = {}
_cache_lock = threading.Lock()


def _load(path: Path) -> _Loaded:
    # Keyed by pid too: a forked worker must not share its parent's net.
    # Not resolved: a digits.onnx linked to another folder's comes with the digits.json beside the link.
    key = (os.getpid(), str(path.absolute()))
    with _cache_lock:
        loaded = _cache.get(key)
        if loaded is None:
            meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
            if int(meta["input"]["size"]) != preprocess.INPUT_SIZE:
                raise ValueError(
                    f"{path}: model input {meta['input']['size']} != {preprocess.INPUT_SIZE}"
                )
            # An ensemble's digits.json lists its members (ONNX files beside it), the first being `path`.
            members = [path.with_name(name) for name in meta.get("members", [path.name])]
            loaded = _Loaded(
                [cv2.dnn.readNetFromONNX(str(member)) for member in members],
                threading.Lock(),
                float(meta["temperature"]),
                int(meta["empty_class"]),
                {str(crop): float(t) for crop, t in meta.get("crop_temperatures", {}).items()},
            )
            _cache[key] = loaded
        return loaded


class DigitRecognizer:
    """Reads single handwritten digits from form-box crops."""

    def __init__(self, model_path: Path | None = None, reliability: Path | None = RELIABILITY_PATH) -> None:
        """``reliability``: the channel's reliability map (``reliability.json``); None reads without one."""
        self._model = _load(Path(model_path) if model_path is not None else MODEL_PATH)
        self._reliability = load_reliability(reliability) if reliability is not None else None

    @property
    def temperature(self) -> float:
        return self._model.temperature

    def temperature_for(self, crop: Crop) -> float:
        """The temperature the picture ensemble's logits are divided by for cells of this kind."""
        return self._model.crop_temperatures.get(crop, self._model.temperature)

    def logits(self, inputs: np.ndarray) -> np.ndarray:
        """The ensemble's logits (N, 11), its members' averaged, for preprocessed inputs (N, 1, S, S)."""
        out = []
        m = self._model
        for i in range(0, len(inputs), _BATCH):
            blob = np.ascontiguousarray(inputs[i : i + _BATCH], dtype=np.float32)
            logits = np.zeros((len(blob), m.empty_class + 1))
            with m.lock:
                for net in m.nets:
                    net.setInput(blob)
                    logits += np.array(net.forward(), dtype=np.float64).reshape(len(blob), -1)
            out.append(logits / len(m.nets))
        return np.concatenate(out) if out else np.zeros((0, m.empty_class + 1))

    def probabilities(self, inputs: np.ndarray, crop: Crop = "box") -> np.ndarray:
        """Calibrated class probabilities (N, 11) for preprocessed inputs (N, 1, S, S) of cells of kind `crop`."""
        z = self.logits(inputs) / self.temperature_for(crop)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def is_empty(self, cell: np.ndarray) -> bool:
        """True when the box holds no digit (only paper, noise, border remnants)."""
        p = preprocess.prepare(cell)
        if p.empty:
            return True
        probs = self.probabilities(p.image[None, None])
        return int(probs[0].argmax()) == self._model.empty_class

    def beliefs(
        self,
        cells: Sequence[np.ndarray],
        *,
        crop: Crop = "box",
        strokes: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities (N, 11) of a batch of cells, which cells the rules found empty).

        The arguments are `read`'s. The probabilities are the models' combined beliefs, before the
        channel's reliability map (`read` applies it).
        """
        if strokes is not None and len(strokes) != len(cells):
            raise ValueError(f"{len(strokes)} stroke lists for {len(cells)} cells")
        if len(cells) == 0:
            return np.zeros((0, self._model.empty_class + 1)), np.zeros(0, dtype=bool)
        inputs, rule_empty = preprocess.prepare_batch(cells, crop=crop)
        written = np.flatnonzero(~rule_empty)
        # Every cell the rules found empty is the same blank input (half a form's boxes): the
        # networks read it once, after the written cells, and it stands for all of them.
        unique = np.concatenate([inputs[written], np.zeros_like(inputs[:1])])
        seen = self.probabilities(unique, crop)
        probs = np.repeat(seen[-1:], len(cells), axis=0)
        probs[written] = seen[:-1]
        empty = self._model.empty_class
        stroke_model = STROKE_MODEL_PATH
        if strokes is None and crop == "inset":
            # A scan's box: strokes traced from the picture, for the network trained on such strokes.
            strokes = [[] for _ in cells]
            for i, traced in zip(written, traced_strokes(inputs[written, 0]), strict=True):
                strokes[i] = traced
            stroke_model = TRACED_MODEL_PATH
        if strokes is not None:
            inked = [i for i, s in enumerate(strokes) if len(s) and not rule_empty[i]]
            if inked:
                model = TrajectoryModel(stroke_model)
                logits = model.logits([strokes[i] for i in inked])
                probs[inked] = combine(probs[inked], logits, model.weight, empty)
        return probs, rule_empty

    def read(
        self,
        cells: Sequence[np.ndarray],
        *,
        crop: Crop = "box",
        strokes: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> list[DigitReading]:
        """Read a batch of cells; one reading per cell, in order.

        ``crop``: what the cells are, cut on the box, inside it or from pen ink (see ``preprocess.Crop``).
        ``strokes``: for pen ink, the strokes each cell was drawn from, in writing order (any units):
        the stroke-order model's beliefs are combined with the picture's (``trajectory.combine``).
        Without them, an ``"inset"`` crop (a scan's box) is read from strokes traced from its picture.
        """
        probs, rule_empty = self.beliefs(cells, crop=crop, strokes=strokes)
        if self._reliability is not None:
            probs = self._reliability.apply(probs, crop, read_as_digit(probs, rule_empty))
        return readings(probs, rule_empty)


def readings(probs: np.ndarray, rule_empty: np.ndarray) -> list[DigitReading]:
    """One reading per row of class probabilities (N, 11; the last class is "empty")."""
    empty = probs.shape[1] - 1
    out = []
    for p, by_rule in zip(probs, rule_empty, strict=True):
        digits = np.argsort(-p[:empty], kind="stable")
        best = int(p.argmax())
        if by_rule or best == empty:
            # A rule-empty cell reaches the net as a blank input; its
            # p(empty) is still the calibrated number we report.
            out.append(DigitReading(None, float(p[empty]), tuple((int(d), float(p[d])) for d in digits[:3])))
        else:
            others = [int(d) for d in digits if d != best][:3]
            out.append(DigitReading(best, float(p[best]), tuple((d, float(p[d])) for d in others)))
    return out
