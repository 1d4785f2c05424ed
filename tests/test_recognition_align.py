"""Locating and identifying the form on a page: rotated, scaled, noisy, JPEG'd, upside down, QR damaged."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np
import pytest

from forms import load_election
from forms.layout import QR_BOX, FormIdentity, form_layout
from forms.render import px_per_mm, render_form
from pen_gateway.recognition.align import AlignmentError, align_page, reduced
from pen_gateway.recognition.cells import (
    CELL_PX_PER_MM,
    INK_SPILL_MM,
    assign_strokes,
    ink_boxes,
    ink_cells,
    scan_cells,
)
from pen_gateway.recognition.identify import closest_election, identify_scan, parse_printed_text, read_qr
from tests.form_fill import Distortion, distort, page_mm_to_scan

TOLERANCE_MM = 0.3  # the box crops are inset by 0.7 mm: a third of that is still a clean cut


@cache
def blank_form(bureau: str = "750120") -> np.ndarray:
    return np.array(render_form(load_election("primaire-2011-t1"), bureau), dtype=np.uint8)


def _cell_corners_mm() -> np.ndarray:
    layout = form_layout(load_election("primaire-2011-t1"))
    points = []
    for f in layout.fields:
        for x, y, w, h in f.cells:
            points += [(x, y), (x + w, y + h)]
    return np.array(points, dtype=np.float64)


@pytest.mark.parametrize(
    "distortion",
    [
        Distortion(rotation_deg=5.0, scale=1.0, jpeg_quality=None, noise=0, blur=0),
        Distortion(rotation_deg=-5.0, scale=0.9, shift_mm=(3, -2)),
        Distortion(rotation_deg=2.5, scale=1.1, shift_mm=(-4, 4), noise=8, blur=1.2, jpeg_quality=40),
        Distortion(rotation_deg=-3.0, scale=0.95, paper=225, noise=6, blur=0.8, jpeg_quality=55),
        Distortion(rotation_deg=180.0 + 1.5, scale=1.0),  # fed upside down
    ],
    ids=["rot+5", "rot-5-scale90", "rot+2.5-scale110-noisy-jpeg40", "grey-paper", "upside-down"],
)
def test_the_boxes_are_found_where_they_are_on_a_distorted_scan(distortion: Distortion) -> None:
    rng = np.random.default_rng(7)
    scan, matrix = distort(blank_form(), distortion, rng)
    alignment = align_page(scan)
    assert alignment.markers == (0, 1, 2, 3)
    expected = cv2.perspectiveTransform(_cell_corners_mm().reshape(-1, 1, 2), page_mm_to_scan(matrix)).reshape(-1, 2)
    found = alignment.to_image(_cell_corners_mm())
    error_mm = np.linalg.norm(found - expected, axis=1).max() / (px_per_mm() * distortion.scale)
    assert error_mm < TOLERANCE_MM
    assert alignment.px_per_mm == pytest.approx(px_per_mm() * distortion.scale, rel=0.01)


@pytest.mark.parametrize("shape", [(3508, 2480), (3973, 2877), (2339, 1653), (1200, 900)])
def test_a_page_is_reduced_for_detection_as_one_area_averaging_would(shape: tuple[int, int]) -> None:
    """Halving first (cheap) and averaging the rest gives the picture one averaging gives, at the scale it says."""
    rng = np.random.default_rng(3)
    page = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (0, 0), 3)
    y, x = shape[0] * 0.61, shape[1] * 0.37  # a dark square's centre, in page pixels
    page[round(y) - 30 : round(y) + 31, round(x) - 30 : round(x) + 31] = 0
    small, scale = reduced(page, 1400)
    assert scale == min(1.0, 1400 / max(shape))
    once = cv2.resize(page, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else page
    # Sizes are rounded at each step: the last row or column may be left out.
    assert abs(small.shape[0] - once.shape[0]) <= 1 and abs(small.shape[1] - once.shape[1]) <= 1
    h, w = min(small.shape[0], once.shape[0]), min(small.shape[1], once.shape[1])
    assert np.abs(small[:h, :w].astype(int) - once[:h, :w].astype(int)).mean() < 1.0  # grey levels
    dark = np.argwhere(small < 10).mean(axis=0)  # the square's centre, found in the reduced picture
    np.testing.assert_allclose((dark + 0.5) / scale - 0.5, (y, x), atol=0.5 / scale)


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (3, 9000), (2, 2)])
def test_a_sliver_of_a_page_is_refused_with_a_reason(shape: tuple[int, int]) -> None:
    """A page a pixel or two thick: no side vanishes when it is reduced (OpenCV would raise), and it is no form."""
    page = np.full(shape, 250, np.uint8)
    small, scale = reduced(page, 1400)
    assert min(small.shape) >= 1 and 0 < scale <= 1
    assert abs(max(small.shape) - max(shape) * scale) <= 1  # the scale it says is the one it shrank by
    with pytest.raises(AlignmentError, match="repères"):
        align_page(page)


def test_cut_boxes_of_a_blank_form_hold_no_ink() -> None:
    """An inset crop leaves the printed border out: every box of a blank, rotated, JPEG'd form is paper only."""
    distortion = Distortion(rotation_deg=-4.0, scale=1.05, jpeg_quality=60)
    scan, _ = distort(blank_form(), distortion, np.random.default_rng(3))
    alignment = align_page(scan)
    for f in form_layout(load_election("primaire-2011-t1")).fields:
        for cell in scan_cells(scan, alignment, f):
            assert cell.shape == (102, 78)  # 6.6 x 8.6 mm at 300 dpi
            assert cell.min() > 150, f"printed border or dirt left in a box of {f.id}"


