"""The mnist5k split is fixed, stratified and disjoint; IDX and .npz files load correctly."""

from __future__ import annotations

import gzip
import logging
import struct

import numpy as np
import pytest
import torch

import zipfile

import models.datasets as datasets
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


# ---------------------------------------------------------------------------- a user's arrays are checked
def _npz(path, **arrays):
    """A small valid 10-class .npz of distinct images (each image's first pixels encode its index),
    with the given arrays replaced (or removed, given None)."""
    rng = np.random.default_rng(0)

    def images(n, start):
        x = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
        x[:, 0, 0, 0], x[:, 0, 0, 1] = (np.arange(n) + start) % 256, (np.arange(n) + start) // 256
        return x

    data = {"x_train": images(200, 0), "y_train": np.arange(200) % 10,
            "x_test": images(100, 1000), "y_test": np.arange(100) % 10}
    data.update(arrays)
    np.savez(path, **{k: v for k, v in data.items() if v is not None})
    return path


def test_the_valid_fixture_loads(tmp_path):
    ds = npz_dataset(_npz(tmp_path / "d.npz"))
    assert (len(ds.train) + len(ds.val), len(ds.test), ds.class_names) == (200, 100, [str(i) for i in range(10)])


def test_validation_equal_to_test_is_refused(tmp_path):
    base = np.load(_npz(tmp_path / "a.npz"))
    f = _npz(tmp_path / "d.npz", x_val=base["x_test"], y_val=base["y_test"])
    with pytest.raises(ValueError, match="x_val is a copy of x_test"):
        npz_dataset(f)
    # the same images shuffled are no copy, but every one of them is a test image
    f = _npz(tmp_path / "e.npz", x_val=base["x_test"][::-1], y_val=base["y_test"][::-1])
    with pytest.raises(ValueError, match="100 of the 100 validation images are also in the test split"):
        npz_dataset(f)


def test_test_images_in_train_are_refused_above_one_percent_and_logged_below(tmp_path, caplog):
    base = np.load(_npz(tmp_path / "a.npz"))
    val = base["x_train"][:50] ^ 0x80  # 50 images of their own
    leak = np.concatenate([base["x_train"], base["x_test"][:3]])
    f = _npz(tmp_path / "d.npz", x_train=leak, y_train=np.concatenate([base["y_train"], base["y_test"][:3]]),
             x_val=val, y_val=np.arange(50) % 10)
    with pytest.raises(ValueError, match=r"3 of the 203 training images are also in the test split \(3 of its 100"):
        npz_dataset(f)  # 3% of the test split
    # one image by chance (random crops of one photograph do this) is logged, not refused
    f = _npz(tmp_path / "e.npz", x_val=np.concatenate([val[1:], base["x_test"][:1]]), y_val=np.arange(50) % 10)
    with caplog.at_level(logging.WARNING, logger="models.datasets"):
        ds = npz_dataset(f)
    assert len(ds.val) == 50
    assert "1 of the 50 validation images are also in the test split (1 of its 100 images): tolerated" in caplog.text


def test_builtin_mnist5k_has_no_shared_images(mnist):
    datasets.check_disjoint(mnist)  # measured: 0 shared in either split (UCI digits: 0 of 1,797 repeat)


@pytest.mark.parametrize("arrays, message", [
    # one split scaled on its own: a validation pixel at 1.02 once divided x_val alone by 255
    ({"x_train": np.full((200, 1, 8, 8), 0.5, np.float32), "x_test": np.full((100, 1, 8, 8), 0.5, np.float32),
      "x_val": np.full((20, 1, 8, 8), 1.02, np.float32), "y_val": np.arange(20) % 10}, r"\[0.5, 1.02\].*--value-range"),
    ({"x_train": np.linspace(-1, 1, 200 * 64, dtype=np.float32).reshape(200, 1, 8, 8),
      "x_test": np.zeros((100, 1, 8, 8), np.float32)}, r"span \[-1, 1\] but must be in \[0, 1\].*--value-range LO,HI"),
    ({"x_test": np.zeros((100, 1, 8, 8), np.float32)}, "differ in type"),
    ({"x_train": np.zeros((200, 16, 16, 4), np.uint8)}, r"1 or 3 channels \(RGBA\? drop the alpha"),
    ({"x_test": np.zeros((100, 1, 9, 9), np.uint8)}, r"differ in shape \(x_train \(1, 8, 8\), x_test \(1, 9, 9\)\)"),
    ({"y_test": np.arange(50) % 10}, "x_test holds 100 images but y_test 50 labels"),
    ({"y_train": np.arange(200) % 10 + 10, "y_test": np.arange(100) % 10 + 10}, "10 of the 20 classes have no training image"),
    # one class: the quick preset built and served a bundle that answers it for every image
    ({"y_train": np.zeros(200, np.int64), "y_test": np.zeros(100, np.int64)}, "every label is 0: .*needs at least 2 classes"),
    ({"y_train": np.zeros(200, np.int64), "y_test": np.zeros(100, np.int64), "class_names": np.array(["only"])},
     "needs at least 2 classes"),
    # carved, class 3's one image would go to validation, leaving none to train on
    ({"y_train": np.where(np.arange(200) % 10 == 3, 4, np.arange(200) % 10) + np.eye(200, dtype=np.int64)[3] * -1},
     "class 3 has a single training image and no validation split was given"),
    ({"class_names": np.array(["a", "b", "c"])}, "labels go up to 9 but class_names names 3 classes"),
    ({"y_train": np.eye(10)[np.arange(200) % 10]}, r"y_train has shape \(200, 10\).*one-hot"),
    ({"y_train": (np.arange(200) % 10) + 0.5}, "y_train holds non-integer values"),
    ({"y_test": -(np.arange(100) % 10)}, "labels go down to -9"),
    ({"x_train": np.zeros((0, 1, 8, 8), np.uint8), "y_train": np.zeros(0, np.int64)}, "x_train holds no images"),
    ({"y_test": None}, "lacks y_test"),
    # counts on another scale (UCI's digits: 0-16) read as 0-255 were near black: chance accuracy
    ({"x_train": np.arange(200 * 64).reshape(200, 1, 8, 8) % 17, "x_test": np.arange(100 * 64).reshape(100, 1, 8, 8) % 17},
     r"integer pixels span \[0, 16\]: read as 0-255 they would all be at most 0.06.*x / 16"),
])
def test_a_users_mistake_is_one_line_naming_it(tmp_path, arrays, message):
    with pytest.raises(ValueError, match=message) as exc:
        npz_dataset(_npz(tmp_path / "d.npz", **arrays))
    assert "\n" not in str(exc.value)


