"""The mnist5k split is fixed, stratified and disjoint; IDX and .npz files load correctly."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from models.datasets import load_dataset, npz_dataset, stratified_split


def test_mnist5k_split_is_fixed_stratified_and_disjoint(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    assert torch.bincount(mnist.test.y).tolist() == [100] * 10
    assert torch.bincount(mnist.val.y).tolist() == [50] * 10
    assert mnist.train.x.shape[1:] == (1, 28, 28) and mnist.train.x.dtype == torch.float32
    assert 0.0 <= float(mnist.test.x.min()) and float(mnist.test.x.max()) <= 1.0
    # no test digit appears in train or validation (compare pixel content)
    flat = lambda s: {hash(row.numpy().tobytes()) for row in (s.x * 255).round().to(torch.uint8).flatten(1)}  # noqa: E731
    test = flat(mnist.test)
    assert not test & flat(mnist.train) and not test & flat(mnist.val)
    again = load_dataset("mnist5k")
    assert torch.equal(again.test.x, mnist.test.x) and torch.equal(again.train.y, mnist.train.y)


def test_per_class_subset_is_balanced_in_every_prefix(mnist):
    sub = mnist.test.per_class(20)
    assert len(sub) == 200
    assert torch.bincount(sub.y[:50], minlength=10).min() >= 5


def test_stratified_split_refuses_too_small_classes():
    with pytest.raises(ValueError):
        stratified_split(np.array([0, 0, 1]), [2], seed=0)


def _write_idx(path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_idx_files_load(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    ds = load_dataset(f"idx:{tmp_path}")
    assert len(ds.test) == 20 and len(ds.train) + len(ds.val) == 60
    assert ds.train.x.shape[1:] == (1, 28, 28) and float(ds.train.x.max()) <= 1.0


def test_truncated_idx_is_refused(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 10, 28, 28) + b"\0" * 10)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset(f"idx:{tmp_path}")


def test_npz_with_nhwc_color_images(tmp_path):
    rng = np.random.default_rng(1)
    f = tmp_path / "d.npz"
    np.savez(f, x_train=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), y_train=np.arange(100) % 10,
             x_test=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_test=np.arange(20) % 10)
    ds = npz_dataset(f)
    assert ds.train.x.shape[1:] == (3, 32, 32) and ds.input_shape == (3, 32, 32)
    assert len(ds.train) + len(ds.val) == 100 and len(ds.val) > 0
