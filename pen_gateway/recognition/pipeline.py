"""Reading one page: locate the form, say which it is, cut the boxes, read the digits, a value per field.

One stage, one function (see STYLE.md): `align_page` → `identify_scan` → `scan_cells` /
`ink_boxes` + `ink_cells` → `DigitRecognizer.read` → `field_reading`. `read_page` chains them for a decoded
upload (`pen_gateway.decode.DecodedPage`: a grayscale scan, or InkML strokes in millimetres)
and returns everything the decision (`assess.py`) and the reviewer's artefacts need. It never
raises for a page it cannot read: it says why in `problem`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from forms.definitions import Election, ElectionDefinitionError, load_election
from forms.layout import FormIdentity, FormLayout, form_layout
from pen_gateway.digits.preprocess import Crop
from pen_gateway.recognition.align import Alignment, AlignmentError, align_page, reduced, to_gray
from pen_gateway.recognition.cells import (
    crossed_fields,
    ink_boxes,
    ink_cells,
    ink_field_crop,
    ink_page_image,
    scan_cells,
    scan_field_crop,
    scan_page_image,
    scan_stray_ink,
    stray_ink_fields,
)
from pen_gateway.recognition.identify import identify_scan


class DigitReadingLike(Protocol):
    """`pen_gateway.digits.recognizer.DigitReading`: digit None for an empty box."""

    @property
    def digit(self) -> int | None: ...
    @property
    def confidence(self) -> float: ...
    @property
    def alternatives(self) -> tuple[tuple[int, float], ...]: ...


class Recognizer(Protocol):
    """`pen_gateway.digits.recognizer.DigitRecognizer`."""

    def read(
        self,
        cells: Sequence[np.ndarray],
        *,
        crop: Crop = "box",
        strokes: Sequence[Sequence[np.ndarray]] | None = None,
    ) -> Sequence[DigitReadingLike]: ...


class PageLike(Protocol):
    """`pen_gateway.decode.DecodedPage`."""

    @property
    def kind(self) -> str: ...
    @property
    def image(self) -> np.ndarray | None: ...
    @property
    def strokes(self) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class FieldReading:
    field_id: str
    value: int | None  # the non-empty boxes read left to right; None when every box is empty
    confidence: float  # the least confident of its boxes (an empty box's confidence is that it is empty)
    digits: tuple[DigitReadingLike, ...]
    gap: bool  # an empty box between two digits: legal, but not what anyone writes on purpose

    @property
    def text(self) -> str:
        return "".join(str(d.digit) for d in self.digits if d.digit is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "confidence": round(float(self.confidence), 6),
            "digits": [
                {
                    "digit": d.digit,
                    "confidence": round(float(d.confidence), 6),
                    "alternatives": [[int(a), round(float(p), 6)] for a, p in d.alternatives],
                }
                for d in self.digits
            ],
        }


@dataclass
class PageReading:
    """What was read from one page, and what the reviewer will see of it."""

    kind: str  # "image" or "ink"
    election: Election | None
    identity: FormIdentity | None  # from the QR or the printed text; None for ink and unidentified scans
    identified_by: str  # "qr", "text" or "none"
    qr_text: str | None
    alignment: Alignment | None
    fields: dict[str, FieldReading] = field(default_factory=dict)
    page_image: np.ndarray | None = None
    field_images: dict[str, np.ndarray] = field(default_factory=dict)
    problem: str | None = None  # why the page could not be read, in French, for the reviewer
    crossed: set[str] = field(default_factory=set)  # fields whose boxes ink written elsewhere runs through (InkML)
    stray: set[str] = field(default_factory=set)  # fields with ink beside their comb, in no box (a digit too many?)

    @property
    def layout(self) -> FormLayout | None:
        return form_layout(self.election) if self.election else None


def field_reading(field_id: str, digits: Sequence[DigitReadingLike]) -> FieldReading:
    """A field's value from its boxes: the concatenation of the non-empty ones, so left-aligned numbers read too."""
    text = "".join(str(d.digit) for d in digits if d.digit is not None)
    filled = [i for i, d in enumerate(digits) if d.digit is not None]
    gap = bool(filled) and len(filled) != filled[-1] - filled[0] + 1
    confidence = min((float(d.confidence) for d in digits), default=0.0)
    return FieldReading(field_id, int(text) if text else None, confidence, tuple(digits), gap)


