"""A malformed or hostile bundle is refused with BundleError, before anything is allocated:
manifest parsing, artifact sizes, TorchScript only for TorchScript files, declared sizes
bounded, and the RMC FAISS index's header checked before FAISS reads it. Tiny synthetic
bundles only (milliseconds each)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import models.bundle as bundle_mod
from models.architectures import SmoothingMLP, builtin_spec
from models.bundle import Bundle, BundleError, BundleWriter, InputSpec, content_version

ARCH = builtin_spec("smoothing_mlp", in_channels=1, num_classes=3, image_size=4, hidden=8)


def _bundle(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    w = BundleWriter(tmp_path / "b")
    w.set_input(InputSpec(shape=(1, 4, 4), class_names=("a", "b", "c")))
    w.add_module("classifier", SmoothingMLP(1, 3, 4, hidden=8), ARCH)
    w.save()
    return tmp_path / "b"


def _edit(root: Path, edit, *, revision: bool = True) -> None:
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    if revision:
        m["version"] = content_version(m)
    path.write_text(json.dumps(m))


def test_tiny_bundle_loads_and_answers(tmp_path):
    root = _bundle(tmp_path)
    clf = Bundle.load(root).classifier()
    assert clf(torch.rand(2, 1, 4, 4)).shape == (2, 3)


# ------------------------------------------------------------------ 1. manifest parsing
@pytest.mark.parametrize("text, problem", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"format_version": 1, "artifacts": {}}), "no 'input'"),
    (json.dumps({"format_version": 1, "input": {"class_names": ["a"]}}), "input is malformed"),
    (json.dumps({"format_version": 1, "input": {"shape": ["x", 1, 1], "class_names": ["a"]}}), "input is malformed"),
    (json.dumps({"format_version": 1, "input": [1]}), "input must be an object"),
    # it said "bundle format None ... (a newer release saved it?)"
    (json.dumps({"input": {"shape": [1, 4, 4], "class_names": ["a"]}}), "manifest.json has no format_version"),
])
def test_malformed_manifest_is_a_bundle_error(tmp_path, text, problem):
    (tmp_path / "manifest.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(BundleError, match=problem) as info:
        Bundle.load(tmp_path)
    assert "manifest.json" in str(info.value)


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["artifacts"]["classifier"].pop("file"), "no 'file'"),
    (lambda m: m["artifacts"]["classifier"].pop("sha256"), "no 'sha256'"),
    (lambda m: m["artifacts"].__setitem__("classifier", "x"), "must be an object"),
    (lambda m: m.__setitem__("artifacts", ["classifier"]), "'artifacts' must be an object"),
    (lambda m: m["artifacts"]["classifier"].__setitem__("bytes", "12"), "'bytes' must be"),
    (lambda m: m["artifacts"]["classifier"].__setitem__("architecture", [1]), "'architecture' must be"),
])
def test_malformed_artifact_record_is_a_bundle_error(tmp_path, edit, problem):
    root = _bundle(tmp_path)
    _edit(root, edit, revision=False)
    for verify in (True, False):
        with pytest.raises(BundleError, match=problem):
            Bundle.load(root, verify=verify)


def test_oversized_manifest_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    root = _bundle(tmp_path)
    monkeypatch.setattr(bundle_mod, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(BundleError, match="a manifest is at most 100"):
        Bundle.load(root)


# ------------------------------------------------------------------ 2. artifact sizes
def test_artifact_size_is_checked_against_the_manifest(tmp_path):
    root = _bundle(tmp_path)
    with (root / "classifier.safetensors").open("ab") as fh:
        fh.write(b"\0" * 10)
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        Bundle.load(root)


def test_artifact_without_a_size_still_loads(tmp_path):
    root = _bundle(tmp_path)
    _edit(root, lambda m: m["artifacts"]["classifier"].pop("bytes"))
    assert Bundle.load(root).classifier()(torch.rand(1, 1, 4, 4)).shape == (1, 3)


@pytest.mark.parametrize("with_size", [True, False])
def test_an_artifact_over_the_size_bound_is_refused_before_it_is_read(tmp_path, monkeypatch, with_size):
    """An 8 GiB file (with the manifest's `bytes` saying so, or without it) was read whole
    before its hash was checked: MemoryError, or the OOM killer."""
    root = _bundle(tmp_path)
    size = (root / "classifier.safetensors").stat().st_size
    if not with_size:
        _edit(root, lambda m: m["artifacts"]["classifier"].pop("bytes"))
    monkeypatch.setattr(bundle_mod, "MAX_ARTIFACT_BYTES", size - 1)
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: pytest.fail("the artifact was opened")
                        if self.suffix == ".safetensors" else real_open(self, *a, **k))
    with pytest.raises(BundleError, match=f"is {size} bytes, more than the {size - 1}"):
        Bundle.load(root)


# ------------------------------------------------------------------ 3. TorchScript only for TorchScript files
def _torchscript_bundle(tmp_path: Path) -> Path:
    w = BundleWriter(tmp_path / "ts")
    w.set_input(InputSpec(shape=(1, 4, 4), class_names=("a", "b", "c")))
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(SmoothingMLP(1, 3, 4, hidden=8).eval()), buf)
    w.add_file("classifier", "classifier.torchscript", buf.getvalue(), format="torchscript",
               architecture={"kind": "torchscript"})
    w.save()
    return tmp_path / "ts"


def _trust(root: Path) -> list[str]:
    """`torchscript:SHA256` for every artifact of the bundle at `root`."""
    return [f"torchscript:{r['sha256']}" for r in json.loads((root / "manifest.json").read_text())["artifacts"].values()]


def test_torchscript_artifact_loads(tmp_path):
    root = _torchscript_bundle(tmp_path)
    clf = Bundle.load(root, trusted_imports=_trust(root)).classifier()
    assert clf(torch.rand(2, 1, 4, 4)).shape == (2, 3)


def test_a_torchscript_artifact_is_refused_unless_its_sha256_is_trusted(tmp_path, monkeypatch):
    """A TorchScript program runs with the service's rights (torch.from_file reads and writes
    any file it may): any artifact written as TorchScript, not only the classifier, is refused
    before torch.jit.load sees its bytes, unless `trusted_imports` names its sha256; the
    refusal says which entry trusts it, and nothing else (a module, a bare `torchscript`,
    another file's digest) does."""
    root = _bundle(tmp_path)
    w = BundleWriter.extend(root)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(SmoothingMLP(1, 3, 4, hidden=8).eval()), buf)
    record = w.add_file("magnet_ae_i", "magnet_ae_i.torchscript", buf.getvalue(), format="torchscript",
                        architecture={"kind": "torchscript"})
    w.save()
    entry = f"torchscript:{record['sha256']}"
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("an untrusted TorchScript file was read"))
    for trusted in ([], ["torch", "models", "torchscript", "torchscript:" + "0" * 64]):
        with pytest.raises(bundle_mod.UntrustedImport, match="magnet_ae_i") as err:
            Bundle.load(root, trusted_imports=trusted)
        assert entry in str(err.value)
    assert bundle_mod.trust_needed(json.loads((root / "manifest.json").read_text())) == [entry]
    monkeypatch.undo()
    assert Bundle.load(root, trusted_imports=[entry.upper().replace("TORCHSCRIPT:", "torchscript:")]).module(
        "magnet_ae_i")(torch.rand(1, 1, 4, 4)).shape == (1, 3)