def test_a_page_that_is_not_the_form_is_refused_with_a_reason() -> None:
    blank = np.full((3508, 2480), 250, np.uint8)
    cv2.putText(blank, "Lettre au maire", (300, 600), cv2.FONT_HERSHEY_SIMPLEX, 4, 0, 8)
    with pytest.raises(AlignmentError, match="repères"):
        align_page(blank)


@pytest.mark.parametrize("arrangement", ["side-by-side", "one-above-the-other", "scanned-side-by-side"])
def test_two_forms_on_one_page_are_refused_not_read_as_one(arrangement: str) -> None:
    """Two bureaux' forms photographed on one page: each marker id is there twice. Keeping one of each
    read one bureau's return and dropped the other's without a word; the page is not one form."""
    first, second = blank_form("750120"), blank_form("750121")
    page = np.vstack([first, second]) if arrangement == "one-above-the-other" else np.hstack([first, second])
    if arrangement.startswith("scanned"):
        page, _ = distort(page, Distortion(rotation_deg=2.0, scale=0.6, noise=5, blur=0.8, jpeg_quality=70),
                          np.random.default_rng(4))
    with pytest.raises(AlignmentError, match="repères d'angle 0, 1, 2 et 3 présents plusieurs fois"):
        align_page(page)


def test_a_marker_copied_onto_the_page_is_refused() -> None:
    page = blank_form().copy()
    s = px_per_mm()
    side = round(30 * s)
    top_left = page[:side, :side].copy()  # marker 0 and the paper around it
    y, x = round(130 * s), round(90 * s)  # mid-page
    page[y : y + side, x : x + side] = top_left
    with pytest.raises(AlignmentError, match="repère d'angle 0 présent plusieurs fois"):
        align_page(page)


def test_one_corner_torn_off_still_aligns() -> None:
    page = blank_form().copy()
    s = px_per_mm()
    page[: round(40 * s), : round(40 * s)] = 255  # the top-left marker is gone
    scan, matrix = distort(page, Distortion(rotation_deg=3.0, scale=0.97), np.random.default_rng(5))
    alignment = align_page(scan)
    assert alignment.markers == (1, 2, 3)
    expected = cv2.perspectiveTransform(_cell_corners_mm().reshape(-1, 1, 2), page_mm_to_scan(matrix)).reshape(-1, 2)
    assert np.linalg.norm(alignment.to_image(_cell_corners_mm()) - expected, axis=1).max() / s < TOLERANCE_MM


def test_the_qr_names_the_election_the_bureau_and_the_version() -> None:
    scan, _ = distort(blank_form("4401203"), Distortion(rotation_deg=-2.0, scale=0.92), np.random.default_rng(1))
    found = identify_scan(scan, align_page(scan))
    assert found.how == "qr"
    assert (found.identity.election, found.identity.bureau, found.identity.form_version) == (
        "primaire-2011-t1", "4401203", 1)


def test_a_qr_the_first_detector_misses_is_read_by_the_second() -> None:
    # The QR region of one benchmark scan (MNIST digits, JPEG): clean to the eye, yet
    # cv2.QRCodeDetector finds nothing in it, plain or binarized; the page would have gone to a
    # human on Tesseract's word alone.
    crop = cv2.imread(str(Path(__file__).parent / "data" / "qr-missed-by-the-first-detector.png"), cv2.IMREAD_GRAYSCALE)
    assert not cv2.QRCodeDetector().detectAndDecode(crop)[0]
    assert read_qr(crop) == "primaire-2011-t1 bureau 370101 formulaire 1"