def test_column_labels_and_integral_float_labels_are_accepted(tmp_path):
    ds = npz_dataset(_npz(tmp_path / "d.npz", y_train=(np.arange(200) % 10)[:, None],
                          y_test=(np.arange(100) % 10).astype(np.float32)))
    assert ds.train.y.dtype == torch.int64 and ds.train.y.ndim == 1 and ds.test.y.tolist()[:3] == [0, 1, 2]


def test_scaling_is_one_decision_for_every_split(tmp_path):
    x = np.full((200, 1, 8, 8), 0.25, np.float32)
    x[:, 0, 0, 0] = np.arange(200) / 1000  # distinct images
    ds = npz_dataset(_npz(tmp_path / "d.npz", x_train=x, x_test=x[:100] + 0.5))
    assert float(ds.train.x.max()) == 0.25 and float(ds.test.x.max()) == pytest.approx(0.75)


# ---------------------------------------------------------------------------- sizes are checked before reading
def test_npz_declaring_a_huge_array_is_refused_before_reading(tmp_path, monkeypatch):
    f = tmp_path / "bomb.npz"
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("x_train.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (4_000, 1, 100, 100)})
            block = bytes(2**20)
            for _ in range(40):  # 40 MiB of zeros, ~40 KiB compressed
                fh.write(block)
    with pytest.raises(ValueError, match=r"x_train declares .* over 1000x"):
        npz_dataset(f)
    # a header larger than what the archive holds (a lying header) is refused as well
    g = tmp_path / "lie.npz"
    with zipfile.ZipFile(g, "w") as zf:
        with zf.open("x_train.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 1, 28, 28)})
            fh.write(bytes(100))
    with pytest.raises(ValueError, match="more than the archive holds"):
        npz_dataset(g)
    monkeypatch.setattr(datasets, "MAX_DATASET_BYTES", 10_000)
    with pytest.raises(ValueError, match="MAX_DATASET_BYTES"):
        npz_dataset(_npz(tmp_path / "d.npz"))


def test_idx_declaring_a_huge_array_is_refused_before_reading(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 10**6, 2000, 2000))
    with pytest.raises(ValueError, match="declares 3725.3 GiB of pixels, over the 4 GiB limit"):
        load_dataset(f"idx:{tmp_path}")


def test_integer_splits_of_different_widths_are_one_scale(tmp_path):
    base = np.load(_npz(tmp_path / "a.npz"))
    ds = npz_dataset(_npz(tmp_path / "d.npz", x_test=base["x_test"].astype(np.int64)))
    assert float(ds.test.x.max()) <= 1.0 and float(ds.test.x.max()) > 0.9


def test_the_photos_example_loads_with_its_chance_duplicates_logged(tmp_path, caplog):
    """examples/sample_photos.py crops at random spots, and a few test crops are train or
    validation crops too (measured: 3 of 480 validation, 2 of 1,920 training): within the
    tolerance, so README's worked example keeps loading."""
    pytest.importorskip("sklearn")
    from examples.sample_photos import load

    np.savez(tmp_path / "p.npz", **load())
    with caplog.at_level(logging.WARNING, logger="models.datasets"):
        ds = npz_dataset(tmp_path / "p.npz")
    assert len(ds.test) == 800 and "3 of the 480 validation images are also in the test split" in caplog.text
