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
_FLAT_HEADER = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8  # ... then the codes' length (uint64) and d*ntotal float32
_deserialize_lock = threading.Lock()


def check_index_header(raw: np.ndarray, dim: int | None = None, ntotal: int | None = None) -> str:
    """Check a serialized index's header before FAISS reads it (FAISS allocates whatever the
    header declares, up to 1 TB): a type `build_faiss_index` writes, `dim` and `ntotal` as
    expected, and, for a flat index, exactly the bytes d*ntotal float32 vectors take. Returns
    the class name; raises BundleError."""
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
    if d < 1 or (dim is not None and d != dim):
        raise BundleError(f"RMC index: {kind} of dimension {d}, the classifier's features have {dim}")
    if n < 0 or (ntotal is not None and n != ntotal):
        raise BundleError(f"RMC index: {kind} holds {n} vectors, D′ has {ntotal} labels")
    if kind == "IndexFlatL2":
        codes = int(np.frombuffer(raw, "<u8", 1, _FLAT_HEADER - 8)[0])
        if codes != d * n or size != _FLAT_HEADER + 4 * d * n:
            raise BundleError(f"RMC index: {kind} with d={d}, ntotal={n} takes {_FLAT_HEADER + 4 * d * n} "
                              f"bytes, the file has {size} (declaring {codes} values)")
    elif size < 4 * d * n:
        raise BundleError(f"RMC index: {kind} with d={d}, ntotal={n} needs at least {4 * d * n} bytes, "
                          f"the file has {size}")
    return kind


def deserialize_index(data: torch.Tensor, dim: int | None = None, ntotal: int | None = None) -> Any:
    """FAISS's index from its bytes, after `check_index_header`; no vector FAISS reads may
    exceed twice the file's size (its own default limit is 1 TB)."""
    faiss = _faiss()
    raw = np.ascontiguousarray(data.cpu().numpy().astype(np.uint8)).reshape(-1)
    check_index_header(raw, dim, ntotal)
    if not hasattr(faiss, "set_deserialization_vector_byte_limit"):
        return faiss.deserialize_index(raw)
    with _deserialize_lock:  # the limit is process-wide
        previous = faiss.get_deserialization_vector_byte_limit()
        faiss.set_deserialization_vector_byte_limit(2 * raw.size + 4096)
        try:
            return faiss.deserialize_index(raw)
        except RuntimeError as exc:
            from models.bundle import BundleError  # noqa: PLC0415
            raise BundleError(f"RMC index: FAISS cannot read it: {str(exc).strip().splitlines()[-1]}") from exc
        finally:
            faiss.set_deserialization_vector_byte_limit(previous)


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
        self.device = env.device
        self.mode = mode
        data = env.bundle.tensors(DATA_ARTIFACT, env.device)
        self.images, self.labels = data["images"], data["labels"].long()
        self.sources = data.get("pgd_steps")
        n = int(self.labels.shape[0])
        k = defaults.get("k", "auto") if k == "auto" else k
        self.k = scaled_k(n) if k == "auto" else int(k)
        if not 1 <= self.k <= n:
            raise ValueError(f"k must be between 1 and |D′| = {n}, got {self.k}")
        self.settings = FinetuneSettings(
            lr=float(lr if lr is not None else defaults.get("lr", 1e-3)),
            steps=int(steps if steps is not None else defaults.get("steps", 10)),
            patience=int(patience if patience is not None else defaults.get("patience", 3)),
            min_delta=float(min_delta if min_delta is not None else defaults.get("min_delta", 1e-4)),
            stop_loss=float(stop_loss if stop_loss is not None else defaults.get("stop_loss", 0.01)))
        if self.settings.lr <= 0 or self.settings.steps < 0 or self.settings.patience < 1:
            raise ValueError("lr must be > 0, steps >= 0 and patience >= 1")
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

