"""Cutting the comb boxes out of a page: one grayscale crop per box, dark ink on light paper, at 300 dpi.

A scan's box is cut straight through the fitted homography and inset so the printed border
stays out. An InkML page has no border and no distortion: each stroke goes to the box its
middle lies in, and the box is drawn from its own strokes (a digit that spills over the
printed line is kept whole), with the pen width of a ballpoint, as the digit model saw in training.
Ink that runs through boxes it was not written in (a line striking figures out, a cross voiding
the sheet) is in no box's picture, so `crossed_fields` says where it is, for a human to look.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from forms.layout import CELL_GAP_MM, Box, FieldLayout, FormLayout
from pen_gateway.digits.strokes import render_strokes
from pen_gateway.recognition.align import Alignment, warp_region

CELL_PX_PER_MM = 300 / 25.4  # the digit model was trained on boxes cut from 300 dpi pages
CELL_INSET_MM = 0.7  # border line (0.3 mm) + alignment error (< 0.1 mm measured) + margin
PEN_WIDTH_MM = 0.5
STROKE_REACH_MM = (CELL_GAP_MM / 2, 3.0)  # how far outside a box a stroke's middle may lie and still be its own
# How far an ink box grows past its printed edges to keep a digit that spills over them. A stroke that
# reaches further (a line across the form, a corrupt or hostile coordinate) is cut there: the box stays
# a box's size, not metres of canvas.
INK_SPILL_MM = 8.0
# How deep into a box a stroke written elsewhere must run to be crossing it: deeper than a digit that strays
# over its own box's printed line and across the 2 mm gap.
CROSSING_DEPTH_MM = 2.0
_SEGMENTS_AT_ONCE = 4096  # a stroke's segments tested against every box at once, this many at a time
# Ink beside a comb, this far from its boxes at least (a digit straying over its box's line is the box's own),
# as big as a pen's dot of 0.7 mm at least (the printed dotted leader is not), sends the field to a human.
STRAY_CLEARANCE_MM = 2.0
STRAY_REACH_MM = 14.0  # a digit or two written before the comb
LABEL_CHAR_MM = 3.0  # the widest a character of the printed label takes (DejaVu Sans at 4 mm: 'M' 3.5, most 2-2.8)
STRAY_MIN_AREA_MM2 = 0.4
PAGE_EDGE_MM = 205.0
FIELD_MARGIN_MM = 2.0  # around a field's boxes in the reviewer's crop
PAGE_PX_PER_MM = 5.0  # page.png: enough for a reviewer to read the form, small enough to send quickly


def inset(box: Box, by: float) -> Box:
    x, y, w, h = box
    return (x + by, y + by, w - 2 * by, h - 2 * by)


def grow(box: Box, by: float) -> Box:
    return inset(box, -by)


def scan_cells(gray: np.ndarray, alignment: Alignment, field: FieldLayout) -> list[np.ndarray]:
    return [warp_region(gray, alignment, inset(cell, CELL_INSET_MM), CELL_PX_PER_MM) for cell in field.cells]


def scan_field_crop(gray: np.ndarray, alignment: Alignment, field: FieldLayout) -> np.ndarray:
    return warp_region(gray, alignment, grow(field.bounds, FIELD_MARGIN_MM), CELL_PX_PER_MM / 2)


def scan_page_image(gray: np.ndarray, alignment: Alignment, layout: FormLayout) -> np.ndarray:
    """The straightened page, for the reviewer."""
    return warp_region(gray, alignment, (0.0, 0.0, layout.width_mm, layout.height_mm), PAGE_PX_PER_MM)


class _Boxes:
    """Every box of the form, in field order, as arrays: where strokes are placed and what they cross."""

    def __init__(self, layout: FormLayout) -> None:
        cells = [((f.id, i), cell) for f in layout.fields for i, cell in enumerate(f.cells)]
        self.keys = [key for key, _ in cells]
        self.centres = np.array([(x + w / 2, y + h / 2) for _, (x, y, w, h) in cells])
        self.reach = np.array([(w / 2 + STROKE_REACH_MM[0], h / 2 + STROKE_REACH_MM[1]) for _, (_, _, w, h) in cells])
        insides = [inset(cell, CROSSING_DEPTH_MM) for _, cell in cells]
        self.insides = np.array([(x, y, x + w, y + h) for x, y, w, h in insides])

    def owner(self, stroke: np.ndarray) -> int | None:
        """The box a stroke was written in: the nearest whose reach holds the middle of its extent; None if none."""
        middle = (stroke.min(axis=0) + stroke.max(axis=0)) / 2
        offset = np.abs(self.centres - middle)
        inside = np.all(offset <= self.reach, axis=1)
        if not inside.any():
            return None
        # Boxes' reaches overlap by design (gaps and rows): the nearest centre wins.
        distance = np.where(inside, np.hypot(offset[:, 0], offset[:, 1]), np.inf)
        return int(np.argmin(distance))

    def entered(self, stroke: np.ndarray) -> np.ndarray:
        """Which boxes' insides (N,) the stroke's path runs through: its segments, not only its sampled points.

        Each segment a + t(b - a), t in [0, 1], is clipped to each inside, one axis at a time (Liang-Barsky);
        a point (a one-point stroke) is a segment of no length."""
        hit = np.zeros(len(self.keys), dtype=bool)
        ends = np.asarray(stroke, dtype=np.float64)
        # Only boxes whose inside meets the stroke's extent can be entered (most strokes: their own box alone).
        near = np.all((self.insides[:, :2] <= ends.max(axis=0)) & (self.insides[:, 2:] >= ends.min(axis=0)), axis=1)
        if not near.any():
            return hit
        lo, hi = self.insides[None, near, :2], self.insides[None, near, 2:]
        for k in range(0, max(1, len(ends) - 1), _SEGMENTS_AT_ONCE):
            a = ends[k : k + _SEGMENTS_AT_ONCE + 1]
            a, b = (a[:-1], a[1:]) if len(a) > 1 else (a, a)
            a, d = a[:, None, :], (b - a)[:, None, :]
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                t_lo, t_hi = (lo - a) / d, (hi - a) / d
                within = (a >= lo) & (a <= hi)  # what a segment along an axis (d = 0) decides alone
                enter = np.where(d == 0, np.where(within, -np.inf, np.inf), np.minimum(t_lo, t_hi))
                leave = np.where(d == 0, np.where(within, np.inf, -np.inf), np.maximum(t_lo, t_hi))
                first, last = np.maximum(enter.max(axis=2), 0.0), np.minimum(leave.min(axis=2), 1.0)
            hit[near] |= (first <= last).any(axis=0)
        return hit


def assign_strokes(strokes: Sequence[np.ndarray], layout: FormLayout) -> dict[tuple[str, int], list[np.ndarray]]:
    """{(field id, box index): the strokes written in that box}; strokes outside every box (a signature) are dropped."""
    boxes = _Boxes(layout)
    out: dict[tuple[str, int], list[np.ndarray]] = {}
    for stroke in strokes:
        owner = boxes.owner(stroke) if len(stroke) else None
        if owner is not None:
            out.setdefault(boxes.keys[owner], []).append(stroke)
    return out


def crossed_fields(strokes: Sequence[np.ndarray], layout: FormLayout) -> set[str]:
    """The fields with a box that ink written elsewhere runs through (`CROSSING_DEPTH_MM` deep at least).

    A line striking a row of figures out, a cross over the sheet: their middle lies in no box, or in one
    box they run far beyond, and a box is drawn from its own strokes only, so the figures read as if
    nothing crossed them. A digit sprawling into its neighbour's box is counted too: whose is it?"""
    boxes = _Boxes(layout)
    crossed: set[str] = set()
    for stroke in strokes:
        if len(stroke) == 0:
            continue
        entered = boxes.entered(stroke)
        owner = boxes.owner(stroke)
        if owner is not None:
            entered[owner] = False
        crossed.update(boxes.keys[k][0] for k in np.flatnonzero(entered))
    return crossed


