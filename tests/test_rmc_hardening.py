"""RMC's artifacts and settings from a hostile or broken bundle: refused at start-up with a
BundleError that names what is wrong, never a 500 per request, a crash, an allocation the
file does not pay for, or a warm-up that never ends. Small synthetic indexes, and copies of
the quick bundle with one thing changed; each test takes at most a few seconds."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from models.bundle import Bundle, BundleError, content_version  # noqa: E402
from service.defenses.base import DefenseEnv  # noqa: E402
from service.defenses.rmc import (  # noqa: E402
    MAX_STEPS, SAFE_FAISS, FinetuneSettings, build_faiss_index, check_dataset, deserialize_index,
    finetune_settings, serialize_index,
)
from service.pipeline import Pipeline, PipelineConfigError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D, N = 8, 400


def _x(n: int = N, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)


def _ivf(ids: np.ndarray | None = None, nlist: int = 8) -> np.ndarray:
    x = _x()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, nlist)
    index.train(x)
    if ids is None:
        index.add(x)
    else:
        index.add_with_ids(x, ids.astype(np.int64))
    return np.ascontiguousarray(faiss.serialize_index(index)).copy()


def _load(raw: np.ndarray, **kw):
    return deserialize_index(torch.from_numpy(np.ascontiguousarray(raw)), **kw)


def _put(raw: np.ndarray, at: int, fmt: str, value: int | bytes) -> np.ndarray:
    out = raw.copy()
    out[at:at + struct.calcsize(fmt)] = np.frombuffer(struct.pack(fmt, value), np.uint8)
    return out


# ------------------------------------------------------------------ F3a: IVF ids
@pytest.mark.parametrize("case", ["past", "negative", "twice"])
def test_an_ivf_index_whose_ids_are_not_the_rows_of_dprime_is_refused(case: str) -> None:
    """RMC indexes D′'s labels and images with whatever ids the lists hold: one past D′ was a
    500 for every request that had it among its neighbours."""
    ids = np.arange(N)
    if case == "past":
        ids[ids % 7 == 0] += N
    elif case == "negative":
        ids[3] = -5
    else:
        ids[5] = 3
    assert _load(_ivf(), dim=D, ntotal=N).ntotal == N  # the same index with ids 0..N-1
    with pytest.raises(BundleError, match="IndexIVFFlat's lists hold"):
        _load(_ivf(ids), dim=D, ntotal=N)


def test_a_sparse_ivf_index_round_trips() -> None:
    """FAISS writes list sizes as (list, count) pairs ("sprs") once half the lists are empty."""
    x = _x()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(D), D, 8)
    index.train(x)
    _, assigned = index.quantizer.search(x, 1)
    few = np.ascontiguousarray(x[np.isin(assigned[:, 0], [2, 5])])
    index.add(few)
    raw = np.ascontiguousarray(faiss.serialize_index(index))
    assert b"sprs" in raw.tobytes()
    loaded = _load(raw, dim=D, ntotal=len(few))
    assert loaded.ntotal == len(few)
    loaded.nprobe = 8
    _, found = loaded.search(few[:3], 1)
    assert found[:, 0].tolist() == [0, 1, 2]


# ------------------------------------------------------------------ F3b: IVF header bounds
def _offsets(raw: np.ndarray) -> dict[str, int]:
    """Where index_write.cpp puts an IndexIVFFlat's counts: after the 37-byte common header,
    nlist and nprobe, the quantizer (a 45-byte IndexFlatL2 header, then its centroids), the
    direct map (1 + 8 bytes), then "ilar", its nlist, code_size, the list-size type and count."""
    b = raw.tobytes()
    q = b.index(b"IxF2")
    ilar = b.index(b"ilar")
    assert q == 53 and ilar == q + 45 + 4 * D * 8 + 9
    # "sizes": the first list's count, after the type and the vector's length
    return {"nlist": 37, "nprobe": 45, "q": q, "direct": ilar - 9, "ilar": ilar, "sizes": ilar + 32}


@pytest.mark.parametrize("field, at, fmt, value, problem", [
    ("ivf nlist", "nlist", "<Q", 2**34, "declares 17179869184 inverted lists"),
    ("ivf nlist 0", "nlist", "<Q", 0, "declares 0 inverted lists"),
    ("ivf nlist > ntotal", "nlist", "<Q", N + 1, f"declares {N + 1} inverted lists"),
    ("nprobe", "nprobe", "<Q", 2**40, "probes"),
    ("quantizer type", "q", "<4s", b"IxFI", "quantizer must be an IndexFlatL2"),
    ("quantizer d", "q+4", "<i", 4, "quantizer must be an IndexFlatL2"),
    ("quantizer ntotal", "q+8", "<q", 10**9, "quantizer must be an IndexFlatL2"),
    ("direct map", "direct", "<B", 1, "direct map"),
    ("ilar nlist", "ilar+4", "<Q", 2**25, "with 33554432 lists"),
    ("code size", "ilar+12", "<Q", 4 * D + 4, "lists of 36-byte codes"),
    ("list type", "ilar+20", "<4s", b"junk", "list sizes are b'junk'"),
    ("list size", "sizes", "<Q", 2**40, "lists hold 1099511"),
    ("list size short", "sizes", "<Q", 0, "lists hold"),
])
def test_ivf_counts_are_bounded_before_faiss_reads_them(monkeypatch, field, at, fmt, value, problem) -> None:
    """Each count FAISS sizes something by, raised or made inconsistent: refused from the bytes,
    before FAISS is called at all."""
    raw = _ivf()
    offsets = _offsets(raw)
    base, _, plus = at.partition("+")
    bad = _put(raw, offsets[base] + int(plus or 0), fmt, value)

    def never(*_: object) -> None:
        raise AssertionError("FAISS was handed a file the checks should have refused")

    monkeypatch.setattr(faiss, "deserialize_index", never)
    with pytest.raises(BundleError, match=problem):
        _load(bad, dim=D, ntotal=N)
    with pytest.raises(BundleError, match=problem):
        _load(bad, dim=D)  # no expected count: the header's own ntotal bounds them


_PEAK = r"""
import resource, sys
import numpy as np, torch
from models.bundle import BundleError
from service.defenses.rmc import deserialize_index
for path in sys.argv[1:]:
    raw = np.fromfile(path, np.uint8)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        deserialize_index(torch.from_numpy(raw), dim=64, ntotal=4550)
        outcome = "loaded"
    except BundleError:
        outcome = "refused"
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(path.rsplit("/", 1)[-1], outcome, grew // 1024, flush=True)
"""


def test_crafted_ivf_counts_cost_no_memory(tmp_path: Path) -> None:
    """The auditor's IVF of 4550 64-d vectors with 16 lists (1.2 MB), its counts raised: the
    "ilar" nlist alone made FAISS allocate 48 bytes a list before comparing it with anything
    (4M lists: ~200 MB, 2^27: 5 GiB). Peak RSS of a fresh process, in MiB."""
    x = np.random.default_rng(0).standard_normal((4550, 64)).astype(np.float32)
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(64), 64, 16)
    index.train(x)
    index.add(x)
    raw = np.ascontiguousarray(faiss.serialize_index(index)).copy()
    ilar, sizes = raw.tobytes().index(b"ilar"), raw.tobytes().index(b"full") + 12
    cases = {"genuine": raw, "ilar_nlist": _put(raw, ilar + 4, "<Q", 2**22),
             "ivf_nlist": _put(raw, 37, "<Q", 2**22), "list_size": _put(raw, sizes, "<Q", 2**40)}
    for name, data in cases.items():
        data.tofile(tmp_path / name)
    out = subprocess.run([sys.executable, "-c", _PEAK, *(str(tmp_path / n) for n in cases)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {name: (outcome, int(mib)) for name, outcome, mib in (line.split() for line in out.stdout.splitlines())}
    assert rows["genuine"][0] == "loaded"
    for name in ("ilar_nlist", "ivf_nlist", "list_size"):
        assert rows[name][0] == "refused" and rows[name][1] < 50, rows


# ------------------------------------------------------------------ F3c: a FAISS without the byte limit
@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_without_faiss_byte_limit_only_a_flat_index_is_read(monkeypatch, kind: str) -> None:
    """FAISS before 1.14.2 reads whatever a vector's count declares and does not check an HNSW
    graph's ids (1.9 segfaults at the first search of a crafted one): a flat index, whose
    every byte the header checks account for, is all that is safe to hand it."""
    feats = torch.from_numpy(_x())
    flat = serialize_index(build_faiss_index(feats, "flat"))
    other = serialize_index(build_faiss_index(feats, kind, nlist=8, hnsw_m=8))
    monkeypatch.delattr(faiss, "set_deserialization_vector_byte_limit")
    assert deserialize_index(flat, dim=D, ntotal=N).ntotal == N
    with pytest.raises(BundleError, match=f"cannot read an Index(IVF|HNSW)Flat safely; install faiss-cpu>={SAFE_FAISS}"):
        deserialize_index(other, dim=D, ntotal=N)


def test_the_knn_extra_requires_the_faiss_that_bounds_its_reads() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"faiss-cpu>={SAFE_FAISS}" in extras["knn"]


# ------------------------------------------------------------------ F4: D′'s tensors
SHAPE, CLASSES = (1, 28, 28), 10


def _dataset(n: int = 6) -> dict[str, torch.Tensor]:
    return {"images": torch.zeros(n, *SHAPE, dtype=torch.uint8), "labels": torch.arange(n) % CLASSES,
            "pgd_steps": torch.zeros(n, dtype=torch.int16)}


@pytest.mark.parametrize("change, problem", [
    ({"labels": torch.tensor([0, 1, 2, 3, 4, 10])}, "'labels' run from 0 to 10"),
    ({"labels": torch.tensor([0, 1, -1, 3, 4, 5])}, "'labels' run from -1 to 5"),
    ({"labels": torch.arange(6).float()}, "'labels' must be a non-empty vector of integers"),
    ({"labels": torch.zeros(6, 1, dtype=torch.long)}, "'labels' must be"),
    ({"labels": torch.zeros(0, dtype=torch.long), "images": torch.zeros(0, *SHAPE, dtype=torch.uint8)},
     "'labels' must be a non-empty"),
    ({"images": torch.zeros(6, *SHAPE)}, r"'images' must be uint8 \(6, 1, 28, 28\)"),
    ({"images": torch.zeros(6, 1, 14, 14, dtype=torch.uint8)}, "'images' must be uint8"),
    ({"images": torch.zeros(5, *SHAPE, dtype=torch.uint8)}, "one per label"),
    ({"labels": None}, "has no 'labels' tensor"),
    ({"images": None}, "has no 'images' tensor"),
])
def test_dprime_tensors_of_the_wrong_kind_are_refused(change: dict, problem: str) -> None:
    check_dataset(_dataset(), SHAPE, CLASSES)
    data = {k: v for k, v in {**_dataset(), **change}.items() if v is not None}
    with pytest.raises(BundleError, match="artifact 'rmc_dataset'.*" + problem):
        check_dataset(data, SHAPE, CLASSES)


# ------------------------------------------------------------------ F5: fine-tuning settings
@pytest.mark.parametrize("name, value", [
    ("steps", 10**9), ("steps", MAX_STEPS + 1), ("steps", -1), ("steps", 2.5), ("steps", "many"),
    ("patience", 10**9), ("patience", 0), ("lr", 0.0), ("lr", -1e-3), ("lr", math.nan), ("lr", math.inf),
    ("lr", 5.0), ("lr", True), ("lr", [1e-3]), ("min_delta", -1.0), ("min_delta", math.nan),
    ("stop_loss", -0.5), ("stop_loss", math.inf),
])
def test_fine_tuning_settings_out_of_bounds_are_refused(name: str, value: object) -> None:
    """From the manifest: the bundle's error; from a pipeline's options: the configuration's."""
    with pytest.raises(BundleError, match=rf"manifest's defenses\.rmc\.settings\.{name} is"):
        finetune_settings({}, {name: value})
    with pytest.raises(ValueError, match=f"option {name} is"):
        finetune_settings({name: value}, {})


def test_every_shipped_setting_is_within_the_bounds(quick_bundle: Path) -> None:
    from models.recipes.rmc import PRESETS

    assert finetune_settings({}, {}) == FinetuneSettings()
    shipped = [{"lr": r.lr, "steps": r.steps, "patience": r.patience, "stop_loss": r.stop_loss}
               for r in PRESETS.values()]
    for manifest in (REPO / "models" / "default" / "manifest.json", quick_bundle / "manifest.json"):
        shipped.append(json.loads(manifest.read_text())["defenses"]["rmc"]["settings"])
    for settings in shipped:
        s = finetune_settings({}, settings)
        assert (s.lr, s.steps, s.patience) == (settings["lr"], settings["steps"], settings["patience"])
    assert finetune_settings({"steps": MAX_STEPS, "patience": MAX_STEPS, "min_delta": 0}, {}).steps == MAX_STEPS


# ------------------------------------------------------------------ at start-up, from a bundle on disk
def _edited(src: Path, dst: Path, tensors: dict[str, dict[str, torch.Tensor]] | None = None,
            settings: dict | None = None) -> Bundle:
    """A copy of the quick bundle with artifacts rewritten or rmc settings changed, its hashes
    and version made to match: what someone who can write a bundle can ship."""
    from safetensors.torch import save

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    for name, values in (tensors or {}).items():
        data = save({k: v.contiguous() for k, v in values.items()})
        record = manifest["artifacts"][name]
        (dst / record["file"]).write_bytes(data)
        record.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    manifest["defenses"]["rmc"]["settings"].update(settings or {})
    manifest["version"] = content_version(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return Bundle.load(dst)


def _start(bundle: Bundle, **options: object) -> None:
    env = DefenseEnv(bundle, bundle.classifier(), torch.device("cpu"))
    Pipeline.build("rmc", {"defenses": [{"defense": "rmc", **options}]}, env)


def _refused(bundle: Bundle, problem: str, **options: object) -> None:
    with pytest.raises(PipelineConfigError) as info:
        _start(bundle, **options)
    assert isinstance(info.value.__cause__, BundleError) and problem in str(info.value), str(info.value)


def test_a_bundle_with_labels_past_its_classes_fails_start_up(quick_bundle: Path, tmp_path: Path) -> None:
    data = Bundle.load(quick_bundle).tensors("rmc_dataset")
    labels = data["labels"].clone()
    labels[labels == 7] = 99
    _refused(_edited(quick_bundle, tmp_path / "b", {"rmc_dataset": {**data, "labels": labels}}),
             "artifact 'rmc_dataset': 'labels' run from 0 to 99")


def test_a_bundle_whose_dprime_and_index_differ_in_size_fails_start_up(quick_bundle: Path, tmp_path: Path) -> None:
    data = Bundle.load(quick_bundle).tensors("rmc_dataset")
    fewer = {k: v[:-1] for k, v in data.items()}
    n = len(data["labels"])
    _refused(_edited(quick_bundle, tmp_path / "b", {"rmc_dataset": fewer}), f"holds {n} vectors, D′ has {n - 1}")


def test_a_bundle_with_ivf_ids_past_dprime_fails_start_up(quick_bundle: Path, tmp_path: Path) -> None:
    bundle = Bundle.load(quick_bundle)
    flat = deserialize_index(bundle.tensors("rmc_index")["index"])
    feats = np.ascontiguousarray(flat.reconstruct_n(0, flat.ntotal))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(feats.shape[1]), feats.shape[1], 16)
    ivf.train(feats)
    ivf.add_with_ids(feats, np.arange(len(feats), dtype=np.int64) + 10**6)
    _refused(_edited(quick_bundle, tmp_path / "b", {"rmc_index": {"index": serialize_index(ivf)}}),
             "IndexIVFFlat's lists hold ids 1000000..")


def test_a_manifest_asking_for_endless_fine_tuning_fails_start_up(quick_bundle: Path, tmp_path: Path) -> None:
    """steps 1e9 with patience 1e9, stop_loss 0 and min_delta -1: the warm-up never ended."""
    hostile = {"steps": 10**9, "patience": 10**9, "stop_loss": 0.0, "min_delta": -1.0}
    _refused(_edited(quick_bundle, tmp_path / "b", settings=hostile), "defenses.rmc.settings.steps is 1000000000")
    _refused(_edited(quick_bundle, tmp_path / "c", settings={"k": "all"}), "defenses.rmc.settings.k is 'all'")


def test_a_fractional_k_is_refused_not_truncated(quick_bundle: Path, tmp_path: Path) -> None:
    """int(2.7) served k = 2 without a word."""
    _refused(_edited(quick_bundle, tmp_path / "b", settings={"k": 2.7}), "k must be a whole number")
