"""Locating the form on a scanned page: the four ArUco fiducials → a homography from page millimetres to pixels.

The markers' ids say which corner is which, so any rotation (a page fed upside down too),
scale and mild perspective is undone by the same least-squares fit over their 16 corners.
Regions (a box, the QR, the whole page) are then cut straight out of the scan with one
`warpPerspective` each, at the resolution the next stage wants; the full page is never
resampled at print resolution, which is what keeps a form under a quarter of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import cv2
import numpy as np

from forms.layout import ARUCO_DICTIONARY, Box, fiducials

DETECT_LONG_SIDE = 1400  # px: markers of 16 mm are still ~75 px there, and detection is 6x cheaper than at 300 dpi
MIN_MARKERS = 2  # two opposite corners give 8 points, enough for a homography the residual can vouch for
MAX_RESIDUAL_MM = 1.0  # a fit worse than this means a marker is misread or the paper is folded


class AlignmentError(ValueError):
    """The form could not be located on the page: the message says why, in French, for the reviewer."""


@dataclass(frozen=True)
class Alignment:
    homography: np.ndarray  # 3x3, page millimetres → image pixels
    markers: tuple[int, ...]  # the fiducial ids found
    residual_mm: float  # RMS distance between the found corners and the fitted ones, in millimetres
    px_per_mm: float  # the scan's resolution as fitted (about 11.8 at 300 dpi)

    def to_image(self, points_mm: np.ndarray) -> np.ndarray:
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 1, 2)
        return cv2.perspectiveTransform(pts, self.homography).reshape(-1, 2)


@cache
def _detector() -> cv2.aruco.ArucoDetector:
    dictionary = cv2.aruco.getPredefinedDictionary(getattr(cv2.aruco, ARUCO_DICTIONARY))
    params = cv2.aruco.DetectorParameters()
    params.cornerRefinementMethod = cv2.aruco.CORNER_REFINE_SUBPIX
    return cv2.aruco.ArucoDetector(dictionary, params)


def to_gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def reduced(gray: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """(`gray` shrunk by area averaging to about `long_side` px on its longer side, never enlarged; the scale).

    OpenCV averages 2x2 blocks fast and any other factor an order of magnitude slower (34 ms
    against under 2 on a scanned 300 dpi page), so the page is halved while that keeps it at
    least `long_side`, and only the rest of the way is averaged at the odd factor. Each step
    maps pixel centres by its own factor exactly, so the scale is their product. A sliver of a
    page (a side of a pixel or two) is shrunk only as far as it keeps a pixel on every side.
    """
    target = min(1.0, long_side / max(gray.shape))
    image, scale = gray, 1.0
    while target <= scale / 2 and min(image.shape) >= 2:
        image = cv2.resize(image, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
        scale /= 2
    rest = target / scale
    if rest < 1.0 and min(image.shape) * rest >= 1.0:
        image = cv2.resize(image, None, fx=rest, fy=rest, interpolation=cv2.INTER_AREA)
        scale = target
    return image, scale


def detect_fiducials(gray: np.ndarray) -> dict[int, np.ndarray]:
    """The form's markers found on the page: {marker id: its 4 corners in image pixels (ArUco order)}.

    Raises AlignmentError when one detection finds a marker id more than once: two forms side by side
    (or a marker copied onto the page) are not one form, and keeping either would read one bureau's
    return and drop the other's without a word."""
    wanted = {f.marker_id for f in fiducials()}
    small, scale = reduced(gray, DETECT_LONG_SIDE)
    attempts = [(small, scale), (gray, 1.0)] if scale < 1.0 else [(gray, 1.0)]
    found: dict[int, np.ndarray] = {}
    for image, s in attempts:
        corners, ids, _ = _detector().detectMarkers(image)
        if ids is None:
            continue
        seen = [int(i) for i in ids.ravel() if int(i) in wanted]
        twice = sorted({i for i in seen if seen.count(i) > 1})
        if twice:
            # On 200 distorted scans of filled forms (tests/form_fill.py: rotated, scaled, noisy, JPEG'd),
            # no detection ever found an id twice: a repeat is on the page, not noise.
            which = f"repère d'angle {twice[0]} présent" if len(twice) == 1 else (
                f"repères d'angle {', '.join(map(str, twice[:-1]))} et {twice[-1]} présents")
            raise AlignmentError(f"{which} plusieurs fois : plusieurs formulaires sur la page, ou un repère "
                                 "recopié ; une page ne doit porter qu'un formulaire")
        for marker_corners, marker_id in zip(corners, ids.ravel(), strict=True):
            marker_id = int(marker_id)
            if marker_id not in wanted:
                continue
            # Pixel centres are at integer coordinates in OpenCV: scale about the centre, not the corner.
            points = (marker_corners.reshape(4, 2).astype(np.float64) + 0.5) / s - 0.5
            # Seen in both passes (the reduced one missed another marker): the same marker; keep the larger outline.
            if marker_id not in found or cv2.contourArea(points.astype(np.float32)) > cv2.contourArea(
                found[marker_id].astype(np.float32)
            ):
                found[marker_id] = points
        if len(found) == len(wanted):
            break
    return found


def align_page(gray: np.ndarray) -> Alignment:
    """Fit the page-to-image homography from the fiducials, or raise AlignmentError saying why."""
    found = detect_fiducials(gray)
    if len(found) < MIN_MARKERS:
        raise AlignmentError(f"repères d'angle introuvables ({len(found)} sur 4) : page non reconnue comme formulaire")
    by_id = {f.marker_id: f for f in fiducials()}
    src = np.array([c for mid in sorted(found) for c in by_id[mid].corners()], dtype=np.float64)
    dst = np.vstack([found[mid] for mid in sorted(found)])
    homography, _ = cv2.findHomography(src, dst, 0)
    if homography is None:
        raise AlignmentError("repères d'angle incohérents : impossible de redresser la page")
    fitted = cv2.perspectiveTransform(src.reshape(-1, 1, 2), homography).reshape(-1, 2)
    # Resolution from the fit itself: the mean length in pixels of one millimetre along x and y at the page centre.
    centre = np.array([[105.0, 148.5], [106.0, 148.5], [105.0, 149.5]])
    c = cv2.perspectiveTransform(centre.reshape(-1, 1, 2), homography).reshape(-1, 2)
    px_per_mm = float((np.linalg.norm(c[1] - c[0]) + np.linalg.norm(c[2] - c[0])) / 2)
    residual_mm = float(np.sqrt(np.mean(np.sum((fitted - dst) ** 2, axis=1)))) / max(px_per_mm, 1e-9)
    if residual_mm > MAX_RESIDUAL_MM:
        raise AlignmentError(f"repères d'angle incohérents (écart {residual_mm:.1f} mm) : page pliée ou mal lue")
    return Alignment(homography, tuple(sorted(found)), residual_mm, px_per_mm)


def warp_region(gray: np.ndarray, alignment: Alignment, box: Box, px_per_mm: float) -> np.ndarray:
    """The page region `box` (mm) cut straight out of the scan at `px_per_mm`; paper-white outside the scan."""
    x, y, w, h = box
    size = (max(1, round(w * px_per_mm)), max(1, round(h * px_per_mm)))
    # Output pixel (u, v) is at page (x + u / r, y + v / r); composed with the homography it is a scan pixel.
    output_to_mm = np.array([[1.0 / px_per_mm, 0.0, x], [0.0, 1.0 / px_per_mm, y], [0.0, 0.0, 1.0]])
    matrix = alignment.homography @ output_to_mm
    return cv2.warpPerspective(
        gray, matrix, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
        borderValue=255,
    )