def _row_margins(field: FieldLayout) -> tuple[Box, Box]:
    """The field's row beside its comb: left of it, past the printed label (its text at most `LABEL_CHAR_MM` a
    character), up to `STRAY_REACH_MM`, and right of it to the page's edge. No figure belongs there: ink there is
    a digit that did not fit the boxes, or a figure written beside them."""
    x0, y, w, h = field.bounds
    start = max(x0 - STRAY_REACH_MM, field.label_box[0] + LABEL_CHAR_MM * len(field.label) + 1.0)
    left = (start, y, max(0.0, x0 - STRAY_CLEARANCE_MM - start), h)
    right = (x0 + w + STRAY_CLEARANCE_MM, y, PAGE_EDGE_MM - (x0 + w + STRAY_CLEARANCE_MM), h)
    return left, right


def stray_ink_fields(strokes: Sequence[np.ndarray], layout: FormLayout) -> set[str]:
    """The fields in whose row, beside the comb, pen ink lies that no box took (`_row_margins`)."""
    boxes = _Boxes(layout)
    stray: set[str] = set()
    for stroke in strokes:
        if len(stroke) == 0 or boxes.owner(stroke) is not None:
            continue
        middle = (stroke.min(axis=0) + stroke.max(axis=0)) / 2
        for f in layout.fields:
            if any(x <= middle[0] <= x + w and y <= middle[1] <= y + h for x, y, w, h in _row_margins(f)):
                stray.add(f.id)
    return stray


