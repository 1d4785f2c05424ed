"""The paper form: `forms layout` geometry, `forms print` PNG and PDF, and what is printed where."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import run_gateway
from forms.layout import (
    FIDUCIAL_IDS,
    QR_BOX,
    QR_TEXT_BOX,
    FormIdentity,
    form_layout,
    form_text,
    parse_form_text,
)
from forms.render import qr_matrix, render_form
from pen_gateway.recognition.align import align_page
from pen_gateway.recognition.identify import identify_scan, read_qr
from tests.form_fill import Distortion, distort


def _overlap(a: list[float], b: list[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


@pytest.mark.parametrize("election_id", ["primaire-2011-t1", "primaire-2011-t2"])
def test_forms_layout_prints_the_geometry_as_design_says(
    election_id: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert run_gateway.main(["forms", "layout", "--election", election_id, "--var-dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"page", "fields"}
    assert doc["page"] == {"width_mm": 210, "height_mm": 297}
    from forms import load_election

    election = load_election(election_id)
    assert [f["id"] for f in doc["fields"]] == [f.id for f in election.fields]
    all_cells = []
    for field, definition in zip(doc["fields"], election.fields, strict=True):
        assert set(field) == {"id", "cells"}
        assert len(field["cells"]) == definition.max_digits
        xs = [c[0] for c in field["cells"]]
        assert xs == sorted(xs), "cells in reading order, left to right"
        for x, y, w, h in field["cells"]:
            assert 6.5 <= w <= 9 and 8.5 <= h <= 11, "about 7 x 9 mm per digit box"
            assert x > 0 and x + w < 210 and y > 0 and y + h < 297
        all_cells.extend(field["cells"])
    for i, a in enumerate(all_cells):
        for b in all_cells[i + 1 :]:
            assert not _overlap(a, b)


def test_the_layout_keeps_boxes_clear_of_the_markers_and_the_qr(election_t1) -> None:  # type: ignore[no-untyped-def]
    layout = form_layout(election_t1)
    corners = {f.marker_id: f.box for f in layout.fiducials}
    assert set(corners) == set(FIDUCIAL_IDS.values())
    assert corners[FIDUCIAL_IDS["top_left"]][:2] < corners[FIDUCIAL_IDS["bottom_right"]][:2]
    printed = [*corners.values(), layout.qr_box, layout.qr_text_box, layout.signature_box]
    for f in layout.fields:
        for cell in f.cells:
            assert not any(_overlap(list(cell), list(other)) for other in printed)
        assert not _overlap(list(f.label_box), list(f.bounds))


def test_forms_print_png_is_a4_at_300_dpi_for_the_bureau(tmp_path: Path, demo_registry_files) -> None:  # type: ignore[no-untyped-def]
    registry_csv, _ = demo_registry_files
    bureau = registry_csv.read_text().splitlines()[1].split(",")[0]
    out = tmp_path / "pv.png"
    argv = ["forms", "print", "--election", "primaire-2011-t2", "--bureau", bureau, "--out", str(out),
            "--registry", str(registry_csv), "--var-dir", str(tmp_path)]
    assert run_gateway.main(argv) == 0
    with Image.open(out) as image:
        assert image.size == (2480, 3508)
        assert image.mode == "L"
        assert round(image.info["dpi"][0]) == 300
        page = np.array(image)
    identity = identify_scan(page, align_page(page)).identity
    assert identity == FormIdentity("primaire-2011-t2", bureau, 1)


def test_forms_print_pdf_is_one_a4_page(tmp_path: Path) -> None:
    out = tmp_path / "pv.pdf"
    argv = ["forms", "print", "--bureau", "750120", "--out", str(out), "--var-dir", str(tmp_path)]
    assert run_gateway.main(argv) == 0
    data = out.read_bytes()
    assert data.startswith(b"%PDF")
    assert data.count(b"/Type /Page\n") + data.count(b"/Type /Page ") + data.count(b"/Type/Page") >= 1
    # 2480 x 3508 px at 300 dpi is A4: 595.2 x 841.9 points.
    assert b"/MediaBox [0 0 595.2 841.92]" in data or b"/MediaBox [ 0 0 595.2 841.92 ]" in data


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bureau", "75-01", "--out", "x.png"], "must be 1 to 10 digits"),
        (["--bureau", "750120", "--out", "x.tiff"], "must end in .png or .pdf"),
        (["--bureau", "750120", "--out", "x.png", "--election", "presidentielle-2012"], "no such election"),
    ],
)
def test_forms_print_refuses_bad_arguments_clearly(tmp_path: Path, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exc:
        run_gateway.main(["forms", "print", "--var-dir", str(tmp_path), *argv])
    assert message in str(exc.value)
    assert not (tmp_path / "x.png").exists()


def test_forms_print_refuses_a_bureau_the_registry_does_not_know(tmp_path: Path, demo_registry_files) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "pv.png"
    with pytest.raises(SystemExit, match="not in the registry"):
        run_gateway.main(["forms", "print", "--bureau", "9999999999", "--out", str(out),
                          "--registry", str(demo_registry_files[0]), "--var-dir", str(tmp_path)])
    assert not out.exists()


def test_the_qr_and_the_printed_text_say_the_same(election_t1) -> None:  # type: ignore[no-untyped-def]
    text = form_text(election_t1.id, "750120", election_t1.form_version)
    assert parse_form_text(text) == FormIdentity("primaire-2011-t1", "750120", 1)
    # Tesseract's habits: a line break, spaces dropped.
    assert parse_form_text("primaire-2011-t1\nbureau750120formulaire1") == FormIdentity("primaire-2011-t1", "750120", 1)
    assert parse_form_text("bureau formulaire") is None
    page = np.array(render_form(election_t1, "750120"))
    x, y, w, h = (round(v * 300 / 25.4) for v in QR_BOX)
    assert read_qr(page[y - 40 : y + h + 40, x - 40 : x + w + 40]) == text
    assert qr_matrix(text).shape[0] == qr_matrix(text).shape[1]


@pytest.mark.parametrize("bureau", ["750120", "750560012", "7505600123"])
def test_the_printed_identity_lies_where_tesseract_reads_it_whatever_the_codes_length(election_t1, bureau: str) -> None:  # type: ignore[no-untyped-def]
    """A nine-digit bureau code (a commune's INSEE code and its bureau number) printed its line 65 mm wide
    under a 57 mm box: cut off at both ends, "bu" and the form version lost, Tesseract's reading named no
    bureau and a page whose QR a pen mark had spoilt went to a human with no bureau of its own."""
    page = np.array(render_form(election_t1, bureau))
    s = 300 / 25.4
    x, y, w, h = QR_TEXT_BOX
    band = page[round(y * s) : round((y + h) * s), round(130 * s) :]  # right of the form's own headings
    columns = np.flatnonzero((band < 128).any(axis=0)) / s + 130
    assert columns.size and x <= columns.min() and columns.max() <= x + w
    qx, qy, _qw, _qh = QR_BOX
    page[round((qy + 4) * s) : round((qy + 20) * s), round((qx + 4) * s) : round((qx + 26) * s)] = 0  # QR spoilt
    scanner = Distortion(rotation_deg=1.0, noise=2, blur=0.5, jpeg_quality=None)
    scan, _ = distort(page, scanner, np.random.default_rng(2))
    found = identify_scan(scan, align_page(scan))
    assert found.how == "text" and found.identity is not None and found.identity.bureau == bureau
    assert found.raw is not None and "formulaire1" in found.raw.replace(" ", ""), "the version is read, not assumed"
