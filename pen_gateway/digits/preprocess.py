"""Shared preprocessing: one form-box crop -> one model input.

This module owns the only transformation from a cell (a grayscale uint8 crop
of one comb-field box, dark ink on light paper, any size) to the network's
input (float32 ``INPUT_SIZE x INPUT_SIZE``, ink = 1, paper = 0, MNIST-style:
the digit's longer side is ``DIGIT_SIZE`` px and its centre of mass is at the
centre). Training renders every sample into a box-sized cell and then calls
this same function, so the training and run-time domains match exactly.

It also owns the rule-based emptiness test: after box-border remnants and
specks are removed, a cell with too little ink left is empty. The network has
an extra "empty" class for what this rule lets through.

numpy and OpenCV only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

# What a cell is, which decides what printed lines it may hold:
# "box": cut on the box, may hold remnants of its printed border anywhere near its edges;
# "inset": cut inside the printed border (the pipeline's scans): only a page aligned badly
#          brings a line in, and then it hugs an edge;
# "ink": drawn from pen strokes alone (InkML): nothing printed at all.
Crop = Literal["box", "inset", "ink"]
INPUT_SIZE = 28
DIGIT_SIZE = 20
WORK_HEIGHT = 96  # every cell is rescaled to this height first, so the rules below are in fixed px
MIN_CONTRAST = 60.0  # grey levels; keeps paper noise from being stretched into "ink"
MIN_INK_DELTA = (
    24.0  # a pixel must be at least this much darker than paper to count as ink
)
INK_LEVEL = 0.45  # ... and darker than this share of the cell's contrast (its 99.5th percentile of darkness)
BORDER_LEVEL = 0.2  # printed lines are sought down to this share: they are often lighter than pen ink
EDGE_BAND = 0.2  # fraction of each side where box-border remnants may lie
LINE_MIN_LENGTH = 0.30  # a border remnant hugging the edge is a straight run over this fraction of the side
LINE_LONG = 0.85  # ... and one further in (up to EDGE_BAND) must span the crop
EDGE_HUG = 0.10  # fraction of the side counted as hugging the edge
MIN_COMPONENT_AREA = 12  # px at WORK_HEIGHT; smaller blobs are dust or noise
EMPTY_MIN_AREA = 40  # px at WORK_HEIGHT; less ink than this in total -> empty
EMPTY_MIN_EXTENT = (
    0.16  # fraction of WORK_HEIGHT; a mark whose bbox is smaller -> empty
)


@dataclass(frozen=True)
class Prepared:
    """A cell ready for the network."""

    image: np.ndarray  # float32 (INPUT_SIZE, INPUT_SIZE), ink 1.0 on 0.0
    empty: bool  # True when the rule found no digit-sized ink
    ink_pixels: int  # ink pixels kept (at WORK_HEIGHT scale)


def _to_gray(cell: np.ndarray) -> np.ndarray:
    arr = np.asarray(cell)
    if arr.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if arr.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        arr = cv2.cvtColor(arr, code)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(
            f"expected a non-empty 2-D grayscale cell, got shape {arr.shape}"
        )
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


def _rescale(gray: np.ndarray) -> np.ndarray:
    h, w = gray.shape
    new_w = int(np.clip(round(w * WORK_HEIGHT / h), 16, 4 * WORK_HEIGHT))
    interp = cv2.INTER_AREA if h > WORK_HEIGHT else cv2.INTER_LINEAR
    return cv2.resize(gray, (new_w, WORK_HEIGHT), interpolation=interp)


def _edge_runs(run: np.ndarray, horizontal: bool, crop: Crop) -> np.ndarray:
    """Keep the runs that touch the crop edge and lie in an edge band (inset crops: that span it, hugging the edge)."""
    h, w = run.shape
    n, labels, stats, _ = cv2.connectedComponentsWithStats(run, connectivity=8)
    keep = np.zeros(n, dtype=bool)
    for i in range(1, n):
        x, y, bw, bh, _area = (int(v) for v in stats[i])
        # A border spans the box, so its remnant reaches an end of the crop
        # along its own direction; a stroke merely touching the near edge
        # (the bottom of a large 0) does not.
        if horizontal:
            touches = x <= 2 or x + bw >= w - 2
            mid, side, length = y + bh / 2, h, bw / w
        else:
            touches = y <= 2 or y + bh >= h - 2
            mid, side, length = x + bw / 2, w, bh / h
        edge_dist = min(mid, side - mid) / side
        # Long runs may sit anywhere in the band; shorter ones only hugging the
        # edge (a tilted border leaves the crop through the near edge quickly).
        if edge_dist < EDGE_HUG and crop == "box":
            keep[i] = touches and length >= LINE_MIN_LENGTH
        else:
            # Further in, only a border seen whole (edge to edge) counts: the
            # bar of a 2 or 7 can be long and low but starts inside the box.
            # In an inset crop only one hugging the edge: a wide
            # digit's bar spans the crop too.
            spans = (
                (x <= 2 and x + bw >= w - 2)
                if horizontal
                else (y <= 2 and y + bh >= h - 2)
            )
            keep[i] = edge_dist < (EDGE_HUG if crop == "inset" else EDGE_BAND) and spans and length >= LINE_LONG
    return keep[labels].astype(np.uint8)


def _border_lines(mask: np.ndarray, crop: Crop) -> np.ndarray:
    """Pixels of box-border remnants: long straight runs at the crop edges.

    A printed box border spans the whole box, so whatever part of it a crop
    keeps runs into the crop edge; a digit's straight stroke (the bar of a 7)
    rarely does. The mask is first smeared across the run direction by a few
    px so that a line tilted by a few degrees (scan rotation) still forms one
    continuous run.
    """
    h, w = mask.shape
    grow = np.ones((5, 5), np.uint8)  # also eats the anti-aliased halo of the line
    smear = cv2.dilate(mask, np.ones((5, 1), np.uint8))
    run = cv2.morphologyEx(
        smear,
        cv2.MORPH_OPEN,
        np.ones((1, max(3, round(LINE_MIN_LENGTH * w))), np.uint8),
    )
    lines = cv2.dilate(_edge_runs(run, horizontal=True, crop=crop), grow)
    smear = cv2.dilate(mask, np.ones((1, 5), np.uint8))
    run = cv2.morphologyEx(
        smear,
        cv2.MORPH_OPEN,
        np.ones((max(3, round(LINE_MIN_LENGTH * h)), 1), np.uint8),
    )
    lines |= cv2.dilate(_edge_runs(run, horizontal=False, crop=crop), grow)
    return lines


def _apart(lines: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The border lines (``_border_lines``) that stand apart from the rest of the ink.

    An inset crop holds a printed border only when the page is aligned badly, and then the line
    runs on its own along an edge. The base of a 2, the bar of a 7 or the foot of a 1 written
    along the crop's edge are joined to the rest of the digit, so they stay. (A digit written
    touching a border that a misaligned page brought in keeps the border too: the form's sums
    catch what that misreads.)
    """
    n, labels = cv2.connectedComponents(lines, connectivity=8)
    if n <= 1:
        return lines
    strokes, stroke_labels = cv2.connectedComponents(mask, connectivity=8)
    # How much of each stroke lies outside every line: a line reached by a stroke that holds a
    # speck's worth of ink beyond it belongs to the digit.
    beyond = np.bincount(stroke_labels[(mask > 0) & (lines == 0)], minlength=strokes)
    joined = np.zeros(n, dtype=bool)
    for line in range(1, n):
        reaching = np.unique(stroke_labels[(labels == line) & (mask > 0)])
        joined[line] = bool(np.any(beyond[reaching[reaching > 0]] >= MIN_COMPONENT_AREA))
    return np.where(joined[labels], 0, lines).astype(np.uint8)


