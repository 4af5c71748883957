"""The bundle format: sha256-verified safetensors, no pickle, and bring-your-own classifiers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.architectures import TinyCNN
from models.bundle import Bundle, BundleError, BundleWriter, InputSpec, UntrustedImport
from models.train import ClassifierSource, build_bundle, parse_classifier


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_quick_bundle_manifest_is_complete(quick_bundle):
    m = json.loads((quick_bundle / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["input"]["shape"] == [1, 28, 28]
    assert m["dataset"]["test"] == 1000
    rec = m["artifacts"]["classifier"]
    assert rec["file"].endswith(".safetensors") and len(rec["sha256"]) == 64
    assert rec["architecture"]["name"] == "mnist_cnn" and "recipe" in rec["training"]
    assert m["build"]["command"].startswith("shieldserve train") and m["build"]["seed"] == 0
    assert not list(quick_bundle.glob("*.pt")) and not list(quick_bundle.glob("*.pkl"))


def test_tampered_weights_refuse_to_load(quick_bundle, tmp_path):
    b = _copy(quick_bundle, tmp_path / "b")
    f = b / "classifier.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(b)


def test_missing_file_and_escaping_path_are_refused(quick_bundle, tmp_path):
    b = _copy(quick_bundle, tmp_path / "b")
    (b / "classifier.safetensors").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(b)
    b2 = _copy(quick_bundle, tmp_path / "b2")
    m = json.loads((b2 / "manifest.json").read_text())
    m["artifacts"]["classifier"]["file"] = "../../etc/passwd"
    (b2 / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside"):
        Bundle.load(b2)


def test_a_manifest_changed_after_it_was_saved_is_refused_until_its_version_says_so(quick_bundle, tmp_path):
    # the version names what answers (model_version, the certificate cache's key): a threshold
    # edited by hand must not be served under the version of the thresholds it replaced
    from models.bundle import content_version

    b = _copy(quick_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    assert m["version"] == content_version(m)  # as saved
    thresholds = m["defenses"]["magnet"]["calibration"]["thresholds"]
    thresholds["reconstruction_l1"] *= 2
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="changed after shieldserve saved it") as err:
        Bundle.load(b)
    assert content_version(m) in str(err.value) and m["version"] in str(err.value)
    m["version"] = content_version(m)  # the edit, owned
    (b / "manifest.json").write_text(json.dumps(m))
    assert Bundle.load(b).version == content_version(m) != json.loads((quick_bundle / "manifest.json").read_text())["version"]
    # a changed artifact record too (its hash is what the version is made of)
    m["artifacts"]["classifier"]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="sha256"):  # the artifact's own check speaks first
        Bundle.load(b)


def test_service_refuses_to_start_on_a_tampered_bundle(quick_bundle, tmp_path):
    from service.app import create_app
    from service.settings import load_settings

    b = _copy(quick_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    m["artifacts"]["classifier"]["sha256"] = "0" * 64
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError):
        create_app(load_settings(bundle=b))


def test_a_defense_the_enforcing_gate_never_measured_is_not_served(quick_bundle, tmp_path):
    # a bundle whose quality gate enforces its verdicts serves only what it measured: a defense
    # added without the gate (or built before it) is refused loudly, not served unmeasured
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import load_settings

    b = _copy(quick_bundle, tmp_path / "b")
    m = json.loads((b / "manifest.json").read_text())
    verdict = {"usable": True, "passes": True, "reason": "within the bound"}
    m["quality"] = {"enforce": True, "max_accuracy_drop": 0.02,
                    "defenses": {k: dict(verdict) for k in ("magnet", "magnet:reformer", "smoothing", "robust")}}
    (b / "manifest.json").write_text(json.dumps(m))
    bundle = Bundle.load(b)
    assert bundle.unusable("magnet") is None and bundle.unusable("smoothing") is None
    assert "has not measured 'neuralfp'" in bundle.unusable("neuralfp")
    assert "--steps quality" in bundle.unusable("smoothing:denoised")
    with TestClient(create_app(load_settings(bundle=b, warmup=False))) as c:
        listed = c.get("/pipelines").json()
        served = {p["name"] for p in listed["pipelines"]}
        unavailable = listed["unavailable"]  # name -> why
    assert {"magnet", "smoothing", "robust", "baseline", "default"} <= served
    assert {"neuralfp", "defensegan", "rmc", "denoised"} <= set(unavailable)
    assert "has not measured" in unavailable["neuralfp"]
    # without enforcement (the quick preset's gate) nothing changes: unmeasured is served
    m["quality"]["enforce"] = False
    (b / "manifest.json").write_text(json.dumps(m))
    assert Bundle.load(b).unusable("neuralfp") is None


def test_a_new_classifier_under_kept_defenses_is_gated_again(quick_bundle, tmp_path, monkeypatch):
    # `--steps classifier` on a bundle with defenses: their verdicts were about the old
    # classifier, so the gate measures every kept defense again, with the new classifier in
    # place (MagNet and squeeze then refuse it: their thresholds were calibrated with the old
    # one, tests/test_magnet.py; such a refusal is recorded as unusable)
    import models.train as train

    measured: list[tuple[str, str]] = []
    monkeypatch.setattr(train.quality, "measure", lambda path, manifest, name, *a, **k: measured.append(
        (name, manifest["artifacts"]["classifier"]["sha256"])))
    monkeypatch.setattr(train.quality, "measure_monitor", lambda *a, **k: measured.append(("monitor", "")))
    monkeypatch.setattr(train.quality, "measure_pipelines", lambda *a, **k: [])
    b = _copy(quick_bundle, tmp_path / "b")
    old = Bundle.load(b).artifact("classifier")["sha256"]
    # the gate runs (8 images; without it, tests/test_train_verdicts.py)
    build_bundle(b, preset="quick", steps=["classifier"], argv=[],
                 options={"classifier": {"epochs": 1}, "quality": {"images": 8}})
    new = Bundle.load(b).artifact("classifier")["sha256"]
    kept = [n for n in train.quality.STEP_KEYS if n in Bundle.load(b).manifest["defenses"]]
    assert new != old and {"magnet", "squeeze", "rmc", "smoothing"} <= set(kept)
    assert measured == [(n, new) for n in kept] + [("monitor", "")]


def test_writer_round_trip_keeps_weights_exactly(tmp_path):
    net = TinyCNN(in_channels=3, num_classes=4)
    w = BundleWriter(tmp_path / "b")
    w.set_input(InputSpec(shape=(3, 32, 32), class_names=("a", "b", "c", "d")))
    w.add_module("classifier", net, {"kind": "builtin", "name": "tiny_cnn", "kwargs": {"in_channels": 3, "num_classes": 4}})
    w.save()
    loaded = Bundle.load(tmp_path / "b").classifier()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), net.eval()(x))


def _synthetic_color_dataset(path: Path) -> Path:
    """A 3x32x32, 4-class task a tiny CNN learns in seconds: each class is a colour."""
    rng = np.random.default_rng(0)

    def make(n: int):
        y = np.arange(n) % 4
        x = rng.integers(0, 60, (n, 32, 32, 3))
        for i, c in enumerate(y):
            x[i, :, :, c % 3] += 150 if c < 3 else 0
            if c == 3:
                x[i] += 150
        return x.clip(0, 255).astype(np.uint8), y

    xt, yt = make(400)
    xs, ys = make(80)
    np.savez(path, x_train=xt, y_train=yt, x_test=xs, y_test=ys, class_names=np.array(["r", "g", "b", "w"]))
    return path


def _pretrain_tiny(data: Path) -> TinyCNN:
    from models.datasets import npz_dataset

    ds = npz_dataset(data)
    torch.manual_seed(0)
    net = TinyCNN(in_channels=3, num_classes=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(ds.train.x), ds.train.y).backward()
        opt.step()
    return net.eval()


@pytest.mark.slow
def test_bring_your_own_classifier_by_import_path_and_torchscript(tmp_path):
    """A pretrained 3x32x32 classifier is wrapped, not retrained, from either source."""
    data = _synthetic_color_dataset(tmp_path / "colors.npz")
    net = _pretrain_tiny(data)
    weights = tmp_path / "tiny.safetensors"
    save_file(net.state_dict(), str(weights))
    src = parse_classifier("import:models.architectures:TinyCNN", str(weights), {"in_channels": 3, "num_classes": 4})
    out = tmp_path / "byo"
    build_bundle(out, dataset=f"npz:{data}", preset="quick", classifier=src, steps=["classifier"], argv=[])
    with pytest.raises(UntrustedImport, match="models.architectures"):
        Bundle.load(out)  # a bundle naming Python code is a program: loaded only where trusted
    b = Bundle.load(out, trusted_imports=["models.architectures:TinyCNN"])
    assert b.input_spec.shape == (3, 32, 32) and b.input_spec.class_names == ("r", "g", "b", "w")
    assert b.manifest["artifacts"]["classifier"]["pretrained"] is True
    x = torch.rand(3, 3, 32, 32)
    assert torch.allclose(b.classifier()(x), net(x))  # the same network, not a retrained one
    assert b.manifest["metrics"]["classifier_test_accuracy"] > 0.9

    scripted = tmp_path / "tiny.torchscript"
    torch.jit.trace(net, torch.rand(1, 3, 32, 32)).save(str(scripted))
    out2 = tmp_path / "byo-ts"
    build_bundle(out2, dataset=f"npz:{data}", preset="quick", classifier=ClassifierSource("torchscript", str(scripted)),
                 steps=["classifier"], argv=[])
    # a TorchScript file is a program too (torch.from_file reads and writes files): trusted by
    # its sha256, refused before torch.jit.load sees it
    digest = hashlib.sha256(scripted.read_bytes()).hexdigest()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("an untrusted TorchScript file was deserialised"))
        with pytest.raises(UntrustedImport, match=f"torchscript:{digest}"):
            Bundle.load(out2)
        with pytest.raises(UntrustedImport):  # a module entry, or another file's digest, is no trust in it
            Bundle.load(out2, trusted_imports=["torch", "models", "torchscript:" + "0" * 64, "torchscript"])
    assert torch.allclose(Bundle.load(out2, trusted_imports=[f"torchscript:{digest}"]).classifier()(x), net(x),
                          atol=1e-6)


def test_byo_classifier_with_normalisation_sees_pixels_in_unit_range(tmp_path):
    spec = InputSpec(shape=(1, 4, 4), class_names=("a", "b"), value_range=(0.0, 255.0), mean=(127.5,), std=(127.5,))
    from models.bundle import Classifier

    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return torch.zeros(x.shape[0], 2)

    Classifier(Probe(), spec)(torch.ones(1, 1, 4, 4))
    assert torch.allclose(seen["x"], torch.ones(1, 1, 4, 4))  # 1.0 -> 255 -> (255-127.5)/127.5


def test_bad_classifier_specs_are_explained():
    with pytest.raises(ValueError, match="classifier-weights"):
        parse_classifier("import:models.architectures:TinyCNN", None, {})
    with pytest.raises(ValueError, match="must be"):
        parse_classifier("bogus", None, {})


def test_rebuilding_with_the_same_seed_reproduces_the_metrics(quick_bundle, tmp_path):
    out = tmp_path / "again"
    build_bundle(out, preset="quick", seed=0, steps=["classifier"], argv=[])
    a = json.loads((quick_bundle / "manifest.json").read_text())["artifacts"]["classifier"]
    b = json.loads((out / "manifest.json").read_text())["artifacts"]["classifier"]
    assert a["metrics"] == b["metrics"]


_NO_RECIPES = """
import sys
from models.bundle import Bundle
from service.runtime import Runtime
from service.settings import load_settings

