"""Synthetic form-box cells from real handwriting, for training, tests and the benchmark.

This module owns how a pendigits trajectory or an MNIST image becomes what the
recogniser sees at run time: a ~7 mm x 9 mm box cut from a 300 dpi page
(about 80 x 105 px), either rendered from pen strokes (dark lines on white) or
scanned (grey paper, noise, blur, JPEG, slight rotation and scale, box-border
remnants at the crop edges). It also makes empty boxes. Everything is driven by
an explicit ``numpy.random.Generator`` so that every set is reproducible.

numpy and OpenCV only (the benchmark and tests use it without torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from .preprocess import Crop
from .strokes import render_strokes

CELL_W, CELL_H = 80, 105  # 7 mm x 9 mm at 300 dpi
PEN_WIDTH_PX = 6.0  # 0.5 mm at 300 dpi


@dataclass(frozen=True)
class Condition:
    """How a cell is made: a named set of augmentation strengths (0 = off)."""

    name: str
    jitter: bool = True  # random size, position, slant, pen width, cell size
    borders: float = 0.0  # probability that box borders are left in the crop
    scan: float = 0.0  # strength of the scan simulation, 0..1
    fill: tuple[float, float] = (0.5, 0.85)  # the digit's height as a share of the cell's, when jittered
    clip: bool = False  # the digit may run into the crop's edges (the pipeline's inset crops)

    @property
    def crop(self) -> Crop:
        """What the cell is, for ``preprocess.prepare``: cut on the box, cut inside it, or pen ink alone."""
        if self.borders > 0:
            return "box"
        return "inset" if self.scan > 0 else "ink"


CLEAN = Condition("clean pen", jitter=False)
SCAN = Condition("scan", jitter=True, borders=0.7, scan=0.6)
HARSH = Condition("harsh scan", jitter=True, borders=0.9, scan=1.0)
TRAIN = Condition("train", jitter=True, borders=0.5, scan=1.0)
# A box cut inside its printed border, as the pipeline cuts scans: no border, the digit often
# touching or running past the crop's edges.
CROP = Condition("inset crop", jitter=True, borders=0.0, scan=1.0, fill=(0.55, 1.0), clip=True)


def _cell_size(rng: np.random.Generator, jitter: bool) -> tuple[int, int]:
    if not jitter:
        return CELL_W, CELL_H
    s = rng.uniform(0.85, 1.15)
    return round(CELL_W * s * rng.uniform(0.9, 1.1)), round(CELL_H * s)


def _pen_transform(rng: np.random.Generator, jitter: bool) -> np.ndarray:
    """2x2 linear map for slant and rotation of the trajectory."""
    if not jitter:
        return np.eye(2)
    shear = rng.uniform(-0.3, 0.3)
    ang = np.deg2rad(rng.uniform(-8, 8))
    sx = rng.uniform(0.8, 1.2)  # narrow or wide writing
    rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    return rot @ np.array([[sx, shear], [0.0, 1.0]])


def pen_cell(
    strokes: Sequence[np.ndarray], rng: np.random.Generator, cond: Condition = CLEAN
) -> np.ndarray:
    """Render a pen trajectory (any units, y down) into one box cell."""
    w, h = _cell_size(rng, cond.jitter)
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes]
    allp = np.vstack(arrays)
    centre = (allp.min(axis=0) + allp.max(axis=0)) / 2
    m = _pen_transform(rng, cond.jitter)
    pts = [(a - centre) @ m.T for a in arrays]
    if cond.jitter:
        ext = float(np.ptp(allp[:, 1])) or 1.0
        # A smooth random warp (two low-frequency waves) imitates how other
        # writers bend the same shape; then a small per-point tremor.
        k = rng.normal(0, 0.6, (2, 2)) / ext
        phase = rng.uniform(0, 2 * np.pi, 2)
        amp = rng.uniform(0, 0.06, 2) * ext
        pts = [p + amp * np.sin(2 * np.pi * (p @ k.T) + phase) for p in pts]
        pts = [p + rng.normal(0, 0.012 * ext, p.shape) for p in pts]
    allt = np.vstack(pts)
    lo, hi = allt.min(axis=0), allt.max(axis=0)
    ext = np.maximum(hi - lo, 1e-6)
    frac = rng.uniform(*cond.fill) if cond.jitter else 0.7
    scale = min(frac * h / ext[1], (0.95 if cond.clip else 0.8) * w / ext[0])
    pen = PEN_WIDTH_PX * (rng.uniform(0.5, 1.6) if cond.jitter else 1.0)
    size = ext * scale
    free = np.array([w, h]) - size - pen
    if cond.clip:
        # Anywhere from flush against one edge to a little past it.
        offset = rng.uniform(-0.08, 1.08, 2) * np.maximum(free, 0) + np.minimum(free, 0) * rng.uniform(0, 1, 2)
    else:
        free = np.maximum(free, 0)
        offset = rng.uniform(0.2, 0.8, 2) * free if cond.jitter else free / 2
    origin = offset + pen / 2 - lo * scale
    placed = [p * scale + origin for p in pts]
    img = render_strokes(placed, (w, h), pen, ink=0, paper=255)
    return finish(img, rng, cond)


def elastic(
    img: np.ndarray, rng: np.random.Generator, alpha: float = 34.0, sigma: float = 4.0
) -> np.ndarray:
    """Simard-style elastic distortion of a small image (for MNIST training only)."""
    h, w = img.shape
    dx = (
        cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma)
        * alpha
    )
    dy = (
        cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma)
        * alpha
    )
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img, gx + dx, gy + dy, cv2.INTER_LINEAR, borderValue=0)


def mnist_cell(
    image: np.ndarray,
    rng: np.random.Generator,
    cond: Condition = CLEAN,
    *,
    distort: bool = False,
) -> np.ndarray:
    """Put an MNIST image (28x28, white on black) into a box cell, dark on white."""
    img = image.astype(np.float32)
    if distort:
        img = elastic(img, rng, alpha=rng.uniform(20, 36), sigma=4.0)
        shear = rng.uniform(-0.25, 0.25)
        m = np.array(
            [[1 + rng.uniform(-0.15, 0.15), shear, -shear * 14], [0, 1, 0]], np.float32
        )
        img = cv2.warpAffine(img, m, (28, 28), flags=cv2.INTER_LINEAR, borderValue=0)
        # Thinner or bolder strokes: pen and scanner differ from NIST's.
        k = rng.integers(0, 3)
        if k == 1:
            img = cv2.erode(img, np.ones((2, 2), np.uint8))
        elif k == 2:
            img = cv2.dilate(img, np.ones((2, 2), np.uint8))
    w, h = _cell_size(rng, cond.jitter)
    # MNIST digits fill a 20 px box inside 28 px.
    frac = rng.uniform(*cond.fill) if cond.jitter else 0.7
    s = frac * h / 20.0
    big = cv2.resize(
        img,
        (max(1, round(28 * s)), max(1, round(28 * s))),
        interpolation=cv2.INTER_CUBIC,
    )
    big = np.clip(big / 255.0, 0, 1)
    cell = np.zeros((h, w), np.float32)
    bh, bw = big.shape
    # Place the 28-px frame so the 20-px digit lands inside the cell.
    pad = 4 * s
    free_x, free_y = w - 20 * s, h - 20 * s
    if cond.clip:
        ox = -pad + rng.uniform(-0.08, 1.08) * max(free_x, 0) + min(free_x, 0) * rng.uniform(0, 1)
        oy = -pad + rng.uniform(-0.08, 1.08) * max(free_y, 0) + min(free_y, 0) * rng.uniform(0, 1)
    elif cond.jitter:
        ox = -pad + rng.uniform(0.2, 0.8) * max(free_x, 0)
        oy = -pad + rng.uniform(0.2, 0.8) * max(free_y, 0)
    else:
        ox, oy = (w - bw) / 2, (h - bh) / 2
    m = np.array([[1, 0, ox], [0, 1, oy]], np.float32)
    cell = cv2.warpAffine(
        big.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR, borderValue=0
    )
    out = 255.0 * (1 - cell)
    return finish(np.clip(out, 0, 255).astype(np.uint8), rng, cond)


def empty_cell(rng: np.random.Generator, cond: Condition = TRAIN) -> np.ndarray:
    """A box with no digit: paper, maybe border remnants, dust, scan artefacts."""
    w, h = _cell_size(rng, True)
    img = np.full((h, w), 255, np.uint8)
    if rng.random() < 0.3:
        # Dust and tiny specks.
        for _ in range(rng.integers(1, 5)):
            c = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            cv2.circle(
                img,
                c,
                int(rng.integers(0, 3)),
                int(rng.integers(60, 200)),
                -1,
                cv2.LINE_AA,
            )
    if rng.random() < 0.15:
        # A faint smudge (erased pencil, shadow).
        c = (int(rng.integers(10, w - 10)), int(rng.integers(10, h - 10)))
        ax = (int(rng.integers(5, 20)), int(rng.integers(5, 20)))
        cv2.ellipse(
            img,
            c,
            ax,
            float(rng.uniform(0, 180)),
            0,
            360,
            int(rng.integers(225, 245)),
            -1,
            cv2.LINE_AA,
        )
    # An inset crop (``cond.clip``) keeps no border; any other crop mostly does.
    borders = 0.0 if cond.clip else max(cond.borders, 0.8)
    cond = Condition(cond.name, jitter=True, borders=borders, scan=max(cond.scan, 0.3), clip=cond.clip)
    return finish(img, rng, cond)


def _draw_borders(img: np.ndarray, rng: np.random.Generator) -> None:
    """Draw the parts of the box's printed border that a crop typically leaves."""
    h, w = img.shape
    grey = int(rng.integers(0, 170))
    thick = int(rng.integers(1, 5))
    for side in range(4):
        if rng.random() < 0.45:
            continue
        horizontal = side < 2
        length = w if horizontal else h
        off = rng.uniform(-thick, 0.07 * (h if horizontal else w))
        # The border spans the whole box: a remnant is cut short only where
        # a tilted border leaves the crop, i.e. close to the edge.
        cut = 0.0
        if off < 0.03 * (h if horizontal else w) and rng.random() < 0.3:
            cut = rng.uniform(0, 0.6) * length
        a, b = (cut, length) if rng.random() < 0.5 else (0.0, length - cut)
        pos = off if side % 2 == 0 else (h if horizontal else w) - 1 - off
        if horizontal:
            p0, p1 = (a, pos), (b, pos)
        else:
            p0, p1 = (pos, a), (pos, b)
        cv2.line(
            img,
            (round(p0[0] * 16), round(p0[1] * 16)),
            (round(p1[0] * 16), round(p1[1] * 16)),
            grey,
            thick,
            cv2.LINE_AA,
            4,
        )


