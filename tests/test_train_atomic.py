"""`shieldserve train` killed at any point leaves a manifest that is consistent, or says it is not.

- A defense step never saves the manifest halfway: killed after it wrote some artifacts (where
  BuildContext.classifier() used to save), the manifest on disk is the one from before the step.
- A step is saved before the quality gate measures it (the gate reads the bundle from disk),
  with its verdicts "not measured" (unusable), never under the old defense's verdict.
- A finished bundle is not replaced without `force`; a new build's manifest says it is
  unfinished (`build.complete` false, `build.pending_steps`) until its last save.
- `quality.max_accuracy_drop` >= 1 (a percentage typed as a fraction) and `quality.images` < 0
  are refused.
- Defense-GAN: a resumed run trains the uninterrupted one's generator, and a kill between its
  checkpoint's two files resumes from a consistent step.

A process kill (SIGKILL, out of memory) runs no handler: it is simulated by snapshotting
manifest.json at the point of the kill and raising a BaseException the build does not catch.
Tiny synthetic data and stand-in training: seconds, never a real training run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import models.train
from models.architectures import build_architecture
from models.datasets import Dataset, Split
from models.recipes import defensegan, magnet, quality, smoothing
from models.recipes.common import dataset_sha256, seeded
from models.train import _check_options, build_bundle, is_incomplete, parse_classifier
from tests.conftest import blobs_and_mlp

DEFENSES = [name for name, _ in models.train.STEPS if name != "classifier"]


class Killed(BaseException):
    """Stands in for SIGKILL: nothing the build does on an exception (rollback) may save it."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an .npz of 8x8 three-class blobs, a traced MLP for them)."""
    return blobs_and_mlp(tmp_path_factory.mktemp("atomic"))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _trust(bundle: Path) -> list[str]:
    return [f"torchscript:{_manifest(bundle)['artifacts']['classifier']['sha256']}"]


def _fake_step(name: str, tag: float, seen: dict | None = None):
    """A defense step that writes one artifact and its section (and notes the manifest on disk)."""
    def build_step(ctx) -> None:
        if seen is not None:
            seen[name] = _manifest(ctx.writer.path)
        ctx.writer.add_tensors(f"{name}_w", {"w": torch.full((3,), tag)})
        ctx.writer.set_defense(name, {"tag": tag, "weights": f"{name}_w"})
    return build_step


def _fake_all(monkeypatch, tag: float, seen: dict | None = None) -> None:
    import importlib

    for name, module in models.train.STEPS[1:]:
        monkeypatch.setattr(importlib.import_module(module), "build_step", _fake_step(name, tag, seen))


def _new(data: tuple[Path, Path], out: Path, steps: list[str] | None = None, **kw) -> Path:
    npz, mlp = data
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, steps=steps,
                 classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[], **kw)
    return out


# ------------------------------------------------------------------ 1: no save in the middle of a step
def _kill_after_classifier(monkeypatch, bundle: Path, at_kill: list[bytes]) -> None:
    """BuildContext.classifier() returns, then the process dies: what is on disk then."""
    real = models.train.BuildContext.classifier

    def classifier(self):
        clf = real(self)
        clf(torch.zeros(2, 1, 8, 8))  # built from the writer's manifest, and it runs
        at_kill.append((bundle / "manifest.json").read_bytes())
        raise Killed()

    monkeypatch.setattr(models.train.BuildContext, "classifier", classifier)


@pytest.mark.parametrize("step", ["magnet", "smoothing"])
def test_a_step_killed_after_writing_artifacts_leaves_the_manifest_unchanged(data, tmp_path, monkeypatch,
                                                                              step: str) -> None:
    """MagNet asks for the classifier after writing its new autoencoders, smoothing after its
    noise classifiers: the classifier() that saved the manifest there left the new artifacts'
    hashes beside the old section (thresholds of the old autoencoders) when killed."""
    out = _new(data, tmp_path / "b", steps=["classifier"])
    before = (out / "manifest.json").read_bytes()

    def fake_ae(x_train, x_val, spec, r, g, desc):
        return build_architecture(spec).eval(), {"val_mse": 0.0}

    def fake_noise_classifier(dataset, r, sigma, seed, name, device="cpu"):
        spec = {"kind": "builtin", "name": "stand-in"}
        return nn.Linear(2, 2), spec, {"noisy_test_accuracy": 0.5}

    monkeypatch.setattr(magnet, "train_autoencoder", fake_ae)
    monkeypatch.setattr(smoothing, "train_noise_classifier", fake_noise_classifier)
    at_kill: list[bytes] = []
    _kill_after_classifier(monkeypatch, out, at_kill)
    options = {"magnet": {"holdout_per_class": 2}, "smoothing": {"sigmas": [0.25], "denoiser": True}}
    with pytest.raises(Killed):
        build_bundle(out, steps=[step], options=options, trusted_imports=_trust(out), argv=[])
    assert len(at_kill) == 1
    assert at_kill[0] == before  # the artifacts were written (and put back by rollback since)
    assert (out / "manifest.json").read_bytes() == before


