#!/usr/bin/env python3
"""Registry load time for 10,000 and 100,000 bureaux (PINs are verified lazily, never at load).

    .venv/bin/python bench/registry_load.py
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from registry import load_registry
from registry.demo import generate


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for count in (10_000, 100_000):
            path = Path(tmp) / f"registry-{count}.csv"
            # The hash cost only changes the generation time: loading never computes a hash.
            generate(count, path, Path(tmp) / f"pins-{count}.csv", scrypt_n=2**4)
            runs = []
            for _ in range(5):
                t0 = time.perf_counter()
                registry = load_registry(path)
                runs.append(time.perf_counter() - t0)
            assert len(registry) == count
            size = path.stat().st_size / 1e6
            print(f"{count:>7} bureaux ({size:.1f} MB CSV): load median {statistics.median(runs) * 1000:.0f} ms, "
                  f"best {min(runs) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
