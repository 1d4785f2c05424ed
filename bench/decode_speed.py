#!/usr/bin/env python3
"""Time `pen_gateway.decode.decode_upload` on realistic 300 dpi scans of the paper form.

Each scan is the printed form of `primaire-2011-t1` put through `tests/form_fill.py`'s scanner
(rotation, scale, grey paper, noise, blur, JPEG 45-90), like `bench/ocr_accuracy.py`'s scans.
Prints the median decode time per scan, and what `np.median` over the page (the old negative-page
test) would cost on the same pixels.

    .venv/bin/python bench/decode_speed.py --scans 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from form_fill import Distortion, distort, encode_image, render_form  # noqa: E402

from forms import load_election  # noqa: E402
from pen_gateway.decode import decode_upload  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="decodes of each scan; the fastest counts")
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    page = np.array(render_form(load_election("primaire-2011-t1"), "750120"), dtype=np.uint8)
    decode_ms: list[float] = []
    median_ms: list[float] = []
    sizes: list[int] = []
    for _ in range(args.scans):
        d = Distortion.random(rng)
        image, _ = distort(page, d, rng)
        data = encode_image(image, ".jpg", d.jpeg_quality or 90)
        sizes.append(len(data))
        runs = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            decoded = decode_upload(data, "image/jpeg")
            runs.append(time.perf_counter() - started)
        decode_ms.append(1000 * min(runs))
        assert decoded.image is not None
        started = time.perf_counter()
        np.median(decoded.image)
        median_ms.append(1000 * (time.perf_counter() - started))
    print(f"{args.scans} scans (JPEG, median {statistics.median(sizes) / 1e3:.0f} KB, ~2750x3850 px)")
    print(f"  decode_upload per scan  median {statistics.median(decode_ms):.1f} ms  "
          f"(min {min(decode_ms):.1f}, max {max(decode_ms):.1f})")
    print(f"  np.median over the page median {statistics.median(median_ms):.1f} ms  "
          f"(min {min(median_ms):.1f}, max {max(median_ms):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
