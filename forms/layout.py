"""The paper results form's geometry: the one source of truth for printing it and for reading it back.

Everything is in millimetres on an A4 page, from the top-left corner, x to the right, y down
(the InkML convention of DESIGN.md). The layout is computed from the election definition:
four ArUco fiducials in the corners, a QR code naming the election, the bureau and the form
version with the same text printed in clear under it, and for each count a comb field of
`max_digits` boxes, one digit per box.

Convention for the comb fields: all combs end at the same right edge and numbers are meant
to be written right-aligned (the units in the last box). The reader does not rely on it: a
number is the concatenation of the non-empty boxes, so "412" written in the first three
boxes of four reads as 412 too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from forms.definitions import Election, load_election

Box = tuple[float, float, float, float]  # x_mm, y_mm, w_mm, h_mm

PAGE_WIDTH_MM = 210.0
PAGE_HEIGHT_MM = 297.0
MARGIN_MM = 10.0
FIDUCIAL_MM = 16.0  # outer side of each marker, black border included
ARUCO_DICTIONARY = "DICT_4X4_50"  # the cv2.aruco predefined dictionary the markers come from
# Marker ids by corner; the ids tell the reader which corner is which, so an upside-down scan still aligns.
FIDUCIAL_IDS = {"top_left": 0, "top_right": 1, "bottom_right": 2, "bottom_left": 3}
QR_MM = 30.0
CELL_W_MM = 8.0
CELL_H_MM = 10.0
CELL_GAP_MM = 2.0  # separate boxes, not a shared-border comb: a digit that strays stays in its own crop
COMB_RIGHT_MM = 190.0
LABEL_X_MM = 22.0
FIELDS_TOP_MM = 84.0
FIELDS_BOTTOM_MM = 238.0
ROW_PITCH_MM = 16.0
SECTION_GAP_MM = 10.0
# Rows of boxes keep the gap the boxes of a comb keep: a digit that strays below its box stays out of the next one.
MIN_ROW_PITCH_MM = CELL_H_MM + CELL_GAP_MM
MAX_FIELDS = int((FIELDS_BOTTOM_MM - FIELDS_TOP_MM - SECTION_GAP_MM * 2) // MIN_ROW_PITCH_MM)
BORDER_MM = 0.3  # printed box line width
SIGNATURE_BOX: Box = (22.0, 248.0, 110.0, 20.0)
# The same on every form, so a reader finds the identity before it knows the election.
QR_BOX: Box = (PAGE_WIDTH_MM - MARGIN_MM - QR_MM - 2.0, 30.0, QR_MM, QR_MM)
QR_TEXT_BOX: Box = (QR_BOX[0] - 25.0, QR_BOX[1] + QR_MM + 1.0, QR_MM + 27.0, 11.0)

# Spaces optional: Tesseract often drops them between words of a monospace line.
_FORM_TEXT = re.compile(
    r"(?P<election>[a-z0-9][a-z0-9-]*?)\s*bureau\s*(?P<bureau>[0-9]{1,10})\s*formulaire\s*(?P<version>[0-9]+)"
)


@dataclass(frozen=True)
class Fiducial:
    marker_id: int
    box: Box  # a square: x, y, side, side

    def corners(self) -> list[tuple[float, float]]:
        """The marker's outer corners in ArUco's order: top-left, top-right, bottom-right, bottom-left."""
        x, y, w, h = self.box
        return [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]


@dataclass(frozen=True)
class FieldLayout:
    id: str
    label: str
    candidate: bool
    label_box: Box
    cells: tuple[Box, ...]  # reading order, left to right

    @property
    def bounds(self) -> Box:
        """The box around all the field's cells, for the reviewer's crop."""
        x0 = min(c[0] for c in self.cells)
        y0 = min(c[1] for c in self.cells)
        x1 = max(c[0] + c[2] for c in self.cells)
        y1 = max(c[1] + c[3] for c in self.cells)
        return (x0, y0, x1 - x0, y1 - y0)


@dataclass(frozen=True)
class Heading:
    text: str
    x: float
    y: float
    size_mm: float
    bold: bool = False


@dataclass(frozen=True)
class FormLayout:
    election_id: str
    form_version: int
    width_mm: float
    height_mm: float
    fiducials: tuple[Fiducial, ...]
    qr_box: Box
    qr_text_box: Box  # where the QR's text is printed in clear, for Tesseract when the QR is damaged
    headings: tuple[Heading, ...]
    fields: tuple[FieldLayout, ...]
    signature_box: Box

    def field(self, field_id: str) -> FieldLayout:
        for f in self.fields:
            if f.id == field_id:
                return f
        raise KeyError(field_id)

    def to_json(self) -> dict[str, Any]:
        """The `forms layout` contract of DESIGN.md."""
        return {
            "page": {"width_mm": _num(self.width_mm), "height_mm": _num(self.height_mm)},
            "fields": [{"id": f.id, "cells": [[_num(v) for v in c] for c in f.cells]} for f in self.fields],
        }


def _num(value: float) -> float | int:
    """210.0 → 210 in the JSON, so the page reads exactly as DESIGN.md writes it."""
    return int(value) if float(value).is_integer() else round(value, 3)


@dataclass(frozen=True)
class FormIdentity:
    """What the QR code (or its printed text) says: which election, which bureau, which form version."""

    election: str
    bureau: str
    form_version: int

    def text(self) -> str:
        return form_text(self.election, self.bureau, self.form_version)


def form_text(election_id: str, bureau: str, form_version: int) -> str:
    """The QR payload, also printed in clear under the QR (on two lines, split before "bureau")."""
    return f"{election_id} bureau {bureau} formulaire {form_version}"


def parse_form_text(text: str) -> FormIdentity | None:
    """The identity in a QR payload or in Tesseract's reading of the printed text; None if it is not one."""
    match = _FORM_TEXT.search(" ".join(text.split()))
    if match is None:
        return None
    return FormIdentity(match["election"], match["bureau"], int(match["version"]))


