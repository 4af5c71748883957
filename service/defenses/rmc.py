"""RMC, runtime masking and cleansing (Wu, Yuan & Wu, ICML 2020), as the pipeline's adapter.

Offline (`models/recipes/rmc.py`): D′ = the training split plus PGD copies of it, indexed by
the frozen base network's penultimate features. Per request, for each image x:

    N(x)   = the K nearest neighbours of features(x) in D′          (FAISS, exact L2 by default)
    θ_x    = θ_bundle fine-tuned with Adam on N(x) with their true labels
    answer = argmax f(x; θ_x)

An adversarial x lands in a region of feature space where D′ holds adversarial examples
with their *true* labels; fine-tuning on them re-draws the decision boundary there
("cleansing"), and because only x's neighbourhood is used, the rest is left alone ("masking").

Modes
  isolated (default)  every image starts from the bundle's weights; nothing a client sends
                      can change what another client gets.
  online              the paper's setting: weights carry over from image to image (one stream
                      per replica, behind a lock), with periodic in-memory snapshots and a reset
                      through `POST /admin/rmc/reset`. One client's inputs steer the model that
                      answers the next client: see docs/defenses/rmc.md before turning it on.

Concurrent images adapt together: `torch.func.vmap` over per-image parameter copies, with
a functional Adam, so a batch of B images costs one batched step instead of B small ones.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from service.defenses.base import Classify, Component, DefenseEnv, RunContext

log = logging.getLogger("shieldserve.rmc")

NAME = "rmc"
DATA_ARTIFACT = "rmc_dataset"
INDEX_ARTIFACT = "rmc_index"
# The paper's K on CIFAR-10, and that D′'s size (50,000 training images + 3 PGD copies).
PAPER_K, PAPER_DPRIME = 1024, 200_000
INDEX_KINDS = ("flat", "ivf", "hnsw")


def scaled_k(dprime: int, minimum: int = 16) -> int:
    """K scaled from the paper's K / |D′| to this D′."""
    return int(min(dprime, max(minimum, round(PAPER_K * dprime / PAPER_DPRIME))))


# ============================================================================ nearest neighbours
def _faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported on first use
    except ImportError as exc:
        raise ImportError("RMC's index needs FAISS: pip install 'shieldserve[knn]' "
                          "(or 'shieldserve[gpu]' for faiss-gpu)") from exc
    return faiss


def build_faiss_index(features: torch.Tensor, kind: str = "flat", *, nlist: int = 64,
                      hnsw_m: int = 32, seed: int = 0) -> Any:
    """An L2 index over `features` (N, d): exact `IndexFlatL2`, or IVF / HNSW for a large D′."""
    faiss = _faiss()
    x = np.ascontiguousarray(features.detach().float().cpu().numpy())
    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatL2(d)
    elif kind == "ivf":
        nlist = max(1, min(nlist, x.shape[0] // 39))  # FAISS wants ~39 points per centroid
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist, faiss.METRIC_L2)
        index.cp.seed = seed
        index.train(x)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m)
    else:
        raise ValueError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
    index.add(x)
    return index


def serialize_index(index: Any) -> torch.Tensor:
    """FAISS's own byte format as a uint8 tensor, so it can live in a safetensors file."""
    return torch.from_numpy(np.ascontiguousarray(_faiss().serialize_index(index)))


# The index classes `build_faiss_index` writes, by FAISS's fourcc: every one begins with
# fourcc, d (int32), ntotal (int64), two int64 placeholders, is_trained (1 byte), metric (int32).
INDEX_FOURCCS = {b"IxF2": "IndexFlatL2", b"IwFl": "IndexIVFFlat", b"IHNf": "IndexHNSWFlat"}
_HEADER = 4 + 4 + 8 + 8 + 8 + 1 + 4
_FLAT_HEADER = _HEADER + 8  # ... then the codes' length (uint64) and d*ntotal float32
# FAISS writes a float metric_arg after the metric for metrics past L2, which would shift
# every offset below: the indexes shieldserve writes are all L2.
_METRIC_L2 = 1
# The first faiss-cpu with both `set_deserialization_vector_byte_limit` and the HNSW graph
# checks on read (facebookresearch/faiss #4928 and #4949, both first tagged in v1.14.2).
SAFE_FAISS = "1.14.2"
_deserialize_lock = threading.Lock()


def _int_at(raw: np.ndarray, offset: int, fmt: str, what: str) -> int:
    from models.bundle import BundleError  # noqa: PLC0415

    width = np.dtype(fmt).itemsize
    if offset + width > raw.size:
        raise BundleError(f"RMC index: {raw.size} bytes end before its {what} (at byte {offset})")
    return int(np.frombuffer(raw, fmt, 1, offset)[0])