@pytest.mark.parametrize("make, edit", [
    # a safetensors file relabelled as TorchScript
    ("safetensors", lambda r: r["architecture"].__setitem__("kind", "torchscript")),
    # a TorchScript file without its format, or with another one
    ("torchscript", lambda r: r.pop("format")),
    ("torchscript", lambda r: r.__setitem__("format", "safetensors")),
    # a TorchScript file claimed to be a builtin
    ("torchscript", lambda r: r.__setitem__("architecture", ARCH)),
])
def test_torchscript_needs_kind_and_format(tmp_path, make, edit):
    root = _bundle(tmp_path) if make == "safetensors" else _torchscript_bundle(tmp_path)
    _edit(root, lambda m: edit(m["artifacts"]["classifier"]))
    b = Bundle.load(root, trusted_imports=_trust(root))
    with pytest.raises(BundleError):
        b.classifier()


# ------------------------------------------------------------------ 4. declared sizes
def test_huge_input_shape_is_refused(tmp_path):
    root = _bundle(tmp_path)
    _edit(root, lambda m: m["input"].__setitem__("shape", [1, 10**7, 10**7]))
    with pytest.raises(BundleError, match="values per image"):
        Bundle.load(root)
    assert InputSpec.from_json({"shape": [4, 4096, 4096], "class_names": ["a", "b"]}).shape == (4, 4096, 4096)


