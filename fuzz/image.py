"""Fuzz target: the image decoding path (`pen_gateway.decode`, PNG/JPEG/TIFF through Pillow).

Invariants (`check_image` raises `AssertionError` when it breaks): `decode_upload(data, type)` either
raises `DecodeError` (a code, a message, 415 or 422) or returns a grayscale page: a C-contiguous
2-D uint8 array of at most `MAX_PAGE_PIXELS` pixels (a decompression bomb is refused, not decoded),
and a dpi that is None or a finite positive number. The upload-time `probe_upload` (what the
endpoint runs) is held to the same: DecodeError or nothing. Memory and time per input are bounded
by libFuzzer (`-rss_limit_mb`, `-timeout`, set by fuzz/run.py).

Input layout: byte 0 picks the mode, byte 1 the declared type. Even mode: the rest is the file as
is (the seeds are small valid PNG/JPEG/TIFF pages from fuzz/seeds.py; libFuzzer mutates them).
Odd mode: structure-aware; byte 2 picks a seed page, then each group of bytes is one mutation
(overwrite, insert, delete, an interesting 16/32-bit value such as a huge width), and PNG chunk
CRCs are recomputed when asked, so that mutations reach the decoder instead of the checksum.

Run: `.venv/bin/python fuzz/run.py --target image --seconds 600`.
"""

from __future__ import annotations

import math
import struct
import sys
import warnings

import numpy as np

from fuzz._harness import ByteReader, fuzz_main, instrumenting
from fuzz.seeds import fix_png_crcs, seed_images

with instrumenting(__name__ == "__main__", ["pen_gateway.decode", "PIL"]):
    from pen_gateway.decode import JPEG, MAX_PAGE_PIXELS, PNG, TIFF, DecodeError, decode_upload, probe_upload

# Mostly "undeclared" (the content decides), so that most inputs reach the decoder.
DECLARED = (None, None, None, None, None, PNG, JPEG, TIFF, "application/octet-stream", "image/jpg", "image/x-tiff",
            "text/plain", "image/png; q=1", "application/inkml+xml")
INTERESTING = (0, 1, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               40_000, 65_500, 6_400)


def raw_input(data: bytes, declared: int = 0) -> bytes:
    """The fuzz input that feeds `data` as is (for the seed corpus and the regression tests)."""
    return bytes([0, declared]) + data


def mutated_seed(reader: ByteReader) -> bytes:
    seeds = seed_images()
    names = sorted(seeds)
    data = bytearray(seeds[names[reader.byte() % len(names)]])
    fix_crcs = reader.flag()
    for _ in range(reader.int_in(0, 8)):
        if reader.exhausted or not data:
            break
        op = reader.int_in(0, 5)
        at = reader.int_in(0, max(0, len(data) - 1))
        if op == 0:
            data[at] = reader.byte()
        elif op == 1:
            data[at:at] = reader.take(reader.int_in(1, 16))
        elif op == 2:
            del data[at : at + reader.int_in(1, 64)]
        elif op == 3:
            data[at : at + 2] = struct.pack(">H", int(reader.pick(INTERESTING)) & 0xFFFF)
        elif op == 4:
            value = int(reader.pick(INTERESTING))
            data[at : at + 4] = struct.pack(">I" if reader.flag() else "<I", value & 0xFFFFFFFF)
        else:  # truncate
            del data[at:]
    return fix_png_crcs(bytes(data)) if fix_crcs else bytes(data)


def check_image(data: bytes, declared: str | None = None) -> None:
    """The decoders' contract on one image upload; AssertionError (with the original exception) when broken.

    Both entry points are checked: `probe_upload` is what the upload endpoint runs, `decode_upload`
    what the OCR runs. They need not agree: the probe is stricter on purpose in places (it walks a
    TIFF's whole IFD chain and a PNG's chunks to IEND) and cheaper in others (it does not inflate a
    PNG's pixels), so each is only held to raising nothing but DecodeError.
    """
    try:
        probe_upload(data, declared)
    except DecodeError as exc:
        assert exc.http_status in (415, 422) and exc.code and exc.code.isupper() and exc.message, vars(exc)
    except Exception as exc:
        raise AssertionError(f"probe_upload raised {type(exc).__name__}: {exc}") from exc
    try:
        page = decode_upload(data, declared)
    except DecodeError as exc:
        assert exc.http_status in (415, 422) and exc.code and exc.code.isupper() and exc.message, vars(exc)
        return
    except Exception as exc:
        raise AssertionError(f"decode_upload raised {type(exc).__name__}: {exc}") from exc
    if page.kind == "ink":
        return  # declared and sniffed as InkML: the InkML target's business
    pixels = page.image
    assert isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2, pixels
    assert pixels.flags["C_CONTIGUOUS"]
    assert 0 < pixels.size <= MAX_PAGE_PIXELS, pixels.shape
    assert page.dpi is None or (math.isfinite(page.dpi) and page.dpi > 0), f"dpi {page.dpi!r}"


def test_one_input(data: bytes) -> None:
    reader = ByteReader(data)
    mode = reader.byte()
    declared = DECLARED[reader.byte() % len(DECLARED)]
    image = mutated_seed(reader) if mode & 1 else reader.rest()
    check_image(image, declared)


if __name__ == "__main__":
    seed_images()  # made once, before libFuzzer starts timing inputs
    warnings.simplefilter("ignore", UserWarning)  # Pillow warns on every corrupt EXIF block
    fuzz_main(test_one_input, sys.argv)
