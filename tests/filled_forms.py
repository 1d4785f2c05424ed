"""Filled results forms as docking stations upload them, written with real held-out handwriting (tests/form_fill.py),
and what the recognition tests share about reading them: the digit model, a draw it reads as written, a slip of the
pen that one digit mends. Used by test_recognition.py, test_recognition_job.py and the review's end-to-end tests."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np
import pytest

from forms import Election
from pen_gateway.decode import decode_upload
from pen_gateway.recognition.assess import UploadFacts, assess
from pen_gateway.recognition.pipeline import PageReading, read_page
from registry import Registry
from tests.form_fill import (
    Distortion,
    consistent_counts,
    distort,
    encode_image,
    handwriting_available,
    inkml_document,
    load_handwriting,
    pen_strokes,
    scan_page,
)
from validation import check_arithmetic, suggest_single_digit_fixes

ELECTION = "primaire-2011-t1"
needs_handwriting = pytest.mark.skipif(
    not handwriting_available(),
    reason="../shared/data/handwriting is absent: these tests write real held-out handwriting into forms",
)


def inkml_upload(election: Election, counts: dict[str, Any], seed: int, align: str = "right") -> bytes:
    """The InkML document of a form whose boxes are written with the pen (draw `seed`)."""
    strokes, _ = pen_strokes(election, counts, load_handwriting(), np.random.default_rng(seed), align=align)
    return inkml_document(strokes)


def scan_upload(election: Election, bureau: str, counts: dict[str, int], seed: int, *, source: str = "pen",
                distortion: Callable[[np.random.Generator], Distortion] = Distortion.random,
                quality: int = 90) -> bytes:
    """A JPEG scan of the printed form for `bureau`, filled (draw `seed`) and distorted as a scanner does."""
    rng = np.random.default_rng(seed)
    page, _ = scan_page(election, bureau, counts, load_handwriting(), rng, source=source)
    scanned, _ = distort(page, distortion(rng), rng)
    return encode_image(scanned, ".jpg", quality)


@cache
def recognizer():  # type: ignore[no-untyped-def]
    from pen_gateway.digits.recognizer import DigitRecognizer

    return DigitRecognizer()


@cache
def threshold() -> float:
    from pen_gateway.digits.recognizer import RECOMMENDED_THRESHOLD

    return RECOMMENDED_THRESHOLD


def read(data: bytes, content_type: str) -> PageReading:
    return read_page(decode_upload(data, content_type), recognizer(), ELECTION)


def well_read_seed(read: Callable[[int], PageReading], expected: dict[str, int | None], *,
                   confident: Registry | None = None, bureau: str | None = None) -> int:
    """The first handwriting draw (seed) the model reads exactly as written (and accepts, given `confident`).

    A test about what happens *after* a right reading (a slip's suggestion, an accepted return)
    starts from one; the model's own accuracy is measured by the recognition tests and the bench.
    """
    for seed in range(1, 25):
        reading = read(seed)
        if {fid: fr.value for fid, fr in reading.fields.items()} != expected:
            continue
        if confident is not None and assess(reading, UploadFacts("u", "s", None, bureau), confident, ELECTION,
                                            threshold()).findings:
            continue
        return seed
    pytest.fail("the digit model read none of 24 handwritten forms as written")


def slip_with_one_fix(election: Election, seed: int) -> tuple[dict[str, int], dict[str, int], str]:
    """Figures with one candidate's digit miswritten such that exactly one single-digit change restores them."""
    rng = np.random.default_rng(seed)
    while True:
        truth = consistent_counts(election, rng, inscrits=1200)
        field = election.candidates[int(rng.integers(len(election.candidates)))].id
        if truth[field] < 100:
            continue
        text = str(truth[field])
        wrong = {**truth, field: int(text[0] + str((int(text[1]) + 1 + int(rng.integers(8))) % 10) + text[2:])}
        if check_arithmetic(wrong, election) and suggest_single_digit_fixes(wrong, election) == [(field, truth[field])]:
            return truth, wrong, field