def _ivf_layout(raw: np.ndarray, d: int, n: int) -> tuple[int, int]:
    """An IndexIVFFlat's header as index_write.cpp lays it out: after the common header, nlist
    and nprobe (uint64), the coarse quantizer (a whole IndexFlatL2 of nlist centroids), the
    direct map (type byte, then a uint64-counted vector) and the inverted lists' own header
    ("ilar", nlist, code_size). FAISS builds per-list structures from the "ilar" nlist before
    it compares it with anything (~170 bytes a list: 2^25 lists grew the process by 5.3 GiB
    out of a 1.2 MB file), so both counts are bounded here. Returns nlist and the offset of
    the lists' sizes."""
    from models.bundle import BundleError  # noqa: PLC0415

    nlist = _int_at(raw, _HEADER, "<u8", "nlist")
    nprobe = _int_at(raw, _HEADER + 8, "<u8", "nprobe")
    if not 1 <= nlist <= n:
        raise BundleError(f"RMC index: IndexIVFFlat of {n} vectors declares {nlist} inverted lists "
                          f"(1 to {n})")
    if not 1 <= nprobe <= nlist:
        raise BundleError(f"RMC index: IndexIVFFlat probes {nprobe} of its {nlist} lists")
    q = _HEADER + 16
    fourcc = raw[q:q + 4].tobytes()
    qd, qn = _int_at(raw, q + 4, "<i4", "quantizer's d"), _int_at(raw, q + 8, "<i8", "quantizer's ntotal")
    qmetric = _int_at(raw, q + _HEADER - 4, "<i4", "quantizer's metric")
    if fourcc != b"IxF2" or qd != d or qn != nlist or qmetric != _METRIC_L2:
        raise BundleError(f"RMC index: IndexIVFFlat's quantizer must be an IndexFlatL2 of its {nlist} centroids "
                          f"of dimension {d}, got {fourcc!r} with d={qd}, ntotal={qn}, metric {qmetric}")
    # The quantizer's codes count is left to FAISS, which refuses one other than d*ntotal under
    # the byte limit: the next offsets hold for every file it reads.
    at = q + _FLAT_HEADER + 4 * d * nlist
    direct_map, direct_ids = _int_at(raw, at, "<u1", "direct map"), _int_at(raw, at + 1, "<u8", "direct map")
    if direct_map != 0 or direct_ids != 0:
        raise BundleError(f"RMC index: IndexIVFFlat with a direct map (type {direct_map}, {direct_ids} ids); "
                          f"shieldserve writes none")
    at += 9
    lists = raw[at:at + 4].tobytes()
    lists_nlist, code_size = _int_at(raw, at + 4, "<u8", "lists' nlist"), _int_at(raw, at + 12, "<u8", "code size")
    if lists != b"ilar" or lists_nlist != nlist or code_size != 4 * d:
        raise BundleError(f"RMC index: IndexIVFFlat's inverted lists must be 'ilar' with its {nlist} lists of "
                          f"{4 * d}-byte codes, got {lists!r} with {lists_nlist} lists of {code_size}-byte codes")
    return nlist, at + 20


def check_ivf_lists(raw: np.ndarray, d: int, n: int) -> None:
    """An IndexIVFFlat's list sizes (a "full" vector of nlist counts, or "sprs" (list, count)
    pairs) must add up to ntotal, and the file must end with exactly their codes and ids: FAISS
    takes the header's ntotal and each list's count at its word, and allocates a list (up to
    its byte limit, twice the file) before it finds the bytes missing."""
    from models.bundle import BundleError  # noqa: PLC0415

    nlist, at = _ivf_layout(raw, d, n)
    kind, count = raw[at:at + 4].tobytes(), _int_at(raw, at + 4, "<u8", "list sizes")
    if not ((kind == b"full" and count == nlist) or (kind == b"sprs" and count % 2 == 0 and count <= 2 * nlist)):
        raise BundleError(f"RMC index: IndexIVFFlat's list sizes are {kind!r} with {count} values "
                          f"for {nlist} lists")
    at += 12
    if at + 8 * count > raw.size:
        raise BundleError(f"RMC index: {raw.size} bytes end inside its {count} list sizes")
    values = np.frombuffer(raw, "<u8", count, at)
    sizes = values if kind == b"full" else values[1::2]
    if kind == b"sprs" and count and (np.any(np.diff(values[::2].astype(np.int64)) <= 0)
                                      or int(values[::2].max()) >= nlist or int(sizes.min()) == 0):
        raise BundleError(f"RMC index: IndexIVFFlat's sparse list sizes name lists out of order, past "
                          f"{nlist} or empty")
    total = sum(sizes.tolist())  # Python ints: a uint64 sum could wrap back to n
    expected = at + 8 * count + total * (4 * d + 8)
    if total != n or raw.size != expected:
        raise BundleError(f"RMC index: IndexIVFFlat's lists hold {total} vectors in {raw.size - at - 8 * count} "
                          f"bytes; its header says {n}, which take {n * (4 * d + 8)}")