def test_a_step_is_saved_unmeasured_before_the_gate_measures_it(data, tmp_path, monkeypatch) -> None:
    """Killed between the step's save and the gate's: the new defense is saved with verdicts
    that keep it from being served, not under the old defense's `usable`."""
    monkeypatch.setattr(quality, "measure_pipelines", lambda *a, **k: [])
    monkeypatch.setattr(quality, "measure_monitor", lambda *a, **k: None)
    monkeypatch.setattr(quality, "check_classifier", lambda *a, **k: None)
    gate = {"quality": {"images": 30}}

    def measure_passes(bundle_path, manifest, step, *a, **k) -> None:
        for key in quality.step_keys(step, manifest):
            manifest.setdefault("quality", {}).setdefault("defenses", {})[key] = {"usable": True}

    monkeypatch.setattr(quality, "measure", measure_passes)
    monkeypatch.setattr(magnet, "build_step", _fake_step("magnet", 1.0))
    out = _new(data, tmp_path / "b", steps=["classifier", "magnet"], options=gate)
    assert _manifest(out)["quality"]["defenses"]["magnet"] == {"usable": True}

    at_gate: list[dict] = []

    def killed(bundle_path, manifest, step, *a, **k) -> None:
        at_gate.append(_manifest(Path(bundle_path)))
        raise Killed()

    monkeypatch.setattr(quality, "measure", killed)
    monkeypatch.setattr(magnet, "build_step", _fake_step("magnet", 2.0))
    with pytest.raises(Killed):
        build_bundle(out, steps=["magnet"], options=gate, trusted_imports=_trust(out), argv=[])
    on_disk = _manifest(out)
    assert at_gate == [on_disk] and on_disk["defenses"]["magnet"]["tag"] == 2.0
    for key in ("magnet", "magnet:reformer"):
        verdict = on_disk["quality"]["defenses"][key]
        assert verdict["usable"] is False and "not measured" in verdict["reason"]
    from models.bundle import Bundle

    assert "not measured" in Bundle.load(out, trusted_imports=_trust(out)).unusable("magnet")
    # measured again, it is served as the gate finds it
    monkeypatch.setattr(quality, "measure", measure_passes)
    build_bundle(out, steps=["quality"], options=gate, trusted_imports=_trust(out), argv=[])
    assert _manifest(out)["quality"]["defenses"]["magnet"] == {"usable": True}


