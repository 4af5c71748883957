"""`shieldserve train --steps` never leaves a verdict about what a bundle no longer holds, and
refuses what it would otherwise ignore.

- A step rebuilt where the gate does not run drops its old verdicts (it kept "usable", and a
  MagNet rejecting 28% of the clean digits was served as passed); where the bundle's gate
  enforces, the new defense is then not served until `--steps quality` measures it.
- `--steps` on a bundle the gate measured runs the gate as it ran then (images, enforce, drop),
  not the preset's default of none.
- A new classifier without the gate: the kept defenses' verdicts go, and one calibrated with the
  old classifier (its `classifier_sha256`) is recorded unusable, so `serve` leaves it out
  instead of refusing to start.
- The command that finishes an interrupted build carries the build's `--options`.
- `--options` values of the wrong type or out of bounds are refused before anything is written;
  a damaged manifest under `--steps` is a one-line BundleError, not a traceback.

Tiny synthetic data and stand-in steps: seconds, never a real training run.
"""

from __future__ import annotations

import importlib
import json
import shlex
from pathlib import Path

import pytest
import torch
from torch import nn

import models.train
from models.bundle import Bundle, BundleError
from models.train import _check_values, build_bundle, parse_classifier
from tests.conftest import blobs_and_mlp


class Killed(BaseException):
    """Stands in for SIGKILL."""


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return blobs_and_mlp(tmp_path_factory.mktemp("verdicts"))


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _trust(bundle: Path) -> list[str]:
    return [f"torchscript:{_manifest(bundle)['artifacts']['classifier']['sha256']}"]


def _fake(monkeypatch, names: list[str], tag: float = 1.0) -> None:
    """Stand-in defense steps: one artifact and a section that names the classifier it was
    built with, as MagNet's, squeeze's and RMC's do (smoothing's names none)."""
    for name in names:
        def build_step(ctx, name=name) -> None:
            ctx.writer.add_tensors(f"{name}_w", {"w": torch.full((3,), tag)})
            built_for = {} if name == "smoothing" else {
                "classifier_sha256": ctx.writer.manifest["artifacts"]["classifier"]["sha256"]}
            ctx.writer.set_defense(name, {"tag": tag, "weights": f"{name}_w", **built_for})
        monkeypatch.setattr(importlib.import_module(dict(models.train.STEPS)[name]), "build_step", build_step)


def _new(data: tuple[Path, Path], out: Path, steps: list[str], **kw) -> Path:
    npz, mlp = data
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=0, steps=steps,
                 classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[], **kw)
    return out


def _with_verdicts(bundle: Path, keys: list[str], **gate) -> dict:
    """The bundle as the gate left it: every key usable, a composition measured with magnet."""
    m = _manifest(bundle)
    m["quality"] = {"images": 8, "enforce": True, "max_accuracy_drop": 0.02, **gate,
                    "defenses": {k: {"usable": True, "passes": True, "reason": "within the bound"} for k in keys},
                    "pipelines": {"default": {"keys": ["magnet", "smoothing"], "usable": True}}}
    _write(bundle, m)
    return m


def _no_gate_runs(monkeypatch) -> list:
    """quality.measure and measure_pipelines recorded, not run (the stand-in sections serve nothing)."""
    calls: list = []
    monkeypatch.setattr(models.train.quality, "measure",
                        lambda path, manifest, name, ds, preset, gate, *a, **k: calls.append((name, dict(gate))))
    monkeypatch.setattr(models.train.quality, "measure_pipelines", lambda *a, **k: [])
    monkeypatch.setattr(models.train.quality, "measure_monitor", lambda *a, **k: None)
    monkeypatch.setattr(models.train.quality, "check_classifier", lambda *a, **k: None)
    return calls


def test_a_step_rebuilt_with_the_gate_off_keeps_no_old_verdict(data, tmp_path, monkeypatch):
    _fake(monkeypatch, ["magnet"])
    out = _new(data, tmp_path / "b", steps=["classifier", "magnet"])
    _with_verdicts(out, ["magnet", "magnet:reformer"])
    assert Bundle.load(out, trusted_imports=_trust(out)).unusable("magnet") is None
    _fake(monkeypatch, ["magnet"], tag=2.0)
    build_bundle(out, steps=["magnet"], options={"quality": {"images": 0}}, trusted_imports=_trust(out), argv=[])
    m = _manifest(out)
    assert m["defenses"]["magnet"]["tag"] == 2.0
    assert "magnet" not in m["quality"]["defenses"] and "magnet:reformer" not in m["quality"]["defenses"]
    assert m["quality"]["pipelines"]["default"]["stale"] is True
    # the bundle's gate enforces: the rebuilt defense is not served until measured
    assert "has not measured 'magnet'" in Bundle.load(out, trusted_imports=_trust(out)).unusable("magnet")


