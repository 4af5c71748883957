"""Bring your own model: a user's classifier and data of another shape, every defense built
around them or recorded as unusable with the reason (issue 18).

Two shapes, both from what ships with scikit-learn: UCI digits (8x8x1, a traced TorchScript
MLP) and 32x32 RGB patches of the two sample photographs (an `import:` CNN with batch norm
and no `features` method). Tiny sets and a few tiny epochs: these tests check mechanisms
(features found, TorchScript fine-tuned, shapes, the gate and what the service does with
it), not accuracies.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from models.bundle import Bundle, Classifier, InputSpec, UntrustedImport  # noqa: E402
from models.features import FeatureError, FeatureExtractor  # noqa: E402


# ---------------------------------------------------------------------------- data and models
def _digits_npz(path: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1200], order[1200:1400]
    np.savez(path, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
    return path


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(32):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the .npz, a traced MLP trained on it)."""
    root = tmp_path_factory.mktemp("digits")
    npz = _digits_npz(root / "digits.npz")
    with np.load(npz) as f:
        x, y = torch.from_numpy(f["x_train"]), torch.from_numpy(f["y_train"])
    torch.manual_seed(0)
    net = _fit(_mlp(), x, y, epochs=8)
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(str(root / "mlp.pt"))
    return npz, root / "mlp.pt"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the .npz of photo patches, PhotoCNN's safetensors weights)."""
    from safetensors.torch import save_file

    from examples.photo_cnn import PhotoCNN
    from examples.sample_photos import load

    root = tmp_path_factory.mktemp("photos")
    data = load(train_per_class=40, test_per_class=8)
    np.savez(root / "photos.npz", **data)
    torch.manual_seed(0)
    net = _fit(PhotoCNN(), torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]), epochs=2)
    save_file(net.state_dict(), str(root / "cnn.safetensors"))
    return root / "photos.npz", root / "cnn.safetensors"


# quick, and quicker still: these tests check mechanisms
# (bounds of 1%: a few hundred calibration images cannot show the recipes' 0.5%)
QUICK = {"magnet": {"epochs": 1}, "neuralfp": {"epochs": 1, "bound": 0.01}, "squeeze": {"bound": 0.01},
         "rmc": {"pgd_steps": [2], "eval_images": 20, "eval_pgd_steps": 2, "steps": 3},
         "smoothing": {"epochs": 1, "denoiser_max_train": 100},
         "defensegan": {"recipe": {"generator_steps": 5, "encoder_steps": 5, "rec_classifier": False,
                                   "calibration_images": 16}},
         "quality": {"images": 16}}


