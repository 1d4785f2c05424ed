"""Filling the paper form with real handwritten digits, as a digital pen (InkML) or as a distorted scan.

A reusable helper for the OCR tests, `bench/ocr_accuracy.py` and the election-night
simulation. The digits come from ../shared/data/handwriting, only from what the digit
model holds out from training (pendigits writers 25-30, MNIST images 4000-4999; see
pen_gateway/digits/data.py), so the figures measured here are on writers the model never saw.
A sample whose label is wrong (`evaluation.KNOWN_LABEL_ERRORS`: a clear 2 labelled 3) is not used:
written where its label's digit belongs it would be the president's slip, not the model's misread.

- `consistent_counts` draws a bureau's figures whose sums hold (or, on request, break by one digit);
- `pen_strokes` writes them into the comb boxes as pen strokes in page millimetres, and
  `inkml_document` turns those into the InkML a docking station uploads;
- `scan_page` writes them into the printed 300 dpi form (pen strokes or MNIST scans), and
  `distort` makes a scanner's page of it: rotation, scale, offset, paper tint, noise, blur, JPEG,
  returning the transform so a test knows where each box truly is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from forms.definitions import Election
from forms.layout import Box, form_layout
from forms.render import DPI, px_per_mm, render_form
from pen_gateway.digits.data import (
    MNIST_CALIB_SLICE,
    MNIST_TRAIN_SLICE,
    MNIST_VAL_SLICE,
    PEN_CALIB_WRITERS,
    PEN_TRAIN_WRITERS,
    PEN_VAL_WRITERS,
    default_data_dir,
    load_mnist,
    load_pendigits,
)
from pen_gateway.digits.evaluation import KNOWN_LABEL_ERRORS
from pen_gateway.digits.strokes import render_strokes

HANDWRITING_DIR = default_data_dir()
INKML_NS = "http://www.w3.org/2003/InkML"


def handwriting_available() -> bool:
    return (HANDWRITING_DIR / "pendigits-dev.jsonl").is_file() and (HANDWRITING_DIR / "mnist-dev.npz").is_file()


@dataclass(frozen=True)
class Handwriting:
    """Held-out real digits by class: pen trajectories (tablet units, y down) and MNIST images (white on black),
    each with its sample's name ("pendigits w27 s14", "mnist 4123"). With a `drawn` list
    (`dataclasses.replace(hw, drawn=[])`), every digit written is named there, in writing order."""

    pen: Mapping[int, tuple[tuple[np.ndarray, ...], ...]]
    mnist: Mapping[int, tuple[np.ndarray, ...]]
    pen_ids: Mapping[int, tuple[str, ...]]
    mnist_ids: Mapping[int, tuple[str, ...]]
    drawn: list[str] | None = None

    def pen_digit(self, digit: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        k = int(rng.integers(len(self.pen[digit])))
        if self.drawn is not None:
            self.drawn.append(self.pen_ids[digit][k])
        return self.pen[digit][k]

    def mnist_digit(self, digit: int, rng: np.random.Generator) -> np.ndarray:
        k = int(rng.integers(len(self.mnist[digit])))
        if self.drawn is not None:
            self.drawn.append(self.mnist_ids[digit][k])
        return self.mnist[digit][k]


@cache
def load_handwriting(writers: str = "held-out") -> Handwriting:
    """The held-out digits (what everything measures on); with ``writers="calibration"`` the
    calibration writers' (pendigits 21-24, MNIST 3500-3999: what the recognizer's reliability map is
    fitted on, `pen_gateway.digits.fit_reliability`); with ``writers="training"`` the training writers'
    (pendigits 1-20, MNIST 0-3499: whose boxes, cut from forms, the networks are fine-tuned on,
    `pen_gateway.digits.form_boxes`)."""
    pen_writers, mnist_slice = {
        "held-out": (PEN_VAL_WRITERS, MNIST_VAL_SLICE),
        "calibration": (PEN_CALIB_WRITERS, MNIST_CALIB_SLICE),
        "training": (PEN_TRAIN_WRITERS, MNIST_TRAIN_SLICE),
    }[writers]
    pen: dict[int, list[tuple[np.ndarray, ...]]] = {d: [] for d in range(10)}
    pen_ids: dict[int, list[str]] = {d: [] for d in range(10)}
    for sample in load_pendigits(HANDWRITING_DIR):
        if sample.writer in pen_writers and sample.id not in KNOWN_LABEL_ERRORS:
            pen[sample.label].append(sample.strokes)
            pen_ids[sample.label].append(sample.id)
    images, labels = load_mnist(HANDWRITING_DIR)
    numbers = np.arange(len(labels))[mnist_slice]
    images, labels = images[mnist_slice], labels[mnist_slice]
    return Handwriting(
        {d: tuple(v) for d, v in pen.items()},
        {d: tuple(images[labels == d]) for d in range(10)},
        {d: tuple(v) for d, v in pen_ids.items()},
        {d: tuple(f"mnist {n}" for n in numbers[labels == d]) for d in range(10)},
    )


# --- the figures ---

def consistent_counts(
    election: Election, rng: np.random.Generator, *, inscrits: int | None = None, zero_share: float = 0.1
) -> dict[str, int]:
    """A bureau's figures whose sums hold: blancs_nuls + exprimes = votants, candidates add up to exprimes."""
    limit = min(f.max_value for f in election.fields)
    inscrits = inscrits or int(rng.integers(300, 1500))
    votants = int(min(limit, inscrits, rng.integers(max(1, inscrits // 10), max(2, inscrits // 2) + 1)))
    blancs_nuls = int(rng.integers(0, max(1, votants // 25) + 1))
    exprimes = votants - blancs_nuls
    weights = rng.dirichlet(np.ones(len(election.candidates)) * 1.5)
    weights[rng.random(len(weights)) < zero_share] = 0.0
    if weights.sum() == 0:
        weights[0] = 1.0
    votes = np.floor(weights / weights.sum() * exprimes).astype(int)
    votes[int(np.argmax(weights))] += exprimes - int(votes.sum())
    counts = {"votants": votants, "blancs_nuls": blancs_nuls, "exprimes": exprimes}
    counts.update({c.id: int(v) for c, v in zip(election.candidates, votes, strict=True)})
    return counts


def break_one_digit(
    counts: Mapping[str, int], election: Election, rng: np.random.Generator
) -> tuple[dict[str, int], str]:
    """The figures with one digit of one candidate changed (the president's slip): (new counts, field changed)."""
    field = election.candidates[int(rng.integers(len(election.candidates)))].id
    text = str(counts[field])
    pos = int(rng.integers(len(text)))
    choices = [d for d in "0123456789" if d != text[pos] and not (pos == 0 and d == "0" and len(text) > 1)]
    new = int(text[:pos] + choices[int(rng.integers(len(choices)))] + text[pos + 1 :])
    return {**counts, field: new}, field


def written_digits(value: int | None, cells: int, align: str = "right") -> list[int | None]:
    """What the president writes in a comb of `cells` boxes: one digit per box, None for a box left empty."""
    if value is None:
        return [None] * cells
    digits: list[int | None] = [int(ch) for ch in str(value)]
    pad: list[int | None] = [None] * (cells - len(digits))
    return pad + digits if align == "right" else digits + pad


# --- the pen ---

def _digit_in_box(
    strokes: tuple[np.ndarray, ...], box: Box, rng: np.random.Generator
) -> list[np.ndarray]:
    """A pendigits trajectory scaled and placed inside `box` (mm): 55-80 % of the box's height, a little off-centre."""
    x, y, w, h = box
    allp = np.vstack(strokes)
    lo, hi = allp.min(axis=0), allp.max(axis=0)
    ext = np.maximum(hi - lo, 1e-6)
    height = h * rng.uniform(0.55, 0.8)
    scale = min(height / ext[1], w * 0.8 / ext[0])
    size = ext * scale
    free = np.array([w, h]) - size
    origin = np.array([x, y]) + free * rng.uniform(0.3, 0.7, 2)
    return [(s - lo) * scale + origin for s in strokes]


def pen_strokes(
    election: Election, counts: Mapping[str, int | None], hw: Handwriting, rng: np.random.Generator,
    *, align: str = "right", signature: bool = True,
) -> tuple[list[np.ndarray], dict[str, list[int | None]]]:
    """The strokes (page mm) of a form filled in with the pen, and the digit written in each box."""
    layout = form_layout(election)
    strokes: list[np.ndarray] = []
    written: dict[str, list[int | None]] = {}
    for f in layout.fields:
        digits = written_digits(counts.get(f.id), len(f.cells), align)
        written[f.id] = digits
        for digit, cell in zip(digits, f.cells, strict=True):
            if digit is not None:
                strokes.extend(_digit_in_box(hw.pen_digit(digit, rng), cell, rng))
    if signature:
        # A scribble in the signature box: ink that belongs to no count.
        x, y, _w, h = layout.signature_box
        t = np.linspace(0, 1, 80)
        strokes.append(np.stack([x + 10 + 60 * t, y + h / 2 + 4 * np.sin(t * 25)], axis=1))
    return strokes, written


def inkml_document(strokes_mm: list[np.ndarray], *, units: str = "mm") -> bytes:
    """An InkML page as a docking station sends it: X and Y in `units` ("mm", "cm" or "in")."""
    factor = {"mm": 1.0, "cm": 0.1, "in": 1 / 25.4}[units]
    traces = "\n".join(
        "  <trace>" + ", ".join(f"{px * factor:.3f} {py * factor:.3f}" for px, py in s) + "</trace>"
        for s in strokes_mm
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<ink xmlns="{INKML_NS}">\n'
        f'  <definitions>\n    <context xml:id="page">\n      <traceFormat>\n'
        f'        <channel name="X" type="decimal" units="{units}"/>\n'
        f'        <channel name="Y" type="decimal" units="{units}"/>\n'
        f'      </traceFormat>\n    </context>\n  </definitions>\n{traces}\n</ink>\n'
    ).encode()


# --- the scan ---

def _blend_ink(page: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    """Ink on paper darkens, never lightens: the page keeps the darker of the two."""
    h, w = patch.shape
    region = page[y0 : y0 + h, x0 : x0 + w]
    np.minimum(region, patch[: region.shape[0], : region.shape[1]], out=region)


def _pen_into_page(page: np.ndarray, strokes_mm: list[np.ndarray], rng: np.random.Generator) -> None:
    scale = px_per_mm(DPI)
    pen_width = rng.uniform(0.4, 0.65) * scale  # a ballpoint's 0.5 mm line, more or less
    for stroke in strokes_mm:
        pts = stroke * scale
        lo = np.floor(pts.min(axis=0) - pen_width * 2).astype(int)
        hi = np.ceil(pts.max(axis=0) + pen_width * 2).astype(int)
        lo = np.maximum(lo, 0)
        size = (int(hi[0] - lo[0]) + 1, int(hi[1] - lo[1]) + 1)
        patch = render_strokes([pts - lo], size, pen_width)
        _blend_ink(page, patch, int(lo[0]), int(lo[1]))


def _mnist_into_page(
    page: np.ndarray, election: Election, counts: Mapping[str, int | None], hw: Handwriting,
    rng: np.random.Generator, align: str,
) -> dict[str, list[int | None]]:
    scale = px_per_mm(DPI)
    written: dict[str, list[int | None]] = {}
    for f in form_layout(election).fields:
        digits = written_digits(counts.get(f.id), len(f.cells), align)
        written[f.id] = digits
        for digit, (x, y, w, h) in zip(digits, f.cells, strict=True):
            if digit is None:
                continue
            image = hw.mnist_digit(digit, rng).astype(np.float32)
            # The MNIST digit fills 20 of its 28 px; make it 55-80 % of the box's height.
            s = h * rng.uniform(0.55, 0.8) * scale / 20.0
            side = round(28 * s)
            big = cv2.resize(image, (side, side), interpolation=cv2.INTER_CUBIC)
            patch = np.clip(255.0 - big, 0, 255).astype(np.uint8)
            cx = (x + w * rng.uniform(0.4, 0.6)) * scale
            cy = (y + h * rng.uniform(0.45, 0.55)) * scale
            _blend_ink(page, patch, round(cx - side / 2), round(cy - side / 2))
    return written


def scan_page(
    election: Election, bureau: str, counts: Mapping[str, int | None], hw: Handwriting, rng: np.random.Generator,
    *, source: str = "pen", align: str = "right",
) -> tuple[np.ndarray, dict[str, list[int | None]]]:
    """The printed form (300 dpi, grayscale) filled in by hand: `source` "pen" (pendigits) or "mnist"."""
    page = np.array(render_form(election, bureau), dtype=np.uint8)
    if source == "pen":
        strokes, written = pen_strokes(election, counts, hw, rng, align=align)
        _pen_into_page(page, strokes, rng)
    elif source == "mnist":
        written = _mnist_into_page(page, election, counts, hw, rng, align)
    else:
        raise ValueError(f"unknown handwriting source {source!r}")
    return page, written


@dataclass(frozen=True)
class Distortion:
    rotation_deg: float = 0.0
    scale: float = 1.0
    shift_mm: tuple[float, float] = (0.0, 0.0)
    paper: float = 245.0  # the scanned paper's grey level
    noise: float = 4.0  # sensor noise, grey levels (σ)
    blur: float = 0.6  # optics, px (σ); 0 = none
    jpeg_quality: int | None = 75  # None = lossless

    @classmethod
    def random(cls, rng: np.random.Generator) -> Distortion:
        return cls(
            rotation_deg=float(rng.uniform(-5, 5)),
            scale=float(rng.uniform(0.9, 1.1)),
            shift_mm=(float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))),
            paper=float(rng.uniform(225, 252)),
            noise=float(rng.uniform(2, 8)),
            blur=float(rng.uniform(0.3, 1.2)),
            jpeg_quality=int(rng.integers(45, 90)),
        )


def distort(page: np.ndarray, d: Distortion, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A scanner's view of `page`: (the scanned image, the 3x3 map from page pixels to scan pixels).

    The scan bed grows with the scale so that a 110 % page is not cropped: scale here is a
    different resolution, as when a docking station scans at another dpi than we printed.
    """
    h, w = page.shape
    angle = np.deg2rad(d.rotation_deg)
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64) - [w / 2, h / 2]
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) * d.scale
    turned = corners @ rot.T
    out_w = int(np.ceil(np.ptp(turned[:, 0]))) + 40
    out_h = int(np.ceil(np.ptp(turned[:, 1]))) + 40
    shift = np.array(d.shift_mm) * px_per_mm(DPI)
    matrix = np.eye(3)
    matrix[:2, :2] = rot
    matrix[:2, 2] = np.array([out_w / 2, out_h / 2]) + shift - rot @ np.array([w / 2, h / 2])
    # Paper tint first (ink stays dark), then geometry with a lighter scanner lid around the page.
    tinted = page.astype(np.float32) * (d.paper / 255.0)
    scanned = cv2.warpAffine(tinted, matrix[:2], (out_w, out_h), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_CONSTANT, borderValue=252.0)
    if d.blur > 0:
        scanned = cv2.GaussianBlur(scanned, (0, 0), d.blur)
    if d.noise > 0:
        scanned += rng.normal(0, d.noise, scanned.shape).astype(np.float32)
    image = np.clip(np.rint(scanned), 0, 255).astype(np.uint8)
    if d.jpeg_quality is not None:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, d.jpeg_quality])
        assert ok
        image = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
    return image, matrix


def encode_image(image: np.ndarray, fmt: str = ".png", quality: int = 90) -> bytes:
    """The bytes a docking station uploads for a scan."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if fmt in (".jpg", ".jpeg") else []
    ok, buf = cv2.imencode(fmt, image, params)
    if not ok:
        raise ValueError(f"cannot encode as {fmt}")
    return buf.tobytes()


def filled_upload(
    mode: str, election: Election, bureau: str, counts: Mapping[str, int | None], hw: Handwriting,
    rng: np.random.Generator, *, align: str = "right", jpeg_quality: int = 92,
) -> tuple[bytes, str, dict[str, list[int | None]]]:
    """A form filled with `counts`, as a docking station uploads it: (bytes, content type, the digits
    written in each field's boxes). `mode` "inkml": the pen's strokes; "scan-pen" / "scan-mnist": pen
    ink or MNIST digits in the printed form, scanned (`Distortion.random`) and sent as a JPEG."""
    if mode == "inkml":
        strokes, written = pen_strokes(election, counts, hw, rng, align=align)
        return inkml_document(strokes), "application/inkml+xml", written
    if mode not in ("scan-pen", "scan-mnist"):
        raise ValueError(f"unknown upload mode {mode!r}")
    page, written = scan_page(election, bureau, counts, hw, rng, source=mode.removeprefix("scan-"), align=align)
    scanned, _ = distort(page, Distortion.random(rng), rng)
    return encode_image(scanned, ".jpg", jpeg_quality), "image/jpeg", written


def page_mm_to_scan(matrix: np.ndarray) -> np.ndarray:
    """The true map from page millimetres to scan pixels, for checking an alignment."""
    to_px = np.diag([px_per_mm(DPI), px_per_mm(DPI), 1.0])
    return matrix @ to_px


def save_debug(image: np.ndarray, path: Path) -> None:
    cv2.imwrite(str(path), image)