@pytest.mark.parametrize("key, value, problem", [
    ("shape", [1, 4.9, 4], "three integers"),        # int() would serve it as 4
    ("shape", [1, True, 4], "three integers"),
    ("class_names", ["a"], "at least 2 classes"),
    ("class_names", [], "at least 2 classes"),
    ("class_names", "abc", "at least 2 classes"),
    ("value_range", "ab", "finite numbers"),
    ("value_range", [0, 1, 2], "lo < hi"),
    ("value_range", [1, 0], "lo < hi"),
    ("value_range", [0, float("inf")], "finite numbers"),
    ("mean", [float("nan")], "finite numbers"),
    ("std", [0.0], "positive"),
])
def test_the_input_section_is_checked_before_anything_is_served(tmp_path, key, value, problem):
    """A manifest's input section the Classifier wrapper would turn into NaN logits (a zero or
    NaN std), a label for every input, a truncated shape or a one-class service is refused."""
    root = _bundle(tmp_path)
    _edit(root, lambda m: m["input"].update({key: value, **({"std": [1.0]} if key == "mean" else {}),
                                             **({"mean": [0.0]} if key == "std" else {})}))
    with pytest.raises(BundleError, match=problem):
        Bundle.load(root).input_spec


def test_a_classifier_of_another_class_count_than_the_manifest_is_refused(tmp_path):
    """Five class names over a 3-logit network: the labels past the third had no name, /v2
    declared 5 probabilities and got 3, smoothing failed in torch's words at start-up."""
    root = _bundle(tmp_path)
    _edit(root, lambda m: m["input"].__setitem__("class_names", list("abcde")))
    with pytest.raises(BundleError, match=r"'classifier': gives \[2, 3\] .* 5 classes"):
        Bundle.load(root).classifier()
    _edit(root, lambda m: m["input"].__setitem__("shape", [1, 5, 5]))  # and one it cannot take
    with pytest.raises(BundleError, match=r"'classifier': fails on an input of the manifest's shape \[1, 5, 5\]"):
        Bundle.load(root).classifier()


@pytest.mark.parametrize("hidden", [10**12, 10**6, 16])
def test_architecture_sizes_must_match_the_weights(tmp_path, hidden):
    """Hidden 10**6 would fit in memory (a 10**6 x 16 layer): it is refused on the meta
    device, by its shapes, without allocating it."""
    root = _bundle(tmp_path)
    _edit(root, lambda m: m["artifacts"]["classifier"]["architecture"]["kwargs"].__setitem__("hidden", hidden))
    b = Bundle.load(root)
    with pytest.raises(BundleError, match="artifact 'classifier'"):
        b.classifier()


def test_unknown_architecture_is_a_bundle_error(tmp_path):
    root = _bundle(tmp_path)
    _edit(root, lambda m: m["artifacts"]["classifier"]["architecture"].__setitem__("name", "nope"))
    with pytest.raises(BundleError, match="cannot build"):
        Bundle.load(root).classifier()


# ------------------------------------------------------------------ 5. the RMC FAISS index
def _flat(d: int = 4, n: int = 2) -> bytes:
    faiss = pytest.importorskip("faiss")
    idx = faiss.IndexFlatL2(d)
    idx.add(np.arange(d * n, dtype="float32").reshape(n, d))
    return faiss.serialize_index(idx).tobytes()


def _de(data: bytes, **kw):
    from service.defenses.rmc import deserialize_index
    return deserialize_index(torch.frombuffer(bytearray(data), dtype=torch.uint8), **kw)


def test_faiss_index_round_trips_with_its_header_checked():
    assert _de(_flat(), dim=4, ntotal=2).ntotal == 2