def test_steps_on_a_measured_bundle_run_the_gate_as_it_ran(data, tmp_path, monkeypatch):
    _fake(monkeypatch, ["magnet"])
    out = _new(data, tmp_path / "b", steps=["classifier", "magnet"])
    _with_verdicts(out, ["magnet", "magnet:reformer"], max_accuracy_drop=0.05)
    calls = _no_gate_runs(monkeypatch)
    build_bundle(out, steps=["magnet"], trusted_imports=_trust(out), argv=[])
    assert calls == [("magnet", {"images": 8, "enforce": True, "max_accuracy_drop": 0.05})]
    calls.clear()
    build_bundle(out, steps=["magnet"], options={"quality": {"images": 12}}, trusted_imports=_trust(out), argv=[])
    assert calls == [("magnet", {"images": 12, "enforce": True, "max_accuracy_drop": 0.05})]  # --options wins


def test_a_new_classifier_without_the_gate_leaves_out_what_was_calibrated_with_the_old(data, tmp_path, monkeypatch):
    _fake(monkeypatch, ["magnet", "smoothing"])
    out = _new(data, tmp_path / "b", steps=["classifier", "magnet", "smoothing"])
    _with_verdicts(out, ["magnet", "magnet:reformer", "smoothing"], enforce=False, images=0)
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.jit.trace(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval(), torch.zeros(1, 1, 8, 8)).save(str(other))
    build_bundle(out, steps=["classifier"], classifier=parse_classifier(f"torchscript:{other}", None, {}),
                 trusted_imports=_trust(out), argv=[])
    m = _manifest(out)
    assert m["build"].get("complete", True) is True
    assert m["quality"]["defenses"]["magnet"]["usable"] is False
    assert "calibrated with the classifier this build replaced" in m["quality"]["defenses"]["magnet"]["reason"]
    assert "smoothing" not in m["quality"]["defenses"]  # unmeasured; the gate does not enforce here: served
    bundle = Bundle.load(out, trusted_imports=_trust(out))
    assert "--steps magnet" in bundle.unusable("magnet") and bundle.unusable("smoothing") is None


def test_the_command_that_finishes_a_build_carries_its_options(data, tmp_path, monkeypatch):
    def killed(ctx) -> None:
        raise Killed()

    monkeypatch.setattr(importlib.import_module(dict(models.train.STEPS)["magnet"]), "build_step", killed)
    options = {"magnet": {"holdout_per_class": 2}, "smoothing": {"sigmas": [0.5]}, "quality": {"images": 0}}
    with pytest.raises(Killed):
        _new(data, tmp_path / "b", steps=["classifier", "magnet", "smoothing"], options=options)
    out = tmp_path / "b"
    bundle = Bundle.load(out, trusted_imports=_trust(out))
    with pytest.raises(BundleError) as err:
        bundle.require_finished()
    hint = str(err.value)
    assert "--steps magnet,smoothing --options " in hint
    given = shlex.split(hint.split("--options ", 1)[1].split(" --trust-import")[0].rstrip("`"))[0]
    assert json.loads(given) == options


