"""Which form is this: the QR code (election, bureau, form version), or Tesseract on its printed text.

The QR and its clear text sit at the same place on every form (`forms.layout.QR_BOX`,
`QR_TEXT_BOX`), so both are cut straight out of the aligned page before the election is
known. Tesseract is good at exactly this (printed monospace text on a clean crop); it is
never asked to read handwriting.
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass, replace

import cv2
import numpy as np

from forms.definitions import available_elections, load_election
from forms.layout import QR_BOX, QR_TEXT_BOX, FormIdentity, parse_form_text
from pen_gateway.recognition.align import Alignment, warp_region

log = logging.getLogger(__name__)

QR_PX_PER_MM = 8.0  # ~8 px per QR module: the detector's comfort zone
TEXT_PX_PER_MM = 12.0  # 3.6 mm text → ~43 px high: Tesseract reads printed text best at 30-50 px
QR_MARGIN_MM = 4.0  # the crop's quiet zone beyond the printed one, for a slightly misplaced QR
# Where the symbol's corners are inside QR_BOX: the printed code has a quiet zone of two modules
# (forms.render.qr_matrix), 1.2-1.6 mm for the 37-49 modules a form's text makes. The decoder refines
# the corners it is given: 120 benchmark scans (41 modules) all decode at 1.05 mm and at 1.4 mm, 103 at 1.8.
QR_SYMBOL_INSET_MM = 1.4


@dataclass(frozen=True)
class Identification:
    identity: FormIdentity | None
    how: str  # "qr", "text" (Tesseract on the printed text) or "none"
    raw: str | None  # what was decoded or read, for the reviewer


def read_qr(image: np.ndarray, corners: np.ndarray | None = None) -> str | None:
    """The QR payload in `image` (grayscale), or None.

    `corners` (4 x 2, clockwise from the top left, in pixels): where the symbol should be. It is
    decoded there first, without the search for it, a third of the time (4 ms against 12 on a scan);
    the searches below are for a code that is not where the form puts it, or damaged.
    """
    detector = cv2.QRCodeDetector()
    if corners is not None:
        try:
            text, _ = detector.decode(image, np.asarray(corners, np.float32).reshape(1, 4, 2))
        except cv2.error:
            text = ""
        if text:
            return text
    attempts = (
        lambda: detector.detectAndDecode(image),
        # A second chance on a binarized copy: JPEG ringing and grey paper confuse the first pass.
        lambda: detector.detectAndDecode(cv2.threshold(image, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)[1]),
        # A third, with OpenCV's other detector (finder patterns found as ArUco-like markers): it reads
        # some clean scans the first one misses (2 in 100 of the benchmark's MNIST scans).
        lambda: cv2.QRCodeDetectorAruco().detectAndDecode(image),
    )
    text = ""
    for attempt in attempts:
        try:
            text, points, _ = attempt()
        except cv2.error:
            return None
        if points is not None and text:
            return text
    return text or None


def read_printed_text(image: np.ndarray) -> str | None:
    """Tesseract on the printed identity line under the QR; None if Tesseract is missing or reads nothing."""
    import pytesseract

    _, binary = cv2.threshold(image, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    padded = cv2.copyMakeBorder(binary, 20, 20, 20, 20, cv2.BORDER_CONSTANT, value=255)
    config = "--psm 6 -c tessedit_char_whitelist=abcdefghijklmnopqrstuvwxyz0123456789-"
    try:
        text = pytesseract.image_to_string(padded, lang="eng", config=config, timeout=10)
    except (pytesseract.TesseractNotFoundError, RuntimeError, OSError) as exc:
        log.warning("Tesseract unavailable for the form's printed identity: %s", exc)
        return None
    return text.strip() or None


def identify_scan(gray: np.ndarray, alignment: Alignment) -> Identification:
    """The form's identity from its QR, else from its printed text; `how` says which worked."""
    x, y, w, h = QR_BOX
    qr_crop = warp_region(
        gray, alignment, (x - QR_MARGIN_MM, y - QR_MARGIN_MM, w + 2 * QR_MARGIN_MM, h + 2 * QR_MARGIN_MM), QR_PX_PER_MM
    )
    # The symbol's corners in the crop, in pixels (the crop starts QR_MARGIN_MM above and left of QR_BOX).
    near = (QR_MARGIN_MM + QR_SYMBOL_INSET_MM) * QR_PX_PER_MM
    right, bottom = ((QR_MARGIN_MM + side - QR_SYMBOL_INSET_MM) * QR_PX_PER_MM for side in (w, h))
    raw = read_qr(qr_crop, np.array([(near, near), (right, near), (right, bottom), (near, bottom)]))
    identity = parse_form_text(raw) if raw else None
    if identity is not None:
        return Identification(identity, "qr", raw)
    text = read_printed_text(warp_region(gray, alignment, QR_TEXT_BOX, TEXT_PX_PER_MM))
    identity = parse_printed_text(text) if text else None
    if identity is not None:
        return Identification(identity, "text", text)
    return Identification(None, "none", raw or text)


_BUREAU_WORD = re.compile(r"(?:b?[a-z]?ureau|bur[a-z]{0,3}|[a-z]{5,6})\s*(?P<bureau>[0-9]{1,10})")
_VERSION_WORD = re.compile(r"(?:[a-z]*ulaire|form[a-z]*|[a-z]{8,10})\s*(?P<version>[0-9]{1,3})\b")


def parse_printed_text(text: str) -> FormIdentity | None:
    """The identity in Tesseract's reading of the two printed lines, forgiving its usual slips.

    "primaire-2011-tl / jureau5931007formulaire" still gives the election (the closest known
    id) and the bureau; a version it could not read is taken as the election's current one.
    Whatever is read this way is only trusted once the upload confirms the bureau (assess.py).
    """
    exact = parse_form_text(text)
    if exact is not None:
        election = closest_election(exact.election)
        return replace(exact, election=election) if election else None
    flat = " ".join(text.lower().split())
    bureau = _BUREAU_WORD.search(flat)
    if bureau is None:
        return None
    election = closest_election(flat[: bureau.start()].replace(" ", ""))
    if election is None:
        return None
    version = _VERSION_WORD.search(flat, bureau.end())
    form_version = int(version["version"]) if version else load_election(election).form_version
    return FormIdentity(election, bureau["bureau"], form_version)


def closest_election(read: str) -> str | None:
    """The known election id Tesseract meant ("primaire-2011-tl" → "primaire-2011-t1"), if one is close enough."""
    known = available_elections()
    if read in known:
        return read
    # Compare with Tesseract's usual confusions folded (l/i/1, o/0, s/5), so "tl" is nearer "t1" than "t2".
    folded: dict[str, str] = {}
    for k in known:
        # Two ids that fold alike could never be told apart this way: leave both out.
        folded[_fold(k)] = "" if _fold(k) in folded else k
    if folded.get(_fold(read)):
        return folded[_fold(read)]
    folded = {f: k for f, k in folded.items() if k}
    close = difflib.get_close_matches(_fold(read), list(folded), n=2, cutoff=0.85)
    # Two ids equally close is no answer: the caller falls back on the configured election.
    if len(close) == 1 or (len(close) == 2 and _ratio(_fold(read), close[0]) > _ratio(_fold(read), close[1])):
        return folded[close[0]]
    return None


_CONFUSABLE = str.maketrans({"l": "1", "i": "1", "o": "0", "s": "5"})


def _fold(text: str) -> str:
    return text.translate(_CONFUSABLE)


def _ratio(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()
