"""Printing the blank paper form for one bureau: a grayscale page image at 300 dpi, saved as PNG or PDF.

Drawn from `forms.layout` only, so what is printed is exactly what the reader expects. The
ArUco markers and the QR code come from OpenCV (the same library that detects them), the
text from Pillow with DejaVu Sans (Debian `fonts-dejavu-core`).
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from forms.definitions import Election
from forms.layout import ARUCO_DICTIONARY, BORDER_MM, Box, FormLayout, form_layout, form_text

DPI = 300
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONT_FILES = {"regular": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "mono": "DejaVuSansMono.ttf"}


def px_per_mm(dpi: int = DPI) -> float:
    return dpi / 25.4


@cache
def _font(kind: str, size_px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    path = FONT_DIR / FONT_FILES[kind]
    if path.is_file():
        return ImageFont.truetype(str(path), size_px)
    # Without DejaVu the form is still usable: Pillow's bundled scalable font (Latin-1 only).
    return ImageFont.load_default(size_px)


def aruco_dictionary() -> cv2.aruco.Dictionary:
    return cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, ARUCO_DICTIONARY))


def qr_matrix(text: str) -> np.ndarray:
    """The QR code as a uint8 array, one pixel per module, quiet zone included; level H survives pen marks."""
    params = cv2.QRCodeEncoder_Params()
    params.correction_level = cv2.QRCODE_ENCODER_CORRECT_LEVEL_H
    return cv2.QRCodeEncoder.create(params).encode(text)


def _rect(box: Box, scale: float) -> tuple[int, int, int, int]:
    x, y, w, h = box
    return round(x * scale), round(y * scale), round((x + w) * scale), round((y + h) * scale)


def _paste_square(page: Image.Image, square: np.ndarray, box: Box, scale: float) -> None:
    x0, y0, x1, y1 = _rect(box, scale)
    image = Image.fromarray(square).resize((x1 - x0, y1 - y0), Image.Resampling.NEAREST)
    page.paste(image, (x0, y0))


def render_form(election: Election, bureau: str, *, dpi: int = DPI, bureau_lines: tuple[str, ...] = ()) -> Image.Image:
    """The blank form for `bureau` as a grayscale ("L") Pillow image, A4 at `dpi`."""
    layout = form_layout(election)
    scale = px_per_mm(dpi)
    page = Image.new("L", (round(layout.width_mm * scale), round(layout.height_mm * scale)), 255)
    draw = ImageDraw.Draw(page)
    _draw_fiducials(page, layout, scale)
    _draw_identity(page, draw, layout, election, bureau, scale, bureau_lines)
    for heading in layout.headings:
        font = _font("bold" if heading.bold else "regular", round(heading.size_mm * scale))
        draw.text((heading.x * scale, heading.y * scale), heading.text, font=font, fill=0)
    line = max(1, round(BORDER_MM * scale))
    label_font = _font("regular", round(4.0 * scale))
    for f in layout.fields:
        x, y, w, h = f.label_box
        draw.text((x * scale, (y + h / 2) * scale), f.label, font=label_font, fill=0, anchor="lm")
        # A dotted leader from the label to the comb, so the eye does not jump a row.
        right = draw.textlength(f.label, font=label_font) + x * scale + 2 * scale
        for dot_x in np.arange(right, (x + w + 4.0) * scale, 2.0 * scale):
            draw.point((float(dot_x), (y + h * 0.75) * scale), fill=96)
        for cell in f.cells:
            draw.rectangle(_rect(cell, scale), outline=0, width=line)
    x, y, w, h = layout.signature_box
    draw.rectangle(_rect(layout.signature_box, scale), outline=0, width=line)
    draw.text(((x + 1.5) * scale, (y + 1.5) * scale), "Signature du président du bureau",
              font=_font("regular", round(3.0 * scale)), fill=0)
    return page


def _draw_fiducials(page: Image.Image, layout: FormLayout, scale: float) -> None:
    dictionary = aruco_dictionary()
    for fiducial in layout.fiducials:
        marker = cv2.aruco.generateImageMarker(dictionary, fiducial.marker_id, 6 * 20, borderBits=1)
        _paste_square(page, marker, fiducial.box, scale)


def _draw_identity(
    page: Image.Image, draw: ImageDraw.ImageDraw, layout: FormLayout, election: Election, bureau: str,
    scale: float, bureau_lines: tuple[str, ...],
) -> None:
    text = form_text(election.id, bureau, election.form_version)
    _paste_square(page, qr_matrix(text), layout.qr_box, scale)
    # The QR's own text in clear, split before "bureau", centred under the QR: Tesseract reads it if the QR is damaged.
    x, y, w, _h = layout.qr_text_box
    head, _, tail = text.partition(" bureau ")
    lines = (head, f"bureau {tail}")
    # Tesseract reads only what lies inside the box: a long bureau code (nine digits: a commune's INSEE code
    # and its bureau number) takes a smaller type, not the margin past the box where the version was lost.
    size = round(3.6 * scale)
    while size > 1 and max(draw.textlength(line, font=_font("mono", size)) for line in lines) > (w - 1.0) * scale:
        size -= 1
    mono = _font("mono", size)
    for i, line in enumerate(lines):
        draw.text(((x + w / 2) * scale, (y + 1.0 + i * 5.0) * scale), line, font=mono, fill=0, anchor="mt")
    big = _font("bold", round(5.0 * scale))
    draw.text((22.0 * scale, 34.0 * scale), f"Bureau n° {bureau}", font=big, fill=0)
    small = _font("regular", round(3.8 * scale))
    for i, extra in enumerate(bureau_lines[:3]):
        draw.text((22.0 * scale, (42.0 + i * 6.0) * scale), extra, font=small, fill=0)
    draw.text((22.0 * scale, 58.0 * scale), f"Scrutin du {election.date} — formulaire version {election.form_version}",
              font=small, fill=0)


def save_form(page: Image.Image, out: Path, dpi: int = DPI) -> None:
    """PNG or PDF by the file's suffix, with the resolution recorded so it prints at A4."""
    suffix = out.suffix.lower()
    if suffix == ".png":
        page.save(out, format="PNG", dpi=(dpi, dpi), optimize=True)
    elif suffix == ".pdf":
        page.save(out, format="PDF", resolution=float(dpi))
    else:
        raise ValueError(f"{out}: the form is written as .png or .pdf, not {suffix or 'no suffix'}")