def prepare(cell: np.ndarray, *, crop: Crop = "box") -> Prepared:
    """Turn one cell into a network input and decide whether it is empty.

    ``crop`` says what may be printed in the cell (see ``Crop``). In an ``"inset"`` crop, ink
    touching an edge is the digit running past the crop and is kept whole, not mistaken for a
    border remnant (that rule cut the bar off many 2s and 7s written close to the box's edge);
    only a straight line spanning the whole crop, hugging an edge (``EDGE_HUG``) and joined to
    no other ink (``_apart``) is still taken for a border (a page aligned badly): further in, a
    line from side to side is the base of a 2 or the bar of a 7 written as wide as the crop, and
    along the edge, joined to the digit, it is too. An ``"ink"`` cell keeps every stroke.
    """
    gray = _rescale(_to_gray(cell)).astype(np.float32)
    h, w = gray.shape
    smooth = cv2.GaussianBlur(
        gray, (3, 3), 0.8
    )  # halves pixel noise before thresholding
    paper = float(np.median(smooth))  # ink and borders cover well under half a box
    darkness = paper - smooth  # > 0 where darker than paper
    zeros = np.zeros((INPUT_SIZE, INPUT_SIZE), np.float32)
    if float(darkness.max()) <= max(INK_LEVEL * MIN_CONTRAST, MIN_INK_DELTA):
        # No pixel is ink at the lowest bar any contrast gives: what the rules below would conclude
        # (no ink at all, so empty), without running them on half a form's boxes, blank ones.
        return Prepared(zeros, True, 0)
    contrast = max(float(np.percentile(darkness, 99.5)), MIN_CONTRAST)
    mask = (darkness > max(INK_LEVEL * contrast, MIN_INK_DELTA)).astype(np.uint8)
    # Borders are found on a lower threshold: printed lines are often lighter
    # than pen ink and would otherwise survive as broken dashes.
    faint = (darkness > max(BORDER_LEVEL * contrast, MIN_INK_DELTA)).astype(np.uint8)
    if crop != "ink":
        lines = _border_lines(faint, crop)
        if crop == "inset":
            lines = _apart(lines, mask)
        mask &= 1 - lines
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    band_h, band_w = EDGE_BAND * h, EDGE_BAND * w
    keep = np.zeros(n, dtype=bool)
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < MIN_COMPONENT_AREA:
            continue
        # Fragments lying wholly in one edge band are border corners or ticks.
        if crop == "box" and (x + bw <= band_w or x >= w - band_w or y + bh <= band_h or y >= h - band_h):
            continue
        keep[i] = True
    kept = keep[labels]
    ink_pixels = int(kept.sum())
    if ink_pixels < EMPTY_MIN_AREA:
        return Prepared(zeros, True, ink_pixels)
    ys, xs = np.nonzero(kept)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if max(y1 - y0, x1 - x0) < EMPTY_MIN_EXTENT * WORK_HEIGHT:
        return Prepared(zeros, True, ink_pixels)

    # Soft ink (keeps anti-aliasing) restricted to a halo around kept strokes.
    halo = cv2.dilate(kept.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    ink = np.where(halo, darkness, 0.0)[y0:y1, x0:x1]
    level = float(np.percentile(darkness[kept], 90))
    ink = np.clip(ink / max(level, 1.0), 0.0, 1.0).astype(np.float32)

    ch, cw = ink.shape
    scale = DIGIT_SIZE / max(ch, cw)
    nh, nw = max(1, round(ch * scale)), max(1, round(cw * scale))
    small = cv2.resize(ink, (nw, nh), interpolation=cv2.INTER_AREA)
    total = float(small.sum())
    if total <= 0:
        return Prepared(zeros, True, ink_pixels)
    # Centre of mass to the centre (as MNIST was built), clamped inside the frame.
    cy = float((small.sum(axis=1) * np.arange(nh)).sum() / total)
    cx = float((small.sum(axis=0) * np.arange(nw)).sum() / total)
    top = int(np.clip(round(INPUT_SIZE / 2 - 0.5 - cy), 0, INPUT_SIZE - nh))
    left = int(np.clip(round(INPUT_SIZE / 2 - 0.5 - cx), 0, INPUT_SIZE - nw))
    out = zeros.copy()
    out[top : top + nh, left : left + nw] = small
    return Prepared(out, False, ink_pixels)


def prepare_batch(cells: Sequence[np.ndarray], *, crop: Crop = "box") -> tuple[np.ndarray, np.ndarray]:
    """(inputs float32 (N, 1, INPUT_SIZE, INPUT_SIZE), empty bool (N,))."""
    prepared = [prepare(c, crop=crop) for c in cells]
    x = np.zeros((len(prepared), 1, INPUT_SIZE, INPUT_SIZE), np.float32)
    for i, p in enumerate(prepared):
        x[i, 0] = p.image
    return x, np.array([p.empty for p in prepared], dtype=bool)