def check_index_header(raw: np.ndarray, dim: int | None = None, ntotal: int | None = None) -> str:
    """Check a serialized index's header before FAISS reads it (FAISS allocates whatever the
    header declares, up to 1 TB): a type `build_faiss_index` writes, `dim` and `ntotal` as
    expected, and, for a flat index, exactly the bytes d*ntotal float32 vectors take; for an
    IVF one, its list counts and quantizer (`_ivf_layout`). Returns the class name; raises
    BundleError."""
    from models.bundle import BundleError  # noqa: PLC0415

    size = int(raw.size)  # the header is read in place: the index itself is not copied
    if size < _FLAT_HEADER:
        raise BundleError(f"RMC index: {size} bytes is too short for a FAISS index")
    fourcc = raw[:4].tobytes()
    kind = INDEX_FOURCCS.get(fourcc)
    if kind is None:
        raise BundleError(f"RMC index: FAISS type {fourcc!r} is not one shieldserve writes "
                          f"({', '.join(INDEX_FOURCCS.values())})")
    d = int(np.frombuffer(raw, "<i4", 1, 4)[0])
    n = int(np.frombuffer(raw, "<i8", 1, 8)[0])
    metric = int(np.frombuffer(raw, "<i4", 1, _HEADER - 4)[0])
    if d < 1 or (dim is not None and d != dim):
        raise BundleError(f"RMC index: {kind} of dimension {d}, the classifier's features have {dim}")
    if n < 0 or (ntotal is not None and n != ntotal):
        raise BundleError(f"RMC index: {kind} holds {n} vectors, D′ has {ntotal} labels")
    if metric != _METRIC_L2:
        raise BundleError(f"RMC index: {kind} with metric {metric}; shieldserve writes L2 ({_METRIC_L2})")
    if kind == "IndexFlatL2":
        codes = int(np.frombuffer(raw, "<u8", 1, _FLAT_HEADER - 8)[0])
        if codes != d * n or size != _FLAT_HEADER + 4 * d * n:
            raise BundleError(f"RMC index: {kind} with d={d}, ntotal={n} takes {_FLAT_HEADER + 4 * d * n} "
                              f"bytes, the file has {size} (declaring {codes} values)")
    elif size < 4 * d * n:
        raise BundleError(f"RMC index: {kind} with d={d}, ntotal={n} needs at least {4 * d * n} bytes, "
                          f"the file has {size}")
    if kind == "IndexIVFFlat":
        _ivf_layout(raw, d, n)
    return kind


def check_ivf_ids(index: Any) -> None:
    """Every row of D′ exactly once in an IVF index's lists: FAISS returns whatever ids the
    lists hold, and RMC indexes D′'s labels and images with them on every request."""
    from models.bundle import BundleError  # noqa: PLC0415

    faiss = _faiss()
    n, invlists = int(index.ntotal), faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(invlists.get_ids(i), size).copy()
             for i in range(invlists.nlist) if (size := invlists.list_size(i)) > 0]
    ids = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if ids.size != n:
        raise BundleError(f"RMC index: IndexIVFFlat's lists hold {ids.size} ids, its header says {n}")
    if n and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise BundleError(f"RMC index: IndexIVFFlat's lists hold ids {int(ids.min())}..{int(ids.max())}, "
                          f"D′ has rows 0..{n - 1}")
    if n and int(np.bincount(ids, minlength=n).max()) > 1:
        raise BundleError("RMC index: IndexIVFFlat's lists hold a row of D′ more than once")