def fiducials() -> tuple[Fiducial, ...]:
    """The four corner markers, the same on every form."""
    left, top = MARGIN_MM, MARGIN_MM
    right, bottom = PAGE_WIDTH_MM - MARGIN_MM - FIDUCIAL_MM, PAGE_HEIGHT_MM - MARGIN_MM - FIDUCIAL_MM
    s = FIDUCIAL_MM
    return (
        Fiducial(FIDUCIAL_IDS["top_left"], (left, top, s, s)),
        Fiducial(FIDUCIAL_IDS["top_right"], (right, top, s, s)),
        Fiducial(FIDUCIAL_IDS["bottom_right"], (right, bottom, s, s)),
        Fiducial(FIDUCIAL_IDS["bottom_left"], (left, bottom, s, s)),
    )


@cache
def form_layout(election: Election) -> FormLayout:
    """The geometry of `election`'s paper form; the general counts, a heading, then the candidates."""
    general = [f for f in election.fields if not f.candidate]
    candidates = [f for f in election.fields if f.candidate]
    rows = len(general) + len(candidates)
    # Shrink the row pitch if an election has many candidates, never the boxes (nor below MIN_ROW_PITCH_MM:
    # forms.definitions refuses an election with more than MAX_FIELDS counts).
    pitch = min(ROW_PITCH_MM, (FIELDS_BOTTOM_MM - FIELDS_TOP_MM - SECTION_GAP_MM * 2) / rows)
    headings = [
        Heading(election.title, 32.0, 13.0, 5.5, bold=True),
        Heading("Procès-verbal des résultats du bureau de vote", 32.0, 21.0, 4.0),
        Heading("Un chiffre par case, à l'encre, nombres cadrés à droite.", 22.0, 66.0, 3.2),
        Heading("Décompte des bulletins", LABEL_X_MM, FIELDS_TOP_MM - 9.0, 4.2, bold=True),
    ]
    fields: list[FieldLayout] = []
    y = FIELDS_TOP_MM
    for f in general + candidates:
        if f is (candidates[0] if candidates else None):
            y += SECTION_GAP_MM
            headings.append(Heading("Voix obtenues par chaque candidat", LABEL_X_MM, y - 9.0, 4.2, bold=True))
        n = f.max_digits
        x0 = COMB_RIGHT_MM - n * CELL_W_MM - (n - 1) * CELL_GAP_MM
        cells = tuple((x0 + k * (CELL_W_MM + CELL_GAP_MM), y, CELL_W_MM, CELL_H_MM) for k in range(n))
        label_box = (LABEL_X_MM, y, x0 - LABEL_X_MM - 6.0, CELL_H_MM)
        fields.append(FieldLayout(f.id, f.label, f.candidate, label_box, cells))
        y += pitch
    return FormLayout(
        election_id=election.id,
        form_version=election.form_version,
        width_mm=PAGE_WIDTH_MM,
        height_mm=PAGE_HEIGHT_MM,
        fiducials=fiducials(),
        qr_box=QR_BOX,
        qr_text_box=QR_TEXT_BOX,
        headings=tuple(headings),
        fields=tuple(fields),
        signature_box=SIGNATURE_BOX,
    )


def layout_for(election_id: str) -> FormLayout:
    return form_layout(load_election(election_id))
