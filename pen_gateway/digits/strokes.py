"""Rendering of pen strokes into grayscale images (dark ink on white paper).

This module owns the one way Remontée turns stylus trajectories into pixels:
the pen gateway uses it to render InkML pages, the digit trainer and the
benchmark use it to render UCI pendigits samples into form boxes. It needs only
numpy and OpenCV.

A stroke is a sequence of ``[x, y]`` points (pixels, y pointing down) for one
pen-down. Coordinates may be floats; lines are drawn anti-aliased with
sub-pixel precision by supersampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

Stroke = Sequence[Sequence[float]]

__all__ = ["Stroke", "fit_strokes", "render_strokes", "smooth_stroke"]


def smooth_stroke(points: np.ndarray, subdivisions: int = 4) -> np.ndarray:
    """Return a Catmull-Rom interpolation of a polyline through ``points``.

    Tablets such as the one used for pendigits sample only every 100 ms, so a
    raw polyline shows visible corners on curves; a centripetal-free uniform
    Catmull-Rom spline passes through every sample and rounds those corners.
    """
    pts = np.asarray(points, dtype=np.float64)
    if len(pts) < 3 or subdivisions <= 1:
        return pts
    padded = np.vstack([pts[:1], pts, pts[-1:]])
    t = np.linspace(0.0, 1.0, subdivisions, endpoint=False)[:, None]
    t2, t3 = t * t, t * t * t
    # Every segment at once (each point's neighbours as four shifted views): the same arithmetic, in
    # the same order, as one segment at a time, without a Python step per point of a long stroke.
    p0, p1, p2, p3 = (padded[k : len(padded) - 3 + k, None, :] for k in range(4))
    seg = 0.5 * (
        2 * p1
        + (-p0 + p2) * t
        + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
        + (-p0 + 3 * p1 - 3 * p2 + p3) * t3
    )
    return np.vstack([seg.reshape(-1, 2), pts[-1:]])


def fit_strokes(
    strokes: Sequence[Stroke],
    size: tuple[int, int],
    margin: float = 0.15,
) -> list[np.ndarray]:
    """Scale and centre ``strokes`` into a ``size = (width, height)`` image.

    The aspect ratio is kept; the longer side of the ink's bounding box spans
    ``1 - 2 * margin`` of the matching image side.
    """
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in strokes if len(s)]
    if not arrays:
        return []
    allp = np.vstack(arrays)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    extent = np.maximum(hi - lo, 1e-6)
    w, h = size
    scale = min(w * (1 - 2 * margin) / extent[0], h * (1 - 2 * margin) / extent[1])
    centre_src = (lo + hi) / 2
    centre_dst = np.array([w / 2, h / 2])
    return [(a - centre_src) * scale + centre_dst for a in arrays]


def render_strokes(
    strokes: Sequence[Stroke],
    size: tuple[int, int],
    pen_width: float = 6.0,
    *,
    ink: int = 0,
    paper: int = 255,
    smooth: bool = True,
    supersample: int = 4,
) -> np.ndarray:
    """Draw ``strokes`` (pixel coordinates) into a new ``size = (width, height)`` image.

    ``pen_width`` is in output pixels and may be fractional (0.5 mm at 300 dpi
    is about 6 px). Returns a uint8 array of shape ``(height, width)`` with
    ``ink`` on ``paper``; anti-aliased edges take intermediate grey values.
    """
    w, h = size
    ss = max(1, int(supersample))
    # Draw the ink coverage as white-on-black at ``ss`` times the resolution,
    # then average down: this gives fractional pen widths and sub-pixel
    # positions, which cv2.polylines alone (integer thickness) cannot.
    canvas = np.zeros((h * ss, w * ss), dtype=np.uint8)
    thickness = max(1, round(pen_width * ss))
    shift = 4  # cv2 fixed-point bits for sub-pixel coordinates
    for stroke in strokes:
        pts = np.asarray(stroke, dtype=np.float64).reshape(-1, 2)
        if len(pts) == 0:
            continue
        if smooth:
            pts = smooth_stroke(pts)
        # Output pixel i (centre at i) covers samples i*ss .. i*ss+ss-1.
        fixed = np.round((pts * ss + (ss - 1) / 2) * (1 << shift)).astype(np.int32)
        if len(fixed) == 1 or np.all(fixed == fixed[0]):
            cv2.circle(
                canvas,
                tuple(int(v) for v in fixed[0]),
                max(1, thickness // 2) << shift,
                255,
                -1,
                cv2.LINE_AA,
                shift,
            )
        else:
            cv2.polylines(
                canvas,
                [fixed.reshape(-1, 1, 2)],
                False,
                255,
                thickness,
                cv2.LINE_AA,
                shift,
            )
    cover = (
        cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
        / 255.0
    )
    out = paper + (ink - paper) * cover
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