def test_a_qr_with_a_finder_pattern_struck_out_is_read_where_the_form_prints_it() -> None:
    # A president's pen crossed the QR's top-right finder pattern: no detector finds the symbol any more
    # (before, the page went to Tesseract's reading of the printed text, unconfirmed: a human), but the
    # alignment says where the form printed it, and its error correction reads it there.
    page = blank_form("5931007").copy()
    s = px_per_mm()
    x, y, w, _h = QR_BOX
    for (x0, y0), (x1, y1) in (((w - 8, 1), (w - 1, 9)), ((w - 8, 9), (w - 1, 1))):
        cv2.line(page, (round((x + x0) * s), round((y + y0) * s)), (round((x + x1) * s), round((y + y1) * s)), 0,
                 round(0.8 * s))
    scan, _ = distort(page, Distortion(rotation_deg=3.0, scale=0.95, jpeg_quality=70), np.random.default_rng(3))
    found = identify_scan(scan, align_page(scan))
    assert (found.how, found.raw) == ("qr", "primaire-2011-t1 bureau 5931007 formulaire 1")


def test_a_damaged_qr_falls_back_on_tesseract_reading_the_printed_text() -> None:
    page = blank_form("5931007").copy()
    s = px_per_mm()
    x, y, _w, _h = QR_BOX
    # A pen scribble and a coffee stain over the QR: too much for its error correction.
    cv2.rectangle(page, (round((x + 4) * s), round((y + 4) * s)), (round((x + 26) * s), round((y + 20) * s)), 0, -1)
    cv2.circle(page, (round((x + 15) * s), round((y + 22) * s)), round(6 * s), 120, -1)
    scan, _ = distort(page, Distortion(rotation_deg=4.0, scale=1.05, jpeg_quality=70), np.random.default_rng(2))
    found = identify_scan(scan, align_page(scan))
    assert found.how == "text"
    assert found.identity is not None
    assert found.identity.bureau == "5931007"
    assert found.identity.election == "primaire-2011-t1"


def test_tesseract_slips_in_the_printed_text_are_forgiven_only_when_unambiguous() -> None:
    assert parse_printed_text("primaire-2011-tl\njureau5931007formulaire") == FormIdentity(
        "primaire-2011-t1", "5931007", 1)
    assert parse_printed_text("primaire-2011-t2 bureau 12 formulaire 3") == FormIdentity("primaire-2011-t2", "12", 3)
    assert parse_printed_text("primaire-2011-t\nbureau 5931007 formulaire 1") is None
    assert parse_printed_text("~~~ 5931007") is None
    assert closest_election("primaire-2011-t1") == "primaire-2011-t1"
    assert closest_election("primaire-2011-tl") == "primaire-2011-t1"  # l for 1
    assert closest_election("prirnaire-2011-t2") == "primaire-2011-t2"
    assert closest_election("primaire-2011-t") is None  # t1 or t2: not for us to guess
    assert closest_election("legislatives-2012") is None


def test_each_pen_stroke_goes_to_the_box_it_was_written_in() -> None:
    layout = form_layout(load_election("primaire-2011-t1"))
    votants = layout.field("votants").cells
    x, y, _w, h = votants[2]
    inside = np.array([[x + 2, y + 2], [x + 5, y + 8]])
    spilling = np.array([[x + 3, y + 1], [x + 4, y + h + 1.5]])  # a 7 whose tail crosses the bottom line
    x, y, _w, h = layout.signature_box
    signature = np.array([[x + 5, y + 5], [x + 60, y + 10]])
    assigned = assign_strokes([inside, spilling, signature], layout)
    assert set(assigned) == {("votants", 2)}
    assert len(assigned["votants", 2]) == 2


def test_a_stroke_that_runs_off_its_box_cannot_grow_the_box_without_bound() -> None:
    # A line whose middle is in a box but which reaches kilometres away (a corrupt or hostile InkML
    # coordinate) is cut INK_SPILL_MM past the box: the cell stays a box's size, and so does the memory.
    layout = form_layout(load_election("primaire-2011-t1"))
    x, y, w, h = layout.field("votants").cells[1]
    far = 1e6  # mm
    line = np.array([[x + w / 2 - far, y + h / 2], [x + w / 2 + far, y + h / 2]])
    seven = [np.array([[x + 2, y + 2], [x + w - 2, y + 2], [x + w / 2, y + h - 1]]), line]
    cell = ink_cells(ink_boxes(seven, layout), layout)["votants"][1]
    most = round((w + 2 * INK_SPILL_MM) * CELL_PX_PER_MM), round((h + 2 * INK_SPILL_MM) * CELL_PX_PER_MM)
    assert cell.shape[1] <= most[0] and cell.shape[0] <= most[1]
    assert (cell[cell.shape[0] // 2] < 128).mean() > 0.9  # the line is drawn across the whole cell
    # A digit that spills a little over its box is still kept whole.
    tail = [np.array([[x + 3, y + 2], [x + 4, y + h + 3]])]
    spilled = ink_cells(ink_boxes(tail, layout), layout)["votants"][1]
    unspilled = ink_cells(ink_boxes([], layout), layout)["votants"][1]
    assert spilled.shape[0] - unspilled.shape[0] >= round(3 * CELL_PX_PER_MM)  # 3 mm below the line, and the pen