@pytest.mark.parametrize("options, words", [
    ({"classifier": {"adversarial": "PGD"}}, "adversarial must be 'none' or 'pgd'"),
    ({"robust": {"method": "PGD"}}, "robust method must be one of"),
    ({"classifier": {"epochs": "2"}}, "classifier.epochs: '2' is not of its type (int)"),
    ({"classifier": {"batch_size": 0}}, "classifier.batch_size: 0 must be at least 1"),
    ({"robust": {"epochs": 0}}, "robust.epochs: 0 must be at least 1"),
    ({"smoothing": {"denoiser_batch_size": 0}}, "must be at least 1"),
    ({"smoothing": {"sigmas": 0.25}}, "smoothing.sigmas: 0.25 is not of its type"),
    ({"rmc": {"pgd_steps": [1.5]}}, "rmc.pgd_steps"),
    ({"robust": {"augment": "yes"}}, "robust.augment"),
    ({"robust": {"lr": float("nan")}}, "robust.lr"),
    ({"defensegan": {"recipe": {"betas": [0.5]}}}, "defensegan.betas"),
])
def test_option_values_are_refused_before_anything_is_written(data, tmp_path, options, words):
    out = tmp_path / "b"
    with pytest.raises(ValueError, match=None) as err:
        _new(data, out, steps=["classifier"], options=options)
    assert words in str(err.value)
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("options", [
    {"neuralfp": {"eps": "auto"}}, {"neuralfp": {"eps": 0.1}}, {"magnet": {"noise": 0.1}},
    {"smoothing": {"sigmas": [0.25, 0.5], "denoiser_max_train": 0}}, {"rmc": {"pgd_steps": [1, 2]}},
    {"defensegan": {"recipe": {"generator_steps": 10, "betas": [0.5, 0.9]}, "work_dir": "/tmp/x"}},
    {"robust": {"method": "pgd", "lr": 1, "work_dir": "/tmp/x"}}, {"classifier": {"adversarial": "pgd"}},
])
def test_option_values_the_recipes_take_pass(options):
    _check_values(options, "quick")
    _check_values(options, "default")


@pytest.mark.parametrize("damage, words", [
    ("[]", "must be a JSON object"),
    ({"build": "x"}, "'build' must be an object"),
    ({"dataset": "x"}, "'dataset' must be an object"),
    ({"quality": []}, "'quality' must be an object"),
])
def test_steps_on_a_damaged_manifest_is_a_bundle_error(data, tmp_path, damage, words):
    out = _new(data, tmp_path / "b", steps=["classifier"])
    if isinstance(damage, str):
        (out / "manifest.json").write_text(damage)
    else:
        _write(out, {**_manifest(out), **damage})
    with pytest.raises(BundleError, match=None) as err:
        build_bundle(out, steps=["magnet"], trusted_imports=[], argv=[])
    assert words in str(err.value)


# ------------------------------------------------------------------ evaluate and Ctrl-C
def _evaluate(out: Path, report: Path, monkeypatch, *extra: str) -> int:
    from service import cli

    monkeypatch.setenv("SHIELDSERVE_TRUSTED_IMPORTS", json.dumps(_trust(out)))
    return cli.main(["evaluate", "--bundle", str(out), "--out", str(report), "--pipelines", "baseline",
                     "--limit", "3", "--sections", "oblivious", *extra])


@pytest.mark.usefixtures("restore_logging")
def test_evaluate_refuses_data_that_is_not_what_the_bundle_was_built_on(data, tmp_path, monkeypatch, capsys):
    import numpy as np

    npz = tmp_path / "blobs.npz"
    npz.write_bytes(data[0].read_bytes())
    out = _new((npz, data[1]), tmp_path / "b", steps=["classifier"])
    arrays = dict(np.load(npz))
    arrays["x_test"] = arrays["x_test"][..., ::-1].copy()  # the same file, other images
    np.savez(npz, **arrays)
    assert _evaluate(out, tmp_path / "r", monkeypatch) == 2
    err = capsys.readouterr().err
    assert "is not the data the bundle" in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "report.json").exists()


@pytest.mark.usefixtures("restore_logging")
def test_evaluate_offset_past_the_test_split_is_one_line(data, tmp_path, monkeypatch, capsys):
    out = _new(data, tmp_path / "b", steps=["classifier"])
    assert _evaluate(out, tmp_path / "r", monkeypatch, "--offset", "5000") == 2
    err = capsys.readouterr().err
    assert err.startswith("shieldserve: error: --offset 5000 is past the") and err.count("\n") == 1, err


@pytest.mark.usefixtures("restore_logging")
def test_ctrl_c_in_a_train_step_is_one_line_and_status_130(data, tmp_path, monkeypatch, capsys, caplog):
    from service import cli

    out = _new(data, tmp_path / "b", steps=["classifier"])
    before = (out / "manifest.json").read_bytes()

    def interrupted(ctx) -> None:
        ctx.writer.add_tensors("magnet_w", {"w": torch.ones(3)})
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(dict(models.train.STEPS)["magnet"]), "build_step", interrupted)
    rc = cli.main(["train", "--out", str(out), "--steps", "magnet", "--trust-import", _trust(out)[0]])
    assert rc == 130
    assert capsys.readouterr().err.strip().endswith("shieldserve: interrupted")
    assert "step magnet stopped (Ctrl-C); the bundle is as it was before the step" in caplog.text
    assert (out / "manifest.json").read_bytes() == before