# ------------------------------------------------------------------ 2: overwrite and unfinished builds
def test_a_finished_bundle_is_not_replaced_without_force(data, tmp_path, monkeypatch) -> None:
    _fake_all(monkeypatch, 1.0)
    out = _new(data, tmp_path / "b")
    m = _manifest(out)
    assert m["build"]["complete"] is True and "pending_steps" not in m and not is_incomplete(m)
    assert sorted(m["defenses"]) == sorted(DEFENSES)
    # an artifact only the old bundle has: replaced, the bundle leaves no file of it behind
    m["artifacts"]["old_extra"] = {"file": "old_extra.safetensors", "sha256": "0" * 64}
    (out / "old_extra.safetensors").write_bytes(b"old")
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "notes.txt").write_text("mine")  # not the bundle's: left alone
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(models.train, "load_dataset", lambda spec: pytest.fail("the data was loaded"))
    with pytest.raises(ValueError, match="there is a bundle at .* already.*--force"):
        _new(data, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    monkeypatch.undo()
    _fake_all(monkeypatch, 2.0)
    _new(data, out, force=True)
    m = _manifest(out)
    assert m["build"]["complete"] is True and m["defenses"]["magnet"]["tag"] == 2.0
    assert "old_extra" not in m["artifacts"] and not (out / "old_extra.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"
    # --steps extends it without force, and it stays finished
    build_bundle(out, steps=["squeeze"], trusted_imports=_trust(out), argv=[])
    assert _manifest(out)["build"]["complete"] is True


def test_an_interrupted_new_build_is_marked_unfinished_and_resumes(data, tmp_path, monkeypatch) -> None:
    seen: dict = {}
    _fake_all(monkeypatch, 1.0, seen)

    def killed(ctx) -> None:
        raise Killed()

    monkeypatch.setattr(defensegan, "build_step", killed)
    out = tmp_path / "b"
    with pytest.raises(Killed):
        _new(data, out)
    # while it ran, and as it was left: unfinished, naming the steps it did not finish
    assert is_incomplete(seen["magnet"]) and seen["magnet"]["build"]["pending_steps"] == DEFENSES
    m = _manifest(out)
    assert is_incomplete(m) and m["build"]["pending_steps"] == ["defensegan", "rmc", "smoothing", "robust"]
    assert sorted(m["defenses"]) == ["magnet", "neuralfp", "squeeze"]
    # what serves, evaluates or exports a bundle refuses it, naming the way to finish it
    from models.bundle import Bundle, BundleError

    with pytest.raises(BundleError, match="has not finished .*--steps defensegan,rmc,smoothing,robust"):
        Bundle.load(out, trusted_imports=_trust(out)).require_finished()
    # finished with --steps naming the rest (a subset first: still unfinished)
    _fake_all(monkeypatch, 1.0)
    build_bundle(out, steps=["defensegan", "rmc"], trusted_imports=_trust(out), argv=[])
    assert is_incomplete(_manifest(out)) and _manifest(out)["build"]["pending_steps"] == ["smoothing", "robust"]
    build_bundle(out, steps=["smoothing", "robust"], trusted_imports=_trust(out), argv=[])
    m = _manifest(out)
    assert not is_incomplete(m) and m["build"]["complete"] is True and "pending_steps" not in m["build"]
    assert sorted(m["defenses"]) == sorted(DEFENSES)
    Bundle.load(out, trusted_imports=_trust(out)).require_finished()


def test_an_unfinished_bundle_is_built_again_without_force(data, tmp_path, monkeypatch) -> None:
    _fake_all(monkeypatch, 1.0)
    monkeypatch.setattr(smoothing, "build_step", lambda ctx: (_ for _ in ()).throw(Killed()))
    out = tmp_path / "b"
    with pytest.raises(Killed):
        _new(data, out)
    assert is_incomplete(_manifest(out))
    _fake_all(monkeypatch, 2.0)
    _new(data, out)  # the same command again: no --force needed
    m = _manifest(out)
    assert not is_incomplete(m) and {s["tag"] for s in m["defenses"].values()} == {2.0}
    # a new bundle built with --steps is finished when those steps are
    _new(data, tmp_path / "c", steps=["classifier", "squeeze"])
    assert _manifest(tmp_path / "c")["build"]["complete"] is True


def test_is_incomplete_reads_only_a_false_complete() -> None:
    assert is_incomplete({"build": {"complete": False}})
    assert not is_incomplete({"build": {"complete": True}})
    assert not is_incomplete({"build": {"steps": []}})  # saved before the marker existed
    assert not is_incomplete(None) and not is_incomplete({"build": []})


# ------------------------------------------------------------------ 3: the gate's settings' ranges
@pytest.mark.parametrize("setting", [{"max_accuracy_drop": 2}, {"max_accuracy_drop": 1.0},
                                     {"max_accuracy_drop": float("nan")}, {"max_accuracy_drop": -1},
                                     {"images": -1}])
def test_gate_settings_out_of_range_are_refused(setting: dict) -> None:
    (key, _), = setting.items()
    with pytest.raises(ValueError, match=f"quality.{key}"):
        _check_options({"quality": setting})


def test_gate_settings_in_range_are_taken() -> None:
    for setting in ({"max_accuracy_drop": 0.02}, {"max_accuracy_drop": 0}, {"max_accuracy_drop": 0.99},
                    {"max_accuracy_drop": -0.01}, {"images": 0}, {"images": 300}):
        _check_options({"quality": setting})


# ------------------------------------------------------------------ 4, 5: Defense-GAN's checkpoints
def _gan_data() -> torch.Tensor:
    # 50 images, batches of 8 (6 whole ones an epoch), 2 critic steps a generator step: an epoch
    # ends every 3 generator steps, and the step-2 checkpoint falls in the middle of one
    return torch.rand(50, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _train(x: torch.Tensor, steps: int, directory: Path) -> tuple[nn.Module, dict]:
    r = defensegan.recipe("quick", generator_steps=steps, checkpoint_every=2, batch_size=8, critic_steps=2,
                          latent_dim=8, width=2)
    torch.manual_seed(0)
    sha = dataset_sha256(Dataset("x", Split(x, torch.zeros(len(x), dtype=torch.long)), Split(x[:2], torch.zeros(2)),
                                 Split(x[:2], torch.zeros(2)), ["a"]))
    return defensegan.train_gan(x, r, seeded(0, "defensegan"), defensegan.Checkpoint(directory, sha))


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_resumed_defensegan_run_trains_the_uninterrupted_ones_generator(tmp_path) -> None:
    x = _gan_data()
    straight, m = _train(x, 6, tmp_path / "a")
    assert m["resumed_from_step"] == 0
    _train(x, 2, tmp_path / "b")  # interrupted after its step-2 checkpoint, mid-epoch
    resumed, m = _train(x, 6, tmp_path / "b")
    assert m["resumed_from_step"] == 2
    assert _same(straight, resumed)
    # one weights file is kept, the one state.json names
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert [p.name for p in (tmp_path / "b").glob("*.safetensors")] == [state["weights"]] == ["checkpoint-6.safetensors"]


def test_a_kill_between_the_checkpoints_two_files_resumes_a_consistent_step(tmp_path, monkeypatch) -> None:
    x = _gan_data()
    straight, _ = _train(x, 6, tmp_path / "a")
    real, calls = os.replace, []

    def replace(src, dst):
        if str(dst).endswith("state.json"):
            calls.append(dst)
            if len(calls) == 2:  # the step-4 save: its weights are written, state.json not yet
                raise Killed()
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        _train(x, 6, tmp_path / "b")
    monkeypatch.setattr(os, "replace", real)
    state = json.loads((tmp_path / "b" / "state.json").read_text())
    assert state["generator_step"] == 2 and (tmp_path / "b" / state["weights"]).is_file()
    resumed, m = _train(x, 6, tmp_path / "b")
    assert m["resumed_from_step"] == 2 and _same(straight, resumed)


# ------------------------------------------------------------------ review mends
def test_force_keeps_the_files_the_build_reads(data, tmp_path, monkeypatch) -> None:
    """`--force --classifier torchscript:OUT/classifier.torchscript` named the old bundle's own
    file: replacing the bundle deleted it before the classifier step read it, and the command
    failed leaving no bundle at all."""
    import shutil

    _fake_all(monkeypatch, 1.0)
    out = _new(data, tmp_path / "b")
    own = out / "classifier.torchscript"
    assert own.is_file() and _manifest(out)["artifacts"]["classifier"]["file"] == own.name
    mine = tmp_path / "mine.npz"
    shutil.copy(data[0], mine)
    _new((mine, own), out, force=True)
    assert own.is_file() and _manifest(out)["build"]["complete"] is True
    with pytest.raises(ValueError, match="--force replaces a whole bundle"):
        _new(data, out, steps=["squeeze"], force=True, trusted_imports=_trust(out))


def test_a_new_classifier_under_kept_defenses_is_unfinished_until_they_are_measured(data, tmp_path,
                                                                                   monkeypatch) -> None:
    """`--steps classifier` on a finished bundle saved the new classifier beside the kept
    defenses' verdicts about the old one until the gate measured them again: killed in between,
    the bundle was served as finished. Now it says it is unfinished (`--steps quality`)."""
    from models.bundle import Bundle, BundleError

    _fake_all(monkeypatch, 1.0)
    out = _new(data, tmp_path / "b")
    seen: list[dict] = []
    real = quality.measure

    def killed_at_the_remeasure(path, manifest, name, *a, **k):
        seen.append(_manifest(Path(path)))
        raise Killed()

    monkeypatch.setattr(quality, "measure", killed_at_the_remeasure)
    with pytest.raises(Killed):
        _new(data, out, steps=["classifier"], options={"quality": {"images": 8}}, trusted_imports=_trust(out))
    m = _manifest(out)
    assert seen and m["build"]["complete"] is False and m["build"]["pending_steps"] == ["quality"]
    with pytest.raises(BundleError, match="--steps quality"):
        Bundle.load(out, trusted_imports=_trust(out)).require_finished()
    monkeypatch.setattr(quality, "measure", real)
    _new(data, out, steps=["classifier"], trusted_imports=_trust(out))
    assert _manifest(out)["build"]["complete"] is True and "pending_steps" not in _manifest(out)["build"]
