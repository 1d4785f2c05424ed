"""Per-upload recognition artefacts kept for the review UI: the contract between the OCR and review.

Under `<var>/uploads/artefacts/<upload_id>/`:
- `page.jpg`: the straightened page of a scan, grayscale (a JPEG, as scans are: a sixth of the time and
  a third of the size of a lossless copy of the paper's grain, which the raw upload keeps anyway);
  `page.png` for the page rendered from InkML strokes (clean lines, which PNG keeps small and sharp);
- `field-<field_id>.png`: each field's crop (all its boxes), as the reviewer sees it;
- `reading.json`: {"fields": {"<field_id>": {"value": int | null, "confidence": float,
  "digits": [{"digit": int | null, "confidence": float, "alternatives": [[d, p], ...]}, ...]}},
  "suggestions": [["<field_id>", value], ...], "bureau": "...", "election": "...",
  "qr": "<decoded QR text or null>"}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def artefact_dir(var_dir: Path, upload_id: str) -> Path:
    if not upload_id.isalnum():
        raise ValueError(f"bad upload id {upload_id!r}")
    return var_dir / "uploads" / "artefacts" / upload_id


SCAN_PAGE, INK_PAGE = "page.jpg", "page.png"  # one of them per upload


def page_path(var_dir: Path, upload_id: str) -> Path:
    """The upload's page image as it was written (a scan's JPEG or an ink page's PNG); page.png when there is none."""
    scan = artefact_dir(var_dir, upload_id) / SCAN_PAGE
    return scan if scan.is_file() else scan.with_name(INK_PAGE)


def field_crop_path(var_dir: Path, upload_id: str, field_id: str) -> Path:
    return artefact_dir(var_dir, upload_id) / f"field-{field_id}.png"


def reading_path(var_dir: Path, upload_id: str) -> Path:
    return artefact_dir(var_dir, upload_id) / "reading.json"


def load_reading(var_dir: Path, upload_id: str) -> dict[str, Any] | None:
    path = reading_path(var_dir, upload_id)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