def read_cells(
    recognizer: Recognizer,
    cells: dict[str, list[np.ndarray]],
    crop: Crop,
    strokes: dict[str, list[list[np.ndarray]]] | None = None,
) -> dict[str, FieldReading]:
    """Every box of every field in one batch through the digit model.

    Neither kind of cell holds a printed border: a scan's box is cut inside it (`cells.CELL_INSET_MM`)
    through the fitted homography (``"inset"``), an ink box is drawn from its strokes alone (``"ink"``).
    Ink at a crop's edge is the digit running past it, so the recognizer is told not to strip it as a
    border remnant. An ink box's `strokes`, in writing order, are read too: how the digit was
    written says what it is where its picture hesitates (a scan's box gets strokes traced from its
    picture, inside the recognizer).
    """
    order = [(fid, i) for fid, boxes in cells.items() for i in range(len(boxes))]
    in_order = [strokes[fid][i] for fid, i in order] if strokes is not None else None
    readings = list(recognizer.read([cells[fid][i] for fid, i in order], crop=crop, strokes=in_order))
    by_field: dict[str, list[DigitReadingLike]] = {fid: [] for fid in cells}
    for (fid, _), reading in zip(order, readings, strict=True):
        by_field[fid].append(reading)
    return {fid: field_reading(fid, digits) for fid, digits in by_field.items()}


def read_page(page: PageLike, recognizer: Recognizer, configured_election: str) -> PageReading:
    """Read a decoded page. Ink pages and scans whose QR and text both fail are read as `configured_election`."""
    if page.kind == "ink":
        return _read_ink(page.strokes, recognizer, configured_election)
    if page.image is None:
        raise ValueError("an image page without an image")
    return _read_scan(to_gray(page.image), recognizer, configured_election)


def _read_ink(strokes: list[np.ndarray], recognizer: Recognizer, election_id: str) -> PageReading:
    election = load_election(election_id)
    layout = form_layout(election)
    reading = PageReading("ink", election, None, "none", None, None)
    reading.page_image = ink_page_image(strokes, layout)
    if not any(len(s) for s in strokes):
        reading.problem = "page InkML sans aucun trait"
        return reading
    boxes = ink_boxes(strokes, layout)
    cells = ink_cells(boxes, layout)
    reading.fields = read_cells(recognizer, cells, "ink", boxes)
    reading.field_images = {f.id: ink_field_crop(f, cells[f.id]) for f in layout.fields}
    reading.crossed = crossed_fields(strokes, layout)
    reading.stray = stray_ink_fields(strokes, layout)
    return reading


def _read_scan(gray: np.ndarray, recognizer: Recognizer, configured_election: str) -> PageReading:
    try:
        alignment = align_page(gray)
    except AlignmentError as exc:
        reading = PageReading("image", None, None, "none", None, None, problem=str(exc))
        # The reviewer still gets the page as scanned, reduced.
        reading.page_image, _ = reduced(gray, 1400)
        return reading
    found = identify_scan(gray, alignment)
    reading = PageReading("image", None, found.identity, found.how, found.raw, alignment)
    election_id = found.identity.election if found.identity else configured_election
    try:
        election = load_election(election_id)
    except ElectionDefinitionError:
        reading.problem = f"formulaire d'une élection inconnue ({election_id})"
        return reading
    reading.election = election
    layout = form_layout(election)
    reading.page_image = scan_page_image(gray, alignment, layout)
    if found.identity is not None and found.identity.form_version != election.form_version:
        reading.problem = (
            f"formulaire version {found.identity.form_version}, or la version en vigueur est {election.form_version}"
        )
        return reading
    cells = {f.id: scan_cells(gray, alignment, f) for f in layout.fields}
    reading.fields = read_cells(recognizer, cells, "inset")
    reading.field_images = {f.id: scan_field_crop(gray, alignment, f) for f in layout.fields}
    reading.stray = {f.id for f in layout.fields if scan_stray_ink(gray, alignment, f)}
    return reading