def deserialize_index(data: torch.Tensor, dim: int | None = None, ntotal: int | None = None) -> Any:
    """FAISS's index from its bytes, after `check_index_header` (and `check_ivf_lists`); no
    vector FAISS reads may exceed twice the file's size (its own default limit is 1 TB). An
    IVF index's ids are checked after (`check_ivf_ids`)."""
    from models.bundle import BundleError  # noqa: PLC0415

    faiss = _faiss()
    raw = np.ascontiguousarray(data.cpu().numpy().astype(np.uint8)).reshape(-1)
    kind = check_index_header(raw, dim, ntotal)
    if kind == "IndexIVFFlat":
        check_ivf_lists(raw, int(np.frombuffer(raw, "<i4", 1, 4)[0]), int(np.frombuffer(raw, "<i8", 1, 8)[0]))
    limited = hasattr(faiss, "set_deserialization_vector_byte_limit")
    if not limited and kind != "IndexFlatL2":
        # Such a FAISS reads every vector the file declares (up to 1 TB) and does not check an
        # HNSW graph's ids (1.9 segfaults at the first search); the header checks above make a
        # flat index, and only a flat one, safe without it.
        raise BundleError(f"RMC index: FAISS {getattr(faiss, '__version__', '?')} cannot read an {kind} "
                          f"safely; install faiss-cpu>={SAFE_FAISS}, or serve RMC with `search: torch`")
    try:
        if not limited:
            index = faiss.deserialize_index(raw)
        else:
            with _deserialize_lock:  # the limit is process-wide
                previous = faiss.get_deserialization_vector_byte_limit()
                faiss.set_deserialization_vector_byte_limit(2 * raw.size + 4096)
                try:
                    index = faiss.deserialize_index(raw)
                finally:
                    faiss.set_deserialization_vector_byte_limit(previous)
    except RuntimeError as exc:
        raise BundleError(f"RMC index: FAISS cannot read it: {str(exc).strip().splitlines()[-1]}") from exc
    if type(index).__name__ != kind or int(index.ntotal) != int(np.frombuffer(raw, "<i8", 1, 8)[0]):
        raise BundleError(f"RMC index: FAISS read a {type(index).__name__} of {index.ntotal} vectors "
                          f"from a {kind} header")
    if kind == "IndexIVFFlat":
        check_ivf_ids(index)
    return index


class KnnIndex:
    """K-nearest-neighbour search in feature space; returns squared L2 distances and row ids."""

    backend: str = ""

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @property
    def size(self) -> int:
        raise NotImplementedError


class FaissIndex(KnnIndex):
    def __init__(self, index: Any, device: torch.device, *, nprobe: int | None = None,
                 ef_search: int | None = None) -> None:
        faiss = _faiss()
        self.kind = type(index).__name__
        if nprobe is not None and hasattr(index, "nprobe"):
            index.nprobe = int(nprobe)
        if ef_search is not None and hasattr(index, "hnsw"):
            index.hnsw.efSearch = int(ef_search)
        self.backend = "faiss-cpu"
        if device.type == "cuda" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            try:
                self._resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._resources, device.index or 0, index)
                self.backend = "faiss-gpu"
            except Exception as exc:  # HNSW has no GPU version: stay on the CPU
                log.info("FAISS index %s stays on the CPU: %s", self.kind, exc)
        self.index = index
        self._lock = threading.Lock()  # FAISS GPU indexes are not thread-safe

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        q = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        with self._lock:
            dist, ids = self.index.search(q, int(k))
        return (torch.from_numpy(dist).to(queries.device), torch.from_numpy(ids).to(queries.device))

    def reconstruct_all(self) -> torch.Tensor:
        """The stored vectors (flat indexes only): the exact baseline searches the same D′."""
        faiss = _faiss()
        cpu = faiss.index_gpu_to_cpu(self.index) if self.backend == "faiss-gpu" else self.index
        return torch.from_numpy(cpu.reconstruct_n(0, cpu.ntotal))


class TorchIndex(KnnIndex):
    """Exact search with `torch.cdist`: the baseline FAISS is measured against, and the
    fallback when FAISS is not installed."""

    backend = "torch-exact"

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features.float()

    @property
    def size(self) -> int:
        return int(self.features.shape[0])

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = torch.cdist(queries.float().to(self.features.device), self.features) ** 2
        dist, ids = torch.topk(d, int(k), dim=1, largest=False)
        return dist.to(queries.device), ids.to(queries.device)


def _has_features(classifier: Any) -> bool:
    """Whether a bundle Classifier finds its penultimate features (a bare network: no)."""
    has = getattr(classifier, "has_features", None)
    return bool(has()) if callable(has) else False


def default_trainable(classifier: Any) -> str:
    """What RMC fine-tunes on a classifier: the dense `head` of the builtin networks, else the
    `last` Linear layer when it alone makes the logits, else `all` parameters."""
    net = getattr(classifier, "network", classifier)
    if all(hasattr(net, a) for a in ("body", "head", "out")):
        return "head"
    if _has_features(classifier) and classifier.feature_extractor().head is not None:
        return "last"
    return "all"


