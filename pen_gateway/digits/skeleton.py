"""Strokes traced from a digit's picture, so that a stroke-order model can read scans too (numpy + OpenCV only).

A scan has no pen trajectory, but its ink has a centre line. ``traced_strokes`` thins the
network's inputs (``preprocess.prepare``'s 28 x 28 pictures, doubled; a batch at once) to
one-pixel skeletons (Zhang & Suen, 1984) and walks each into strokes: each walk starts at the
free end nearest the top left (a closed loop, such as a 0, at its top, heading left, as people
write it), goes as straight as it can through crossings (across the knot a crossing thins to,
when the other line has taken its pixels), and ends where the skeleton does; the walk that
follows starts again where ink is left. The result is not how the digit was written, but it is the same
for the same shape, which is all ``traced.onnx`` (trained on such strokes, ``train_traced.py``)
needs. Strokes are in pixels of the doubled picture, x right and y down.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

SCALE = 2  # the 28 px input is doubled first: its strokes are 2-3 px wide, too thin to thin well
LEVEL = 0.35  # ink level (the input is 0-1) above which a pixel is ink
MIN_POINTS = 2 * SCALE  # a walk shorter than this is a thinning artefact (a spur), not a stroke
# Zhang-Suen's neighbours P2..P9, clockwise from north, as (dy, dx).
_RING = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))

__all__ = ["thin", "trace", "traced_strokes"]


def _removable(first: bool) -> np.ndarray:
    """Zhang-Suen's rule as a table: which of the 256 neighbourhoods (bit i = neighbour P(i+2)) lets a pixel go."""
    table = np.zeros(256, bool)
    for code in range(256):
        n = [(code >> i) & 1 for i in range(8)]
        transitions = sum(n[i] == 0 and n[(i + 1) % 8] == 1 for i in range(8))
        if first:
            corner = n[0] * n[2] * n[4] == 0 and n[2] * n[4] * n[6] == 0
        else:
            corner = n[0] * n[2] * n[6] == 0 and n[0] * n[4] * n[6] == 0
        table[code] = 2 <= sum(n) <= 6 and transitions == 1 and corner
    return table


_REMOVABLE = (_removable(True), _removable(False))


def thin(mask: np.ndarray) -> np.ndarray:
    """The one-pixel skeleton of a boolean mask, or of each of a stack of masks (..., H, W) at once
    (Zhang-Suen thinning: each sub-iteration looks every ink pixel's neighbourhood up in its table)."""
    img = np.pad(mask.astype(np.uint8), [(0, 0)] * (mask.ndim - 2) + [(1, 1), (1, 1)])
    ink = np.nonzero(img)
    changed = True
    while changed:
        changed = False
        for table in _REMOVABLE:
            code = np.zeros(len(ink[0]), np.uint8)
            for bit, (dy, dx) in enumerate(_RING):
                code |= img[(*ink[:-2], ink[-2] + dy, ink[-1] + dx)] << bit
            remove = table[code]
            if remove.any():
                img[tuple(a[remove] for a in ink)] = 0
                ink = tuple(a[~remove] for a in ink)
                changed = True
    return img[..., 1:-1, 1:-1].astype(bool)


def _edges(skeleton: np.ndarray) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """Each skeleton pixel's neighbours, (y, x); a diagonal step is left out where two straight ones make it."""
    pixels = set(zip(*(a.tolist() for a in np.nonzero(skeleton)), strict=True))
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for y, x in sorted(pixels):
        out[(y, x)] = [
            (y + dy, x + dx)
            for dy, dx in _RING
            if (y + dy, x + dx) in pixels
            and not (dy and dx and ((y + dy, x) in pixels or (y, x + dx) in pixels))
        ]
    return out


def trace(skeleton: np.ndarray, min_points: int = MIN_POINTS) -> list[np.ndarray]:
    """Walk a skeleton into strokes ((k, 2) float arrays of x, y), each edge once (see the module's docstring)."""
    unwalked = _edges(skeleton)  # each pixel's neighbours it has not been walked to or from yet
    strokes = []
    while alive := [p for p, nbrs in unwalked.items() if nbrs]:
        ends = [p for p in alive if len(unwalked[p]) == 1]
        path = [min(ends or alive, key=lambda p: (p[0] + 0.5 * p[1], p[0], p[1]))]
        while True:
            y, x = path[-1]
            hy, hx = y - path[max(0, len(path) - 4)][0], x - path[max(0, len(path) - 4)][1]
            options = unwalked[path[-1]]
            if not options:
                # At a crossing the other line's pixels may have taken the way on: carry on across it.
                options = [q for q in _ahead(y, x, hy, hx) if unwalked.get(q)] if len(path) > 3 else []
                if not options:
                    break
                path.append(options[0])
                continue
            if len(path) == 1:
                # Leaving the start: leftwards first (a loop's top is written anticlockwise), then upwards.
                nxt = min(options, key=lambda q: (q[1] - x, q[0] - y))
            else:
                # Straight on: the step closest to the heading over the last few pixels.
                nxt = min(options, key=lambda q: -((q[0] - y) * hy + (q[1] - x) * hx) / math.hypot(q[0] - y, q[1] - x))
            unwalked[path[-1]].remove(nxt)
            unwalked[nxt].remove(path[-1])
            path.append(nxt)
        if len(path) >= min_points:
            strokes.append(np.array([(px, py) for py, px in path], dtype=np.float64))
    return strokes


def _ahead(y: int, x: int, hy: int, hx: int) -> list[tuple[int, int]]:
    """The pixels at most two steps away within 45 degrees of the heading, nearest and straightest first."""
    norm = math.hypot(hy, hx) or 1.0
    out = []
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            d = math.hypot(dy, dx)
            cos = (dy * hy + dx * hx) / (norm * d) if d else -1.0
            if cos >= 0.7:
                out.append((d - cos, (y + dy, x + dx)))
    return [q for _, q in sorted(out)]


def traced_strokes(images: np.ndarray, chunk: int = 1000) -> list[list[np.ndarray]]:
    """The strokes of each prepared digit picture (N, 28, 28), float, ink 1 on 0; [] for one with no stroke.

    The pictures are enlarged and thinned `chunk` at a time (each is thinned on its own, so the
    chunk changes nothing but the memory a training set's 60,000 pictures take)."""
    images = np.asarray(images, np.float32)
    out: list[list[np.ndarray]] = []
    for i in range(0, len(images), chunk):
        big = np.stack([cv2.resize(im, None, fx=SCALE, fy=SCALE, interpolation=cv2.INTER_LINEAR)
                        for im in images[i : i + chunk]])
        out.extend(trace(skeleton) for skeleton in thin(big > LEVEL))
    return out