def _patched(data: bytes, at: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    out[at:at + struct.calcsize(fmt)] = struct.pack(fmt, value)
    return bytes(out)


@pytest.mark.parametrize("case, problem", [
    ("ntotal", "takes"),        # header claims 2**40 vectors in a 77-byte file
    ("codes", "declaring"),     # codes vector claims 50M floats
    ("trunc", "the file has"),
    ("fourcc", "not one shieldserve writes"),
    ("short", "too short"),
    ("dim", "dimension"),
    ("labels", "D′ has"),
])
def test_faiss_index_header_is_checked_before_faiss_reads_it(case, problem):
    b = _flat()
    kw: dict = {}
    data = {"ntotal": lambda: _patched(b, 8, "<q", 2**40),
            "codes": lambda: _patched(b, 37, "<Q", 50_000_000),
            "trunc": lambda: b[:-5],
            "fourcc": lambda: b"IxFI" + b[4:],
            "short": lambda: b[:20],
            "dim": lambda: b,
            "labels": lambda: b}[case]()
    if case == "dim":
        kw["dim"] = 5
    if case == "labels":
        kw["ntotal"] = 3
    with pytest.raises(BundleError, match=problem):
        _de(data, **kw)


def test_faiss_vectors_are_bounded_by_the_file_size():
    """An IVF index's header is consistent, but its quantizer's codes vector claims 50M
    floats: FAISS's per-vector limit (set around the call) refuses it without allocating."""
    faiss = pytest.importorskip("faiss")
    x = np.random.default_rng(0).random((100, 4), dtype=np.float32)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatL2(4), 4, 2)
    ivf.train(x)
    ivf.add(x)
    b = faiss.serialize_index(ivf).tobytes()
    limit = faiss.get_deserialization_vector_byte_limit()
    assert _de(b, dim=4, ntotal=100).ntotal == 100
    q = b.index(b"IxF2")  # the coarse quantizer, a flat index inside the IVF one
    bad = _patched(b, q + 37, "<Q", 50_000_000)
    with pytest.raises(BundleError, match="FAISS cannot read it"):
        _de(bad, dim=4, ntotal=100)
    assert faiss.get_deserialization_vector_byte_limit() == limit  # restored


def test_networks_shieldserve_trains_take_pixels_a_brought_one_the_bundles_conversion(tmp_path):
    """The input section (value range, mean, std) describes the classifier a user brought; the
    networks shieldserve trains (built-in classifier, robust, smoothing, Defense-GAN's) learn on
    [0, 1] pixels, and served through a user's --mean/--std they lost 8 points (robust)."""
    from models.bundle import takes_bundle_input

    torch.manual_seed(0)
    w = BundleWriter(tmp_path / "b")
    w.set_input(InputSpec(shape=(1, 4, 4), class_names=("a", "b", "c"), value_range=(0.0, 2.0),
                          mean=(0.5,), std=(0.1,)))
    net = SmoothingMLP(1, 3, 4, hidden=8).eval()
    w.add_module("classifier", net, ARCH, preprocess="bundle")  # as a brought network is recorded
    w.add_module("robust_classifier", net, ARCH, preprocess="none")
    w.add_module("smoothing_sigma25", net, ARCH)  # a record saved before `preprocess` existed
    w.add_module("neuralfp_classifier", net, ARCH)
    w.save()
    b = Bundle.load(tmp_path / "b")
    x = torch.rand(2, 1, 4, 4)
    with torch.no_grad():
        assert torch.allclose(b.classifier(artifact="classifier")(x), net(((x * 2.0) - 0.5) / 0.1), atol=1e-5)
        for raw in ("robust_classifier", "smoothing_sigma25"):
            assert torch.allclose(b.classifier(artifact=raw)(x), net(x)), raw
        assert not torch.allclose(b.classifier(artifact="neuralfp_classifier")(x), net(x))  # trained through it
    assert takes_bundle_input("classifier", {"architecture": {"kind": "torchscript"}})
    assert takes_bundle_input("classifier", {"architecture": {"kind": "import"}})
    assert not takes_bundle_input("classifier", {"architecture": {"kind": "builtin"}})
    with pytest.raises(BundleError, match="preprocess must be"):
        takes_bundle_input("classifier", {"preprocess": "yes"})


def test_nothing_in_the_repository_unpickles():
    """Weights, caches and datasets are safetensors or npz without pickles: no torch.load (a
    pickle loader, whatever its defaults in a given torch release), no pickle module."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for folder in ("service", "models", "bench", "examples"):
        for path in (root / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("torch.load(", "import pickle", "pickle.load", "allow_pickle=True"):
                if needle in text:
                    found.append(f"{path.relative_to(root)}: {needle}")
    assert not found, found


def test_the_service_refuses_a_bundle_whose_build_has_not_finished(tmp_path):
    """A build killed after its classifier step left a bundle that loaded and was served
    undefended (the default pipeline fell back to `baseline`): refused before anything else."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    root = _bundle(tmp_path)
    _edit(root, lambda m: m["build"].update({"complete": False, "pending_steps": ["magnet", "smoothing"],
                                             "command": "shieldserve train --out b"}))
    with pytest.raises(BundleError, match="has not finished .*magnet,smoothing.*shieldserve train --out b"):
        with TestClient(create_app(load_settings(bundle=str(root), warmup=False))):
            pass
    _edit(root, lambda m: m["build"].update({"complete": True}))
    Bundle.load(root).require_finished()  # finished; and bundles older than the marker have none