@torch.no_grad()
def extract_features(classifier: Any, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features of the frozen base network, batch by batch."""
    out = [classifier.features(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)]
    return torch.cat(out).flatten(1).float()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


# ============================================================================ fine-tuning
@dataclass(frozen=True)
class FinetuneSettings:
    lr: float = 1e-3
    steps: int = 10
    patience: int = 3          # stop an image once its loss fails to improve this many steps
    min_delta: float = 1e-4    # improvement smaller than this does not count
    stop_loss: float = 0.01    # ... or once the loss on its neighbours is this small
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8


class Finetuner:
    """Fine-tunes per-image copies of (part of) the classifier, all images at once.

    `trainable="all"` fine-tunes every parameter (the paper). `trainable="head"` keeps the
    convolutional body frozen and fine-tunes the dense layers after it: the body runs once
    per neighbour instead of once per step, which is most of the cost. It needs a network
    with `body`, `head` and `out` (the builtin architectures). `trainable="last"` fine-tunes
    only the last Linear layer on the penultimate features (models.features): any network
    whose last layer makes the logits from them, a user's TorchScript one included.
    """

    def __init__(self, classifier: nn.Module, trainable: str = "all") -> None:
        net = getattr(classifier, "network", classifier)
        self.trainable = trainable
        if trainable == "last":
            head = classifier.feature_extractor().head if _has_features(classifier) else None
            if head is None:
                raise ValueError("trainable='last' needs a network whose last Linear layer makes the logits "
                                 "from its penultimate features; use 'all'")
            self._frozen = classifier.features
            self.model = nn.Sequential()
            self.model.add_module("out", head)
        elif trainable == "head":
            if not all(hasattr(net, a) for a in ("body", "head", "out")):
                raise ValueError("trainable='head' needs a network with body, head and out; use 'all'")
            prepare = getattr(classifier, "prepare", lambda t: t)
            self._frozen: Callable[[torch.Tensor], torch.Tensor] = lambda t: net.body(prepare(t))
            self.model: nn.Module = nn.Sequential()
            self.model.add_module("head", net.head)
            self.model.add_module("out", net.out)
        elif trainable == "all":
            self._frozen = lambda t: t
            self.model = classifier
        else:
            raise ValueError(f"trainable must be 'all', 'head' or 'last', got {trainable!r}")
        # what the frozen part makes of an image never changes ("head" and "last"): RMC may
        # compute it for all of D′ once instead of for every request's neighbours
        self.frozen_is_fixed = trainable in ("head", "last")
        self.model.eval()  # no dropout: the same image and neighbours give the same answer
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self.buffers = {n: b for n, b in self.model.named_buffers()}

    @torch.no_grad()
    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        return self._frozen(x)

    def _logits(self, params: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (params, self.buffers), (z,))

    def run(self, x: torch.Tensor, nbr_x: torch.Tensor | None, nbr_y: torch.Tensor, s: FinetuneSettings,
            ctx: RunContext | None = None, start: dict[str, torch.Tensor] | None = None,
            nbr_z: torch.Tensor | None = None,
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Fine-tune B copies, copy b on (nbr_x[b], nbr_y[b]), then classify x[b] with it.

        x (B,C,H,W); nbr_x (B,K,C,H,W); nbr_y (B,K). `nbr_z` (B,K,...): the frozen part's output
        for the neighbours, computed already (then nbr_x is not needed). `start` are unbatched
        parameters to start from (the bundle's by default). Returns logits (B, classes), the B
        adapted parameter copies, and per-image details (steps taken, final loss).
        """
        b, k = nbr_y.shape
        if nbr_z is not None:
            z = nbr_z
        else:
            assert nbr_x is not None
            z = self.frozen(nbr_x.flatten(0, 1))
            z = z.view(b, k, *z.shape[1:])
        zq = self.frozen(x).unsqueeze(1)
        base = start if start is not None else self.initial
        params = {n: p.to(x.device).unsqueeze(0).repeat(b, *([1] * p.dim())) for n, p in base.items()}
        m = {n: torch.zeros_like(p) for n, p in params.items()}
        v = {n: torch.zeros_like(p) for n, p in params.items()}

        def loss(p: dict[str, torch.Tensor], zz: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self._logits(p, zz), yy)

        step_fn = vmap(grad_and_value(loss))
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        best = torch.full((b,), math.inf, device=x.device)
        stale = torch.zeros(b, dtype=torch.long, device=x.device)
        taken = torch.zeros(b, dtype=torch.long, device=x.device)
        last = torch.zeros(b, device=x.device)
        b1, b2 = s.betas
        for t in range(1, s.steps + 1):
            if ctx is not None:
                ctx.check()
            grads, losses = step_fn(params, z, nbr_y)
            losses = losses.detach()
            last = torch.where(active, losses, last)
            improved = losses < best - s.min_delta
            best = torch.where(improved, losses, torch.minimum(best, losses))
            stale = torch.where(improved, torch.zeros_like(stale), stale + 1)
            active = active & (losses > s.stop_loss) & (stale < s.patience)
            if not bool(active.any()):
                break
            taken += active.long()
            c1, c2 = 1 - b1 ** t, 1 - b2 ** t
            with torch.no_grad():
                for n, g in grads.items():
                    mask = active.view(b, *([1] * (g.dim() - 1))).to(g.dtype)
                    m[n].mul_(b1).add_((1 - b1) * g)
                    v[n].mul_(b2).addcmul_(g, g, value=1 - b2)
                    update = (m[n] / c1) / ((v[n] / c2).sqrt() + s.adam_eps)
                    params[n] = params[n] - s.lr * update * mask
        with torch.no_grad():
            logits = vmap(self._logits)(params, zq).squeeze(1)
        return logits, params, {"rmc_steps": taken.float(), "rmc_loss": last}

    @torch.no_grad()
    def predict(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits of one (unbatched) parameter set on a batch."""
        return self._logits(params, self.frozen(x))


# The fine-tuning a pipeline's options or a manifest may ask for: every image runs up to
# `steps` Adam steps, the start-up warm-up with no deadline. 1,000 is 50 times the presets'
# 20, and already ~25 s for one image with trainable=all on the quick bundle's network (one
# CPU thread); a negative min_delta makes every step an "improvement", so patience never ends it.
MAX_STEPS = 1000
_SETTING_RULES: dict[str, tuple[bool, Callable[[float], bool], str]] = {
    "lr": (False, lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "steps": (True, lambda v: 0 <= v <= MAX_STEPS, f"an integer from 0 to {MAX_STEPS}"),
    "patience": (True, lambda v: 1 <= v <= MAX_STEPS, f"an integer from 1 to {MAX_STEPS}"),
    "min_delta": (False, lambda v: v >= 0, "a finite number >= 0"),
    "stop_loss": (False, lambda v: v >= 0, "a finite number >= 0"),
}


def finetune_settings(options: dict[str, Any], manifest: dict[str, Any]) -> FinetuneSettings:
    """A pipeline's options over the manifest's settings over FinetuneSettings' defaults, each
    within `_SETTING_RULES`. A bad option is the operator's configuration (ValueError), a bad
    manifest value the bundle's (BundleError)."""
    from models.bundle import BundleError  # noqa: PLC0415

    values: dict[str, Any] = {}
    for name, (integer, allowed, rule) in _SETTING_RULES.items():
        from_option = options.get(name) is not None
        value = options[name] if from_option else manifest.get(name, getattr(FinetuneSettings, name))
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not (math.isfinite(number) and allowed(number) and (not integer or number.is_integer())):
            where = f"option {name}" if from_option else f"the manifest's defenses.rmc.settings.{name}"
            message = f"RMC: {where} is {value!r}; it must be {rule}"
            raise ValueError(message) if from_option else BundleError(message)
        values[name] = int(number) if integer else number
    return FinetuneSettings(**values)


_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_dataset(data: dict[str, torch.Tensor], shape: tuple[int, ...], num_classes: int) -> None:
    """D′ as models/recipes/rmc.py writes it: images uint8 (N, C, H, W) in the bundle's input
    shape, labels integers (N,) in [0, num_classes). Requests index both with neighbour ids
    and fine-tune on the labels: a wrong one would fail there, image after image, as a 500."""
    from models.bundle import BundleError  # noqa: PLC0415

    where = f"artifact {DATA_ARTIFACT!r}"
    for key in ("images", "labels"):
        if key not in data:
            raise BundleError(f"{where} has no {key!r} tensor; it has {sorted(data)}")
    images, labels = data["images"], data["labels"]
    if labels.dtype not in _INTEGER_DTYPES or labels.dim() != 1 or labels.shape[0] < 1:
        raise BundleError(f"{where}: 'labels' must be a non-empty vector of integers (N,), got "
                          f"{labels.dtype} {tuple(labels.shape)}")
    n = int(labels.shape[0])
    if images.dtype != torch.uint8 or tuple(images.shape) != (n, *shape):
        raise BundleError(f"{where}: 'images' must be uint8 {(n, *shape)}, one per label in the bundle's "
                          f"input shape, got {images.dtype} {tuple(images.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise BundleError(f"{where}: 'labels' run from {lo} to {hi}; the classifier's classes are 0 to "
                          f"{num_classes - 1}")


# ============================================================================ the component
_OPTIONS = {"mode", "k", "lr", "steps", "patience", "min_delta", "stop_loss", "trainable",
            "parallel", "search", "nprobe", "ef_search", "snapshot_every", "snapshots", "frozen_cache_mb"}


class RMC(Component):
    role = "adapter"
    defense = NAME

    def __init__(self, env: DefenseEnv, *, mode: str = "isolated", k: int | str = "auto",
                 lr: float | None = None, steps: int | None = None, patience: int | None = None,
                 min_delta: float | None = None, stop_loss: float | None = None,
                 trainable: str | None = None, parallel: int | None = None, search: str = "faiss",
                 nprobe: int | None = None, ef_search: int | None = None,
                 snapshot_every: int = 100, snapshots: int = 5, frozen_cache_mb: float = 256.0) -> None:
        if mode not in ("isolated", "online"):
            raise ValueError(f"mode must be 'isolated' or 'online', got {mode!r}")
        if search not in ("faiss", "torch"):
            raise ValueError(f"search must be 'faiss' or 'torch', got {search!r}")
        # Batching copies of the weights pays on a GPU; on a CPU the stacked copies (and their
        # Adam state) fall out of cache and one image at a time is faster (bench/rmc.py).
        if parallel is None:
            parallel = 16 if env.device.type == "cuda" else 1
        if int(parallel) < 1 or int(snapshot_every) < 1 or int(snapshots) < 1:
            raise ValueError("parallel, snapshot_every and snapshots must be >= 1")
        section = env.bundle.defense(NAME)
        built_for = section.get("classifier_sha256")
        if built_for and built_for != env.bundle.artifact("classifier")["sha256"]:
            raise ValueError("the bundle's RMC index was built for another classifier; "
                             "rebuild it with `shieldserve train --steps rmc`")
        defaults = section.get("settings", {})
        if not isinstance(defaults, dict):
            from models.bundle import BundleError  # noqa: PLC0415
            raise BundleError(f"the manifest's defenses.rmc.settings must be an object, got {type(defaults).__name__}")
        self.device = env.device
        self.mode = mode
        data = env.bundle.tensors(DATA_ARTIFACT, env.device)
        check_dataset(data, tuple(env.bundle.input_spec.shape), env.bundle.input_spec.num_classes)
        self.images, self.labels = data["images"], data["labels"].long()
        self.sources = data.get("pgd_steps")
        n = int(self.labels.shape[0])
        from_manifest = k == "auto" and defaults.get("k", "auto") != "auto"
        k = defaults.get("k", "auto") if k == "auto" else k
        try:
            if k != "auto" and (isinstance(k, bool) or not isinstance(k, int) and not (isinstance(k, str) and k.isdigit())):
                raise ValueError(f"k must be a whole number or \"auto\", got {k!r}")  # int(2.7) was 2
            self.k = scaled_k(n) if k == "auto" else int(k)
            if not 1 <= self.k <= n:
                raise ValueError(f"k must be between 1 and |D′| = {n}, got {self.k}")
        except (TypeError, ValueError, OverflowError) as exc:
            if not from_manifest:
                raise
            from models.bundle import BundleError  # noqa: PLC0415
            raise BundleError(f"the manifest's defenses.rmc.settings.k is {k!r}: {exc}") from None
        self.settings = finetune_settings({"lr": lr, "steps": steps, "patience": patience, "min_delta": min_delta,
                                           "stop_loss": stop_loss}, defaults)
        self.classifier = env.classifier
        self.finetuner = Finetuner(env.classifier, trainable or defaults.get("trainable", "all"))
        self.parallel = int(parallel)
        self.index = self._load_index(env, search, nprobe, ef_search)
        self.frozen_dprime = self._frozen_cache(float(frozen_cache_mb))
        # online mode: one adaptation stream per replica
        self._lock = threading.Lock()
        self._stream: dict[str, torch.Tensor] | None = None
        self._snapshots: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=int(snapshots))
        self.snapshot_every = int(snapshot_every)
        self.adapted = 0  # images adapted since the last reset (online mode)

    def _load_index(self, env: DefenseEnv, search: str, nprobe: int | None, ef_search: int | None) -> KnnIndex:
        if search == "faiss":
            try:
                raw = env.bundle.tensors(INDEX_ARTIFACT)["index"]
                dim = int(extract_features(self.classifier, from_uint8(self.images[:1])).shape[1])
                index = deserialize_index(raw, dim=dim, ntotal=int(self.labels.shape[0]))
                return FaissIndex(index, env.device, nprobe=nprobe, ef_search=ef_search)
            except ImportError:
                log.warning("FAISS is not installed: RMC searches D′ exactly with torch instead")
        return TorchIndex(extract_features(env.classifier, from_uint8(self.images)))

    def _frozen_cache(self, limit_mb: float) -> torch.Tensor | None:
        """The frozen part's output for every image of D′, computed once at load, when the
        fine-tuning leaves that part alone and the result fits in `frozen_cache_mb`: then a
        request gathers its neighbours' rows instead of running the convolutional body on K
        images (on the default bundle that body was about half of RMC's time per image:
        bench/rmc.py). None: computed per request."""
        if not self.finetuner.frozen_is_fixed or limit_mb <= 0:
            return None
        first = self.finetuner.frozen(from_uint8(self.images[:1]))
        need_mb = first.numel() * first.element_size() * int(self.labels.shape[0]) / 2**20
        if need_mb > limit_mb:
            log.info("RMC: D′'s frozen features would take %.0f MB (frozen_cache_mb %.0f): computed per request",
                     need_mb, limit_mb)
            return None
        return torch.cat([self.finetuner.frozen(from_uint8(self.images[i:i + 500]))
                          for i in range(0, int(self.labels.shape[0]), 500)])

    # ------------------------------------------------------------------ neighbours
    def neighbours(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Row ids (B, K) of each image's K nearest neighbours in D′, and their distances."""
        feats = extract_features(self.classifier, x)
        dist, ids = self.index.search(feats, k or self.k)
        return ids.clamp_min(0), dist

    # ------------------------------------------------------------------ adapting
    def adapt(self, x: torch.Tensor, classifier: Any, ctx: RunContext) -> Classify:
        ids, _ = self.neighbours(x)
        if self.mode == "online":
            logits = self._adapt_online(x, ids, ctx)
        else:
            logits = torch.cat([
                self.finetuner.run(x[i:i + self.parallel], s=self.settings, ctx=ctx,
                                   **self._neighbour_batch(ids[i:i + self.parallel]))[0]
                for i in range(0, len(x), self.parallel)])
        return _RowLogits(x, logits)

    def _neighbour_batch(self, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Finetuner.run's neighbour arguments: their labels, and their frozen features where
        D′'s are cached, else their images."""
        cached = self.frozen_dprime is not None
        return {"nbr_y": self.labels[ids], "nbr_x": None if cached else from_uint8(self.images[ids]),
                "nbr_z": self.frozen_dprime[ids] if cached else None}  # type: ignore[index]

    def _adapt_online(self, x: torch.Tensor, ids: torch.Tensor, ctx: RunContext) -> torch.Tensor:
        out = []
        with self._lock:  # one stream: images adapt one after another, each from the last
            for i in range(len(x)):
                start = self._stream if self._stream is not None else self.finetuner.initial
                logits, params, _ = self.finetuner.run(
                    x[i:i + 1], s=self.settings, ctx=ctx, start=start, **self._neighbour_batch(ids[i:i + 1]))
                self._stream = {n: p[0].detach() for n, p in params.items()}
                self.adapted += 1
                if self.adapted % self.snapshot_every == 0:
                    self._snapshots.append((self.adapted, {n: p.clone() for n, p in self._stream.items()}))
                out.append(logits)
        return torch.cat(out)

    # ------------------------------------------------------------------ online state
    def current_parameters(self) -> dict[str, torch.Tensor]:
        """The weights the next online request starts from (the bundle's in isolated mode)."""
        with self._lock:
            src = self._stream if self._stream is not None else self.finetuner.initial
            return {n: p.clone() for n, p in src.items()}

    def reset(self, to: str = "bundle") -> dict[str, Any]:
        """Online mode: go back to the bundle's weights, or to the latest snapshot."""
        if to not in ("bundle", "snapshot"):
            raise ValueError("to must be 'bundle' or 'snapshot'")
        with self._lock:
            discarded = self.adapted
            if to == "snapshot" and self._snapshots:
                at, params = self._snapshots[-1]
                self._stream = {n: p.clone() for n, p in params.items()}
                self.adapted, restored = at, f"snapshot@{at}"
            else:
                self._stream, self.adapted, restored = None, 0, "bundle"
                self._snapshots.clear()
            return {"mode": self.mode, "restored": restored, "discarded_images": discarded - self.adapted}

    def public_settings(self) -> dict[str, Any]:
        s = self.settings
        return {"mode": self.mode, "k": self.k, "dprime": int(self.labels.shape[0]),
                "search": self.index.backend, "trainable": self.finetuner.trainable,
                "optimizer": "adam", "lr": s.lr, "steps": s.steps, "patience": s.patience,
                "stop_loss": s.stop_loss, "parallel": self.parallel,
                "frozen_features_cached": self.frozen_dprime is not None}


class _RowLogits:
    """The adapted classifier for one batch: row b of the batch answers with copy b."""

    def __init__(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        self.x, self.logits = x, logits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape == self.x.shape and (x is self.x or torch.equal(x, self.x)):
            return self.logits
        raise ValueError("RMC adapts one model per image: only argmax decisions on the same batch "
                         "are supported after it")


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown rmc options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    return [RMC(env, **options)]

