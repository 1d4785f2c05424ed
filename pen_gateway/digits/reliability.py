"""The reliability map: what a channel's confidences are worth on whole forms, fitted by `fit_reliability.py`.

The digit models are calibrated on single crops. A box cut from a whole form is not such a crop
(a scan is rotated, rescaled, blurred and JPEG-compressed before its boxes are cut), and on forms
of writers the models never trained on, boxes read in some bands of confidence are wrong more
often than their confidences say (the bands and figures are in ``reliability.json``).
``reliability.json`` holds, per crop kind (``"ink"`` for InkML, ``"inset"`` for scans), how much
to multiply the odds against a box's reading, as a function of those odds: knots (log-odds
against the reading, multiplier), interpolated linearly in log-odds and log multiplier, held
constant past the end knots. Every multiplier is at least 1 (the map never makes a reading surer
than the models said), and the map keeps the order of a box's confidences (what is read, and the
order of the alternatives, do not change). Boxes read as empty are left as they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

RELIABILITY_PATH = Path(__file__).resolve().with_name("reliability.json")


def read_as_digit(probs: np.ndarray, rule_empty: np.ndarray) -> np.ndarray:
    """The rows (N, K; the last class is "empty") read as a digit: the boxes the map applies to."""
    return ~rule_empty & (probs.argmax(axis=1) != probs.shape[1] - 1)


def odds_against(probs: np.ndarray) -> np.ndarray:
    """Log-odds against each row's most probable class: log((1 - p_max) / p_max)."""
    top = probs.max(axis=1)
    return np.log(np.maximum(1.0 - top, 1e-300) / top)


@dataclass(frozen=True)
class Knots:
    log_odds: tuple[float, ...]  # increasing
    multiplier: tuple[float, ...]  # of the odds against the reading, >= 1

    def __post_init__(self) -> None:
        x, m = np.array(self.log_odds), np.log(np.array(self.multiplier))
        if len(x) == 0 or len(x) != len(m) or np.any(np.diff(x) <= 0) or np.any(m < 0):
            raise ValueError("knots need increasing log-odds and multipliers >= 1")
        # 1e-3: what rounding the knots to four decimals may cost, a thousandth of the odds.
        if np.any(np.diff(x + m) < -1e-3):
            raise ValueError("knots would reorder confidences: log-odds + log multiplier must not decrease")

    def at(self, log_odds: np.ndarray) -> np.ndarray:
        return np.exp(np.interp(log_odds, self.log_odds, np.log(self.multiplier)))


@dataclass(frozen=True)
class ReliabilityMap:
    channels: dict[str, Knots]

    def apply(self, probs: np.ndarray, crop: str, read_as_digit: np.ndarray) -> np.ndarray:
        """`probs` (N, K), the odds against the reading of each `read_as_digit` row multiplied as `crop`'s knots say."""
        knots = self.channels.get(crop)
        rows = np.flatnonzero(read_as_digit)
        if knots is None or len(rows) == 0:
            return probs
        p = probs[rows]
        best = p.argmax(axis=1)
        top = p[np.arange(len(rows)), best]
        multiplier = knots.at(odds_against(p))
        # Never past the runner-up: the reading stays the most probable class.
        second = np.partition(p, -2, axis=1)[:, -2]
        multiplier = np.maximum(1.0, np.minimum(multiplier, 0.999 * top / np.maximum(second, 1e-300)))
        mapped = p * multiplier[:, None]
        mapped[np.arange(len(rows)), best] = top
        out = probs.copy()
        out[rows] = mapped / mapped.sum(axis=1, keepdims=True)
        return out


@cache
def load_reliability(path: Path) -> ReliabilityMap:
    meta = json.loads(Path(path).read_text(encoding="utf-8"))
    return ReliabilityMap({
        str(crop): Knots(tuple(map(float, k["log_odds"])), tuple(map(float, k["multiplier"])))
        for crop, k in meta["channels"].items()
    })