@pytest.fixture(scope="module")
def digits_bundle(digits: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits with the TorchScript MLP; no Defense-GAN step (a bundle without its section)."""
    from models.train import build_bundle, parse_classifier

    npz, mlp = digits
    out = tmp_path_factory.mktemp("b") / "digits"
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, options=QUICK,
                 steps=["classifier", "magnet", "neuralfp", "squeeze", "rmc", "smoothing"],
                 classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[])
    return out


@pytest.fixture(scope="module")
def photos_bundle(photos: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.train import build_bundle, parse_classifier

    npz, weights = photos
    out = tmp_path_factory.mktemp("b") / "photos"
    # the photos' few calibration images (144) cannot show a false-rejection rate <= 1% at 95%
    # confidence: bounds of 5% let MagNet and NeuralFP calibrate on them (a failed step would
    # leave nothing of itself in the bundle: its artifacts are what this test reads)
    options = {**QUICK, "magnet": {"epochs": 1, "target_fpr": 0.05},
               "neuralfp": {"epochs": 1, "target_fpr": 0.05, "bound": 0.05}}
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, options=options,
                 steps=["classifier", "magnet", "neuralfp", "defensegan", "rmc"],
                 classifier=parse_classifier("import:examples.photo_cnn:PhotoCNN", str(weights), {}), argv=[])
    return out


def _trust(bundle: Path) -> list[str]:
    """The `trusted_imports` entries the bundle's code needs (its TorchScript files by sha256)."""
    from models.bundle import trust_needed

    return trust_needed(_manifest(bundle))


# ---------------------------------------------------------------------------- features
def test_features_of_an_eager_network_are_the_input_of_its_last_linear() -> None:
    from examples.photo_cnn import PhotoCNN

    torch.manual_seed(0)
    net = PhotoCNN().eval()
    x = torch.rand(3, 3, 32, 32)
    ext = FeatureExtractor(net, (3, 32, 32))
    assert ext.describe() == {"method": "hook", "layer": "classify", "last_linear_is_output": True}
    want = torch.relu(net.fc1(net.conv(x).flatten(1)))
    assert torch.allclose(ext(x), want)
    assert torch.allclose(ext.head(ext(x)), net(x), atol=1e-5)
    # the override: any submodule's output
    ext = FeatureExtractor(net, (3, 32, 32), layer="fc1")
    assert torch.allclose(ext(x), net.fc1(net.conv(x).flatten(1)))
    assert ext.head is None
    with pytest.raises(FeatureError, match="no such submodule"):
        FeatureExtractor(net, (3, 32, 32), layer="nope")


def test_features_of_a_traced_sequential_and_the_limits() -> None:
    torch.manual_seed(0)
    net = _mlp().eval()
    traced = torch.jit.trace(net, torch.zeros(1, 1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    ext = FeatureExtractor(traced, (1, 8, 8))
    assert ext.method == "chain" and ext.layer == "3"
    assert torch.allclose(ext(x), net[:3](x))
    assert torch.allclose(ext.head(ext(x)), net(x), atol=1e-5)
    assert torch.allclose(FeatureExtractor(traced, (1, 8, 8), layer="1")(x), net[:2](x))

    class NotAChain(nn.Module):  # forward does more than run its children in order
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.flatten(1)
            return self.b(torch.relu(self.a(h)) * 2)

    with pytest.raises(FeatureError, match="not a chain"):
        FeatureExtractor(torch.jit.trace(NotAChain().eval(), torch.zeros(1, 1, 8, 8)), (1, 8, 8))
    # naming the layer cannot help there, and the message says why rather than only "not a chain"
    with pytest.raises(FeatureError, match="--feature-layer 'a' cannot be used: a TorchScript classifier"):
        FeatureExtractor(torch.jit.trace(NotAChain().eval(), torch.zeros(1, 1, 8, 8)), (1, 8, 8), layer="a")
    # ... the same network in eager form works (hooks)
    assert FeatureExtractor(NotAChain().eval(), (1, 8, 8)).layer == "b"
    # a Classifier with no findable features says so instead of raising from has_features
    spec = InputSpec((1, 8, 8), tuple("0123456789"))
    wrapped = Classifier(torch.jit.trace(NotAChain().eval(), torch.zeros(1, 1, 8, 8)), spec)
    assert not wrapped.has_features()
    # ... and it still traces (the service's inference copy, `shieldserve export`): torch.jit.trace
    # probes attributes with hasattr, and a property raising FeatureError broke every trace
    traced = torch.jit.trace(wrapped.eval(), torch.zeros(2, 1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(traced(x), wrapped(x))


# ---------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 28, 28), (3, 32, 32), (1, 64, 64), (3, 64, 64)])
def test_defense_networks_fit_the_input(shape: tuple[int, int, int]) -> None:
    from models.architectures import build_architecture, builtin_spec
    from models.recipes.defensegan import Critic, Encoder, Generator
    from models.recipes.magnet import noise_for, recipe, structures_for
    from models.recipes.neuralfp import eps_for, make_fingerprints
    from models.recipes.neuralfp import recipe as nfp_recipe
    from models.recipes.smoothing import DnCNN

    c, h, _ = shape
    x = torch.rand(2, *shape)
    for structure in structures_for(shape).values():
        ae = build_architecture(builtin_spec("magnet_autoencoder", in_channels=c, structure=structure))
        assert ae(x).shape == x.shape
    assert 0 < noise_for(recipe("default"), shape) <= 0.1
    gen = Generator(16, 4, c, h)
    assert gen(torch.randn(2, 16)).shape == x.shape
    assert Critic(4, c, h)(x).shape == (2,) and Encoder(16, 4, c, h)(x).shape == (2, 16)
    assert DnCNN(c, 4, 3)(x).shape == x.shape
    r = nfp_recipe("quick")
    fp = make_fingerprints(shape, 5, r, torch.Generator().manual_seed(0))
    assert fp["dx"].shape == (r.n_fingerprints, *shape)
    assert float(fp["dx"].max()) <= eps_for(r, shape) <= 0.1


def test_mnist_shapes_are_unchanged(default_bundle: Path) -> None:
    """The default bundle's networks load into the generalised architectures, as they were."""
    from models.recipes.magnet import STRUCTURES, noise_for, recipe, structures_for
    from models.recipes.neuralfp import eps_for
    from models.recipes.neuralfp import recipe as nfp_recipe

    assert structures_for((1, 28, 28)) == STRUCTURES and noise_for(recipe("default"), (1, 28, 28)) == 0.1
    assert eps_for(nfp_recipe("default"), (1, 28, 28)) == 0.1
    b = Bundle.load(default_bundle)
    for name in ("defensegan_generator", "magnet_ae_i", "magnet_ae_ii"):
        b.module(name)
    assert b.classifier().feature_extractor().method == "features"


# ---------------------------------------------------------------------------- bundles
def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_digits_torchscript_bundle(digits_bundle: Path) -> None:
    m = _manifest(digits_bundle)
    assert m["input"]["shape"] == [1, 8, 8]
    assert m["artifacts"]["classifier"]["features"]["method"] == "chain"
    # NeuralFP fine-tuned a copy of the TorchScript MLP, kept as TorchScript
    nfp = m["artifacts"]["neuralfp_classifier"]
    assert nfp["format"] == "torchscript" and "TorchScript" in nfp["training"]["init"]
    # both are programs, served only where the operator trusts each by its sha256
    assert _trust(digits_bundle) == sorted(f"torchscript:{m['artifacts'][a]['sha256']}"
                                           for a in ("classifier", "neuralfp_classifier"))
    with pytest.raises(UntrustedImport, match="neuralfp_classifier"):
        Bundle.load(digits_bundle, trusted_imports=[f"torchscript:{m['artifacts']['classifier']['sha256']}", "torchscript"])
    b = Bundle.load(digits_bundle, trusted_imports=_trust(digits_bundle))
    base, tuned = b.classifier(), b.classifier(artifact="neuralfp_classifier")
    diff = [float((p - q).abs().max()) for p, q in zip(base.network.parameters(), tuned.network.parameters())]
    assert max(diff) > 0, "the fingerprinted copy did not train"
    assert nfp["metrics"]["test_accuracy"] > 0.5  # a fine-tune, not chance (10 classes)
    # RMC indexes the MLP's penultimate layer and fine-tunes its last Linear
    assert m["defenses"]["rmc"]["settings"]["trainable"] == "last"
    assert m["defenses"]["rmc"]["metrics"]["feature_dim"] == 48
    # the gate measured every step's defense against the base classifier on the same images
    q = m["quality"]
    assert q["base"]["images"] == 16 and q["enforce"] is False
    for key in ("magnet", "magnet:reformer", "neuralfp", "squeeze", "rmc", "smoothing", "smoothing:denoised"):
        d = q["defenses"][key]
        assert d["images"] == 16 and 0 <= d["val_accuracy"] <= 1 and d["usable"]
        # 16 images cannot show a drop within 0.02 (one image is 0.0625): no pass, whatever the drop
        assert d["passes"] is False
        if d["base_val_accuracy"] - d["val_accuracy"] <= 0.02 + 1e-9:  # within: refused for the count alone
            assert "only 16 validation images, fewer than the 100" in d["reason"], d
    # the query monitor on the digits' own training and validation images: distinct digits
    mon = q["defenses"]["query_monitor"]
    assert mon["images"] >= 1000 and mon["clients"] == 8 and mon["passes"] and mon["usable"]


def test_photos_import_bundle(photos_bundle: Path) -> None:
    m = _manifest(photos_bundle)
    assert m["input"]["shape"] == [3, 32, 32] and len(m["input"]["class_names"]) == 8
    assert m["artifacts"]["classifier"]["features"] == {"method": "hook", "layer": "classify",
                                                         "last_linear_is_output": True}
    assert m["artifacts"]["magnet_ae_i"]["architecture"]["kwargs"]["structure"] == [8, 8]
    assert m["artifacts"]["defensegan_generator"]["architecture"]["kwargs"]["image_size"] == 32
    assert m["defenses"]["rmc"]["settings"]["trainable"] == "last"
    assert set(m["quality"]["defenses"]) == {"magnet", "magnet:reformer", "neuralfp", "defensegan", "rmc",
                                             "query_monitor", "query_monitor:suspect_linf"}
    # overlapping crops of two photographs are near-duplicates to the monitor: the gate says it
    # would refuse far more than 2% of these benign images (recorded; the quick preset does not enforce),
    # and they are close to each other in pixels too
    mon = m["quality"]["defenses"]["query_monitor"]
    assert mon["flag_rate"] > 0.2 and not mon["passes"] and "not enforced" in mon["reason"]
    near = m["quality"]["defenses"]["query_monitor:suspect_linf"]
    assert near["near_rate"] > 0.2 and not near["passes"] and near["usable"] and "not enforced" in near["reason"]
    assert mon["suspect_linf"] == 0.62  # measured with the check: not enforced, so served with it
    # its networks are built by examples.photo_cnn's code: loaded only where that is trusted
    with pytest.raises(UntrustedImport, match=r"'classifier' by 'examples.photo_cnn:PhotoCNN'"):
        Bundle.load(photos_bundle)
    b = Bundle.load(photos_bundle, trusted_imports=["examples.photo_cnn"])
    x = torch.rand(2, 3, 32, 32)
    assert b.module("defensegan_generator")(torch.randn(2, 128)).shape == x.shape
    assert b.classifier().features(x).shape == (2, 64)


def test_gate_enforced_marks_unusable_and_the_service_skips_it(digits_bundle: Path, tmp_path: Path) -> None:
    """A defense below the gate is recorded unusable with its numbers; the service starts
    without a config, leaves out every pipeline that needs it (and the ones whose section the
    bundle lacks: defensegan), says why on /pipelines, and serves the rest."""
    import shutil

    from fastapi.testclient import TestClient

    from models.train import build_bundle
    from service.app import create_app
    from service.settings import load_settings

    out = tmp_path / "b"
    shutil.copytree(digits_bundle, out)
    m = _manifest(out)
    # an impossible gate (accuracy must rise by a point) on the squeeze and magnet steps
    build_bundle(out, dataset=m["build"]["dataset"], preset="quick", seed=0, steps=["magnet", "squeeze"], trusted_imports=_trust(out),
                 options={**QUICK, "quality": {"images": 16, "max_accuracy_drop": -0.01, "enforce": True}}, argv=[])
    q = _manifest(out)["quality"]["defenses"]
    for key in ("magnet", "magnet:reformer", "squeeze"):
        assert q[key]["usable"] is False and q[key]["passes"] is False
        assert "below the base classifier" in q[key]["reason"] and "accuracy_drop" in q[key]
    assert q["rmc"]["usable"]  # measured before, untouched
    b = Bundle.load(out, trusted_imports=_trust(out))
    assert b.unusable("magnet") and b.unusable("rmc") is None and "no 'defensegan' section" in b.unusable("defensegan")

    app = create_app(load_settings(None, bundle=str(out), warmup=False, trusted_imports=_trust(out)))
    with TestClient(app) as client:
        body = client.get("/pipelines").json()
        served = {p["name"] for p in body["pipelines"]}
        assert {"magnet", "default", "defensegan"} <= set(body["unavailable"])
        assert "below the base classifier" in body["unavailable"]["magnet"]
        assert {"baseline", "rmc", "neuralfp", "smoothing", "denoised"} <= served
        assert body["default"] in served and not served & set(body["unavailable"])
        from service.imaging import encode_png

        png = encode_png(torch.rand(1, 8, 8))
        for name in ("baseline", "rmc", "neuralfp"):
            r = client.post(f"/predict?pipeline={name}", files={"file": ("x.png", png, "image/png")})
            assert r.status_code == 200, r.text
        r = client.post("/predict?pipeline=magnet", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 404


def test_a_monitor_below_the_gate_is_off_and_pipelines_say_why(digits_bundle: Path, tmp_path: Path) -> None:
    """The service runs every pipeline without the monitor when the gate found it unusable."""
    import shutil

    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.imaging import encode_png
    from service.settings import load_settings

    out = tmp_path / "b"
    shutil.copytree(digits_bundle, out)
    m = _manifest(out)
    m["quality"]["defenses"]["query_monitor"] = {"usable": False, "passes": False,
                                                 "reason": "the query monitor flags 9 of 10 benign images"}
    (out / "manifest.json").write_text(json.dumps(m))
    app = create_app(load_settings(None, bundle=str(out), warmup=False, trusted_imports=_trust(out)))
    with TestClient(app) as client:
        body = client.get("/pipelines").json()
        assert body["query_monitor_off"] == "the query monitor flags 9 of 10 benign images"
        assert all(p["query_monitor"] is None for p in body["pipelines"])
        png = encode_png(torch.rand(1, 8, 8))
        for _ in range(3):  # exact repeats and all: nothing screens them
            r = client.post("/predict?pipeline=neuralfp", files={"file": ("x.png", png, "image/png")})
            assert r.status_code == 200 and all(
                rej["defense"] != "query_monitor" for rej in r.json()["results"][0].get("rejected_by") or [])
    m["quality"]["defenses"]["query_monitor"] = {"usable": True, "passes": True, "reason": "fine"}
    near = m["quality"]["defenses"]["query_monitor:suspect_linf"]  # measured by the build
    assert 0 <= near["near_rate"] <= 1 and near["images"] > 0 and near["suspect_linf"] == 0.62
    for usable in (True, False):
        m["quality"]["defenses"]["query_monitor:suspect_linf"] = {
            "usable": usable, "passes": usable, "reason": "fine" if usable else "the suspect pixel check finds 9 of 10"}
        (out / "manifest.json").write_text(json.dumps(m))
        with TestClient(create_app(load_settings(None, bundle=str(out), warmup=False, trusted_imports=_trust(out)))) as client:
            body = client.get("/pipelines").json()
            assert body["query_monitor_off"] is None
            monitored = [p["query_monitor"] for p in body["pipelines"] if p["query_monitor"] is not None]
            assert monitored
            # the monitor runs; its pixel check only where the gate found it usable
            assert body["suspect_linf_off"] == (None if usable else "the suspect pixel check finds 9 of 10")
            assert all(q["suspect_linf"] == (0.62 if usable else 0.0) for q in monitored)


def test_a_step_that_cannot_be_built_is_recorded_not_fatal(tmp_path: Path, digits: tuple[Path, Path],
                                                           caplog) -> None:
    """RMC on a TorchScript network whose features cannot be found: the build goes on, the
    manifest says why (and the log, in one line: what the network cannot give is no bug), and
    the service leaves the rmc pipeline out."""
    from models.train import build_bundle, parse_classifier

    class NotAChain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(64, 8), nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x.flatten(1))) * 2)

    npz, _ = digits
    ts = tmp_path / "net.pt"
    torch.jit.trace(NotAChain().eval(), torch.zeros(1, 1, 8, 8)).save(str(ts))
    out = tmp_path / "b"
    with caplog.at_level(logging.ERROR, logger="shieldserve.train"):
        build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, options=QUICK, steps=["classifier", "rmc"],
                     classifier=parse_classifier(f"torchscript:{ts}", None, {}), argv=[])
    [failed] = [r for r in caplog.records if "step rmc failed" in r.getMessage()]
    assert "not a chain" in failed.getMessage() and failed.exc_info is None
    m = _manifest(out)
    assert "rmc" not in m["defenses"]
    assert m["quality"]["defenses"]["rmc"]["usable"] is False
    assert "not a chain" in m["quality"]["defenses"]["rmc"]["reason"]
    assert "not a chain" in Bundle.load(out, trusted_imports=_trust(out)).unusable("rmc")


def test_steps_quality_measures_the_bundle_again(digits_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from models.train import build_bundle

    out = tmp_path / "b"
    shutil.copytree(digits_bundle, out)
    before = _manifest(out)
    build_bundle(out, dataset=before["build"]["dataset"], preset="quick", steps=["quality"],
                 options={"quality": {"images": 8}}, argv=[], trusted_imports=_trust(out))
    after = _manifest(out)
    assert after["artifacts"] == before["artifacts"]  # nothing retrained
    monitor = ("query_monitor", "query_monitor:suspect_linf")
    assert {d["images"] for k, d in after["quality"]["defenses"].items() if k not in monitor} == {8}
    assert all(after["quality"]["defenses"][k]["images"] >= 1000 for k in monitor)  # every train + val image
    assert set(after["quality"]["defenses"]) == set(before["quality"]["defenses"])
    with pytest.raises(ValueError, match="existing bundle"):
        build_bundle(tmp_path / "none", dataset=before["build"]["dataset"], steps=["quality"], argv=[])


def test_an_import_classifier_in_the_current_directory_is_found_or_named(tmp_path: Path, monkeypatch) -> None:
    """`shieldserve train --classifier import:mod:factory` from the directory holding mod.py:
    the console script does not put it on sys.path as `python -m` does; the CLI appends it.
    A module that is nowhere is a clear error, not a traceback from importlib."""
    import sys

    from models.architectures import import_factory
    from service.cli import user_modules_importable

    (tmp_path / "byom_user_net_xyz.py").write_text(
        "import torch\ndef net():\n    return torch.nn.Linear(4, 2)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(ValueError, match="run shieldserve from the directory"):
        import_factory("byom_user_net_xyz:net")
    user_modules_importable()
    assert sys.path[-1] == str(tmp_path)  # appended: installed packages are never shadowed
    assert isinstance(import_factory("byom_user_net_xyz:net")(), torch.nn.Linear)
    user_modules_importable()
    assert sys.path.count(str(tmp_path)) == 1
    sys.modules.pop("byom_user_net_xyz", None)


# ---------------------------------------------------------------------------- the bundle's data and a broken base classifier
# (`--steps` takes the dataset the bundle was built on; the gate refuses a classifier near chance)
def _classifier_only(out: Path, npz: Path, mlp: Path, **kwargs) -> None:
    from models.train import build_bundle, parse_classifier

    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, steps=["classifier"],
                 classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[], **kwargs)


def test_a_classifier_that_does_not_fit_the_data_is_refused_before_anything_is_written(
        tmp_path: Path, digits: tuple[Path, Path]) -> None:
    """A 10-logit network on 2-class data was served, answering labels that are no class; one
    made for 8x8 images on 16x16 data, or a file that is no TorchScript, ended in torch's
    traceback after a manifest naming it was written. Each is now one ValueError, nothing
    written."""
    npz, mlp = digits
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    two = {}
    for split in ("train", "test"):
        keep = arrays[f"y_{split}"] < 2
        two[f"x_{split}"], two[f"y_{split}"] = arrays[f"x_{split}"][keep], arrays[f"y_{split}"][keep]
    np.savez(tmp_path / "two.npz", **two)
    big = {k: (np.repeat(np.repeat(v, 2, axis=2), 2, axis=3) if k.startswith("x_") else v) for k, v in arrays.items()}
    np.savez(tmp_path / "big.npz", **big)
    cases = [(tmp_path / "two.npz", mlp, r"answers \(2, 10\) for a batch of 2, but the data has 2 classes"),
             (tmp_path / "big.npz", mlp, r"does not run on this data's input \(2, 1, 16, 16\)"),
             (npz, npz, "is not a TorchScript file")]
    for i, (data, net, message) in enumerate(cases):
        out = tmp_path / f"b{i}"
        with pytest.raises(ValueError, match=message):
            _classifier_only(out, data, net)
        assert not (out / "manifest.json").exists() and not list(out.glob("classifier*")), i


def test_the_gate_passes_nothing_on_too_few_images(digits_bundle: Path) -> None:
    """A drop within max_accuracy_drop is seen only on 2 / max_accuracy_drop images or more: on
    fewer, no verdict passes (imbalanced data left a 2-image validation split on which a defense
    that cost half the accuracy passed). Any drop is within 1.0: only the count decides here."""
    from models.datasets import load_dataset
    from models.recipes import quality

    m = json.loads((digits_bundle / "manifest.json").read_text())
    ds = load_dataset(m["build"]["dataset"])
    for images, passes in ((1, False), (2, True)):
        manifest = json.loads(json.dumps(m))
        quality.measure(digits_bundle, manifest, "squeeze", ds, "quick",
                        {"images": images, "max_accuracy_drop": 1.0, "enforce": True}, torch.device("cpu"),
                        tuple(_trust(digits_bundle)))
        d = manifest["quality"]["defenses"]["squeeze"]
        assert d["images"] == images and d["passes"] is passes and d["usable"] is passes, d
        assert ("only 1 validation images, fewer than the 2" in d["reason"]) is not passes, d


def test_a_mean_or_std_per_channel_or_nothing(tmp_path: Path, digits: tuple[Path, Path]) -> None:
    """--mean/--std with another count than the data's channels failed at the first forward
    pass, in torch's words, with the manifest written; refused in one line, nothing written."""
    npz, mlp = digits
    with pytest.raises(ValueError, match=r"input mean has 2 value\(s\) for 1 channel\(s\)"):
        _classifier_only(tmp_path / "b", npz, mlp, input_overrides={"mean": (0.5, 0.5), "std": (0.2, 0.2)})
    assert not (tmp_path / "b" / "manifest.json").exists()


@pytest.mark.parametrize("options,message", [
    ({"quality": {"imagez": 3}}, "unknown setting 'imagez'"), ({"quality": {"images": "x"}}, "'x' is not an int"),
    ({"quality": {"enforce": 1}}, "1 is not a bool"), ({"qualty": {}}, "unknown section 'qualty'"),
    ({"magnet": 3}, "'magnet' must be an object")])
def test_options_the_build_cannot_use_are_refused_before_anything_is_written(
        tmp_path: Path, digits: tuple[Path, Path], options: dict, message: str) -> None:
    npz, mlp = digits
    with pytest.raises(ValueError, match=message):
        _classifier_only(tmp_path / "b", npz, mlp, options=options)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_steps_on_a_bundle_default_to_its_dataset_and_refuse_another(tmp_path: Path, digits: tuple[Path, Path],
                                                                     monkeypatch) -> None:
    import shutil

    import models.train
    from models.train import build_bundle

    npz, mlp = digits
    mine = shutil.copy(npz, tmp_path / "mine.npz")
    out = tmp_path / "b"
    _classifier_only(out, mine, mlp)
    assert len(_manifest(out)["dataset"]["sha256"]) == 64

    other = tmp_path / "other.npz"
    with np.load(mine) as f:
        np.savez(other, **{k: f[k] for k in f.files})
    with pytest.raises(ValueError, match=f"was built on npz:{mine}; pass --dataset npz:{mine}"):
        build_bundle(out, dataset=f"npz:{other}", preset="quick", steps=["squeeze"], argv=[], trusted_imports=_trust(out))

    loaded: list[str] = []
    real = models.train.load_dataset
    monkeypatch.setattr(models.train, "load_dataset", lambda spec: loaded.append(spec) or real(spec))
    build_bundle(out, preset="quick", steps=["squeeze"], options={"squeeze": {"bound": 0.01}}, argv=[],
                 trusted_imports=_trust(out))
    assert loaded == [f"npz:{mine}"] and "squeeze" in _manifest(out)["defenses"]

    # the same name, other content (re-split, or replaced in place): refused, not extended
    with np.load(mine) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["y_test"] = arrays["y_test"][::-1].copy()
    np.savez(mine, **arrays)
    with pytest.raises(ValueError, match="is not the data the bundle .* was built on"):
        build_bundle(out, preset="quick", steps=["squeeze"], argv=[], trusted_imports=_trust(out))


def test_the_gate_checks_a_new_builtin_classifier(tmp_path: Path, digits: tuple[Path, Path], monkeypatch) -> None:
    """`train --out NEW` with the built-in classifier and the gate on (the default preset's
    case): the check after the classifier step loads the bundle, which had no manifest yet, so
    every such build stopped there with "no manifest.json". It measures the new network now."""
    from models.recipes import quality
    from models.train import build_bundle

    npz, _ = digits
    seen = []
    check_base = quality.check_base
    monkeypatch.setattr(quality, "check_base", lambda acc, *a: seen.append(acc) or check_base(acc, *a))
    out = tmp_path / "b"
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, steps=["classifier"],
                 options={"classifier": {"epochs": 15}, "quality": {"images": 50, "enforce": True}}, argv=[])
    m = json.loads((out / "manifest.json").read_text())
    assert "classifier" in m["artifacts"] and len(seen) == 1
    assert seen[0] > quality.chance_bound(10), seen  # the new network, well above chance


def test_the_gate_refuses_a_base_classifier_near_chance(tmp_path: Path, digits: tuple[Path, Path]) -> None:
    """Labels shifted by one: the MLP (fit on the true labels) answers ~0 of them right, and every
    defense would pass at 0.0 against 0.0. The enforced gate refuses at the classifier step; no
    manifest is left to serve."""
    from models.recipes import quality

    npz, mlp = digits
    shifted = tmp_path / "shifted.npz"
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    for k in ("y_train", "y_test"):
        arrays[k] = (arrays[k] + 1) % 10
    np.savez(shifted, **arrays)
    out = tmp_path / "b"
    with pytest.raises(ValueError, match="at or below 0.1500 for 10 classes.*class order"):
        _classifier_only(out, shifted, mlp, options={"quality": {"images": 50, "enforce": True}})
    assert not (out / "manifest.json").exists()

    assert quality.chance_bound(10) == pytest.approx(0.15) and quality.chance_bound(2) == pytest.approx(0.6)
    quick = quality.recipe("quick", images=16)
    assert "not enforced" in quality.check_base(0.05, 10, 16, quick)
    assert quality.check_base(0.5, 10, 16, quick) is None


def test_float_pixels_a_rounding_step_past_one_are_clipped_further_ones_refused(tmp_path: Path) -> None:
    """RANGE_TOLERANCE: 1 + 9e-6 (a float64 -> float32 division's rounding) is clipped to 1; 1 + 2e-5
    is another range, refused with a message that shows it (four digits printed it as "1")."""
    from models.datasets import load_dataset

    f = np.load(_digits_npz(tmp_path / "d.npz"))
    for excess, ok in ((9e-6, True), (2e-5, False)):
        data = {k: f[k] for k in f.files}
        data["x_train"] = data["x_train"].astype(np.float64)
        data["x_train"][0, 0, 0, 0] = 1.0 + excess
        path = tmp_path / f"x{excess}.npz"
        np.savez(path, **data)
        if ok:
            assert float(load_dataset(f"npz:{path}").train.x.max()) == 1.0
        else:
            with pytest.raises(ValueError, match=r"span \[0, 1\.00002\] but must be in \[0, 1\]"):
                load_dataset(f"npz:{path}")