def scan_stray_ink(gray: np.ndarray, alignment: Alignment, field: FieldLayout) -> bool:
    """Whether the scan has ink beside the field's comb (`_row_margins`): a blot bigger than the leader's dots."""
    for margin in _row_margins(field):
        if margin[2] <= 0:
            continue
        crop = warp_region(gray, alignment, margin, CELL_PX_PER_MM)
        count, _, stats, _ = cv2.connectedComponentsWithStats((crop < 128).astype(np.uint8), connectivity=8)
        if any(stats[k, cv2.CC_STAT_AREA] >= STRAY_MIN_AREA_MM2 * CELL_PX_PER_MM**2 for k in range(1, count)):
            return True
    return False


def ink_cell(cell: Box, strokes: Sequence[np.ndarray]) -> np.ndarray:
    """One box drawn from its strokes: the inset box, grown to hold them (at most `INK_SPILL_MM` past the box)."""
    x0, y0, w, h = inset(cell, CELL_INSET_MM)
    x1, y1 = x0 + w, y0 + h
    pad = PEN_WIDTH_MM
    for s in strokes:
        lo, hi = s.min(axis=0), s.max(axis=0)
        x0, y0 = min(x0, lo[0] - pad), min(y0, lo[1] - pad)
        x1, y1 = max(x1, hi[0] + pad), max(y1, hi[1] + pad)
    gx, gy, gw, gh = grow(cell, INK_SPILL_MM)
    x0, y0, x1, y1 = max(x0, gx), max(y0, gy), min(x1, gx + gw), min(y1, gy + gh)
    size = (max(1, round((x1 - x0) * CELL_PX_PER_MM)), max(1, round((y1 - y0) * CELL_PX_PER_MM)))
    if not strokes:
        return np.full((size[1], size[0]), 255, np.uint8)
    placed = [(s - (x0, y0)) * CELL_PX_PER_MM for s in strokes]
    return render_strokes(placed, size, PEN_WIDTH_MM * CELL_PX_PER_MM)


def ink_boxes(strokes: Sequence[np.ndarray], layout: FormLayout) -> dict[str, list[list[np.ndarray]]]:
    """Each field's boxes, as the strokes written in each, in writing order (the stroke-order model reads them)."""
    assigned = assign_strokes(strokes, layout)
    return {f.id: [assigned.get((f.id, i), []) for i in range(len(f.cells))] for f in layout.fields}


def ink_cells(boxes: dict[str, list[list[np.ndarray]]], layout: FormLayout) -> dict[str, list[np.ndarray]]:
    """Each field's boxes drawn from their strokes (`ink_boxes`)."""
    return {f.id: [ink_cell(cell, boxes[f.id][i]) for i, cell in enumerate(f.cells)] for f in layout.fields}


def ink_page_image(strokes: Sequence[np.ndarray], layout: FormLayout) -> np.ndarray:
    """The InkML page drawn over the form's outline (boxes and markers in light grey), for the reviewer."""
    r = PAGE_PX_PER_MM
    page = np.full((round(layout.height_mm * r), round(layout.width_mm * r)), 255, np.uint8)
    outline = [*(f.box for f in layout.fiducials), *(c for f in layout.fields for c in f.cells), layout.signature_box]
    for x, y, w, h in outline:
        cv2.rectangle(page, (round(x * r), round(y * r)), (round((x + w) * r), round((y + h) * r)), 190, 1)
    for s in strokes:
        if len(s):
            pts = np.round(s * r * 16).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(page, [pts], False, 0, max(1, round(PEN_WIDTH_MM * r)), cv2.LINE_AA, 4)
    return page


def ink_field_crop(field: FieldLayout, cells: Sequence[np.ndarray]) -> np.ndarray:
    """The field as the reviewer sees it: its boxes side by side, outlined, at half the reading resolution."""
    height = max(c.shape[0] for c in cells)
    parts = []
    for c in cells:
        c = cv2.copyMakeBorder(c, 0, height - c.shape[0], 0, 0, cv2.BORDER_CONSTANT, value=255)
        c = cv2.copyMakeBorder(c, 2, 2, 2, 2, cv2.BORDER_CONSTANT, value=0)
        parts.append(cv2.copyMakeBorder(c, 0, 0, 0, 12, cv2.BORDER_CONSTANT, value=255))
    joined = np.hstack(parts)
    return cv2.resize(joined, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