bundle = Bundle.load("models/default")
networks = [n for n, a in bundle.manifest["artifacts"].items() if a.get("architecture")]
for name in networks:
    bundle.module(name)
rt = Runtime(load_settings(bundle="models/default", warmup=False))
print(len(networks), sorted(rt.pipelines))
print(sorted(m for m in sys.modules if m.startswith("models.recipes")))
rt.compute.close()
"""


def test_serving_the_committed_bundle_imports_no_training_recipe():
    """DESIGN: a defense never imports a recipe. Every network the committed bundle names
    (MagNet's autoencoders, Defense-GAN's generator and encoder, smoothing's CNNs and
    denoisers) is built from models.architectures; in a fresh interpreter, so modules other
    tests imported do not count."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _NO_RECIPES], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    counts, recipes = out.stdout.strip().splitlines()[-2:]
    assert "magnet" in counts and "defensegan" in counts and "smoothing" in counts, counts
    assert recipes == "[]", recipes


def test_the_version_covers_the_input_section_and_architecture_records(quick_bundle, tmp_path):
    """Since format 2 a hand-edited input section (value range, normalisation, class names) or
    architecture record is a changed manifest too: it was served under the old model_version. A
    bundle of format 1 keeps its version and loads; the next save makes it format 2 (so a
    release that reads only format 1 says it is newer, rather than hand-edited)."""
    from models.bundle import FORMAT_VERSION, BundleWriter, content_version

    b = _copy(quick_bundle, tmp_path / "b")
    path = b / "manifest.json"
    BundleWriter.extend(b).save()  # saved by this code
    m = json.loads(path.read_text())
    assert m["format_version"] == FORMAT_VERSION == 2 and m["version"] == content_version(m)
    for edit in (lambda m: m["input"].update(value_range=[0, 255]),
                 lambda m: m["input"].update(class_names=list("abcdefghij")),
                 lambda m: m["artifacts"]["classifier"]["architecture"]["kwargs"].update(hidden=201),
                 lambda m: m["artifacts"]["robust_classifier"].update(preprocess="bundle")):
        edited = json.loads(json.dumps(m))
        edit(edited)
        path.write_text(json.dumps(edited))
        with pytest.raises(BundleError, match="input section and artifacts' architecture records"):
            Bundle.load(b)
    # format 1 (a bundle saved before): what it covered then, so its version stands
    old = {**m, "format_version": 1}
    old["version"] = content_version(old)
    path.write_text(json.dumps(old))
    assert Bundle.load(b).version == old["version"]
    old["input"]["class_names"] = list("abcdefghij")  # not covered there: loads (the README says so)
    path.write_text(json.dumps(old))
    assert Bundle.load(b).version == old["version"]
    BundleWriter.extend(b).save()  # upgraded: now the edit is part of the version
    m = json.loads(path.read_text())
    assert m["format_version"] == 2 and m["version"] != old["version"]
    m["format_version"] = 3
    path.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="bundle format 3, this shieldserve reads 1, 2"):
        Bundle.load(b)


def test_a_format_1_bundle_whose_pixel_networks_were_served_converted_answers_under_another_version(
        quick_bundle, tmp_path, caplog):
    """Releases before format 2 served the networks shieldserve trained on pixels through the
    bundle's input conversion; they take pixels now. A format-1 bundle with a conversion answers
    differently, so under another model_version (GET /certify's cache is keyed by it), and says so."""
    import logging

    from models.bundle import content_version

    b = _copy(quick_bundle, tmp_path / "b")
    path = b / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"] = 1
    m["input"].update(mean=[0.5], std=[0.25])
    for record in m["artifacts"].values():
        record.pop("preprocess", None)  # as the earlier release wrote them
    m["version"] = content_version(m)
    path.write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="shieldserve"):
        loaded = Bundle.load(b)
    assert loaded.version != m["version"] and len(loaded.version) == 12
    assert any("saved by an earlier release" in r.getMessage() and m["version"] in r.getMessage()
               for r in caplog.records)
    m["input"].pop("mean"), m["input"].pop("std")  # no conversion: nothing is served differently
    m["version"] = content_version(m)
    path.write_text(json.dumps(m))
    assert Bundle.load(b).version == m["version"]