def finish(img: np.ndarray, rng: np.random.Generator, cond: Condition) -> np.ndarray:
    """Add box borders and the scan simulation to a dark-on-white cell."""
    img = img.copy()
    if cond.borders and rng.random() < cond.borders:
        _draw_borders(img, rng)
    k = cond.scan
    if k <= 0:
        return img
    h, w = img.shape
    f = img.astype(np.float32)
    # Geometry: rotation +-5 deg, scale 90-110 %, small shift (page misregistration).
    ang = rng.uniform(-5, 5) * k
    sc = 1 + rng.uniform(-0.1, 0.1) * k
    m = cv2.getRotationMatrix2D((w / 2, h / 2), ang, sc)
    m[:, 2] += rng.uniform(-3, 3, 2) * k
    f = cv2.warpAffine(
        f, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    # Resolution loss: scanned at a lower dpi, then resampled to the page.
    if rng.random() < 0.4 * k:
        r = rng.uniform(0.45, 0.85)
        small = cv2.resize(
            f,
            (max(8, round(w * r)), max(8, round(h * r))),
            interpolation=cv2.INTER_AREA,
        )
        f = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    # Optics blur.
    sigma = rng.uniform(0, 1.4) * k
    if sigma > 0.2:
        f = cv2.GaussianBlur(f, (0, 0), sigma)
    # Paper and ink levels (grey paper, grey ink, low contrast).
    paper = 255 - rng.uniform(0, 80) * k
    ink = rng.uniform(0, 110) * k
    f = ink + (paper - ink) * (f / 255.0)
    # Uneven illumination.
    if rng.random() < 0.5 * k:
        gx = np.linspace(-1, 1, w, dtype=np.float32)[None, :] * rng.uniform(-12, 12)
        gy = np.linspace(-1, 1, h, dtype=np.float32)[:, None] * rng.uniform(-12, 12)
        f = f + gx + gy
    # Sensor noise.
    f = f + rng.normal(0, rng.uniform(0, 12) * k, f.shape).astype(np.float32)
    out = np.clip(np.rint(f), 0, 255).astype(np.uint8)
    # JPEG artefacts.
    if rng.random() < 0.8 * k:
        q = int(rng.uniform(25, 90))
        ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, q])
        if ok:
            out = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return out
