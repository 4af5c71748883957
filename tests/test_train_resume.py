"""Resumable training checkpoints and `shieldserve train --steps` on an existing bundle.

A checkpoint that cannot be resumed (truncated, another run's data, further along than the run
asks for) stops the build with a CheckpointError naming the file, and leaves the bundle as it
was; a step that fails on a defense the bundle already has keeps that defense; extending a
bundle takes the preset and seed it was built with. Tiny synthetic data and stand-in steps:
these tests check the mechanisms in seconds, never a real training run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.architectures import build_architecture
from models.bundle import Bundle
from models.datasets import Dataset, Split, load_dataset
from models.recipes import defensegan, robust
from models.recipes.common import CheckpointError, dataset_sha256, seeded
from models.train import build_bundle, parse_classifier
from tests.conftest import blobs_and_mlp

SEED = 3  # not the CLI's default 0: extending must take the bundle's own


# ---------------------------------------------------------------------------- data and bundles
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(an .npz of 8x8 three-class blobs, a traced MLP for it)."""
    return blobs_and_mlp(tmp_path_factory.mktemp("resume"))


def _fake_train_robust(dataset: Dataset, r: robust.RobustRecipe, seed: int, device: str = "cpu",
                       checkpoint: Path | None = None, **_: object):
    spec = robust.architecture_spec(r, dataset)
    torch.manual_seed(seed)
    return build_architecture(spec).eval(), spec, {"test_accuracy": 0.5, "epochs_run": r.epochs}


@pytest.fixture(scope="module")
def base_bundle(data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick bundle (seed 3): the traced MLP and a `robust` defense (training stood in for)."""
    npz, mlp = data
    out = tmp_path_factory.mktemp("b") / "base"
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", seed=SEED, steps=["classifier"],
                 classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(robust, "train_robust", _fake_train_robust)
        build_bundle(out, steps=["robust"], argv=[], trusted_imports=_trust(out))
    assert "robust" in json.loads((out / "manifest.json").read_text())["defenses"]
    return out


@pytest.fixture
def bundle(base_bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(base_bundle, out)
    return out


def _trust(bundle: Path) -> list[str]:
    """What trusts the bundle's brought TorchScript classifier (a program: models.bundle)."""
    return [f"torchscript:{json.loads((bundle / 'manifest.json').read_text())['artifacts']['classifier']['sha256']}"]


def _digest(path: Path) -> dict[str, str]:
    """Every file of a bundle, by sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _robust_options(work: Path) -> dict:
    return {"robust": {"checkpoint": True, "work_dir": str(work)}}


def _robust_checkpoint(bundle: Path, work: Path) -> Path:
    """Where the bundle's `--steps robust` (quick preset, checkpoints on) resumes from."""
    m = json.loads((bundle / "manifest.json").read_text())
    ctx = SimpleNamespace(options=_robust_options(work), dataset=load_dataset(m["build"]["dataset"]),
                          preset=m["build"]["preset"], seed=m["build"]["seed"])
    return robust.work_dir(ctx, robust.recipe(m["build"]["preset"], checkpoint=True)) / "checkpoint.safetensors"


def _truncated_safetensors(path: Path, data_sha256: str = "x") -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"model.w": torch.zeros(1000)}, str(path), metadata={"data_sha256": data_sha256})
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


# ---------------------------------------------------------------------------- finding 1: a bad checkpoint
def test_a_truncated_robust_checkpoint_fails_the_command_and_keeps_the_defense(bundle: Path, tmp_path: Path,
                                                                             capsys) -> None:
    """The audit's reproduction: a truncated checkpoint in robust's work directory. The command
    fails (exit 2, one line naming the file and the way out); the bundle is byte for byte as it
    was: its robust section, artifacts, manifest and version."""
    from service import cli

    work = tmp_path / "work"
    ckpt = _robust_checkpoint(bundle, work)
    _truncated_safetensors(ckpt)
    before = _digest(bundle)
    argv = ["train", "--out", str(bundle), "--steps", "robust", "--preset", "quick", "--seed", str(SEED),
            "--options", json.dumps(_robust_options(work)), "--trust-import", _trust(bundle)[0]]
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("shieldserve: error:")]
    assert len(err) == 1 and str(ckpt) in err[0] and "delete" in err[0] and "SHIELDSERVE_WORK_DIR" in err[0]
    assert _digest(bundle) == before
    assert "robust" in Bundle.load(bundle, trusted_imports=_trust(bundle)).manifest["defenses"]


def test_a_robust_checkpoint_of_other_data_fails_the_build(bundle: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    ckpt = _robust_checkpoint(bundle, work)
    ckpt.parent.mkdir(parents=True)
    from safetensors.torch import save_file

    save_file({"model.w": torch.zeros(3)}, str(ckpt), metadata={"data_sha256": "0" * 64, "state": "{}"})
    before = _digest(bundle)
    with pytest.raises(CheckpointError, match="not trained on this data.*delete"):
        build_bundle(bundle, trusted_imports=_trust(bundle), steps=["robust"], options=_robust_options(work), argv=[])
    assert _digest(bundle) == before


@pytest.mark.parametrize("damage", ["truncated_state", "truncated_weights", "other_data"])
def test_an_unusable_defensegan_checkpoint_fails_the_build(bundle: Path, tmp_path: Path, damage: str) -> None:
    """Defense-GAN's checkpoint (state.json and its weights): truncated either, or another run's
    data. The bundle (here without Defense-GAN) does not gain a failed step's verdict: the
    command fails and nothing is written."""
    work = tmp_path / "work"
    m = json.loads((bundle / "manifest.json").read_text())
    ds = load_dataset(m["build"]["dataset"])
    r = defensegan.recipe("quick", generator_steps=2, checkpoint_every=1)
    ctx = SimpleNamespace(options={"defensegan": {"work_dir": str(work)}}, dataset=ds, preset="quick", seed=SEED)
    directory = defensegan.work_dir(ctx, r)
    other = dataset_sha256(ds) if damage != "other_data" else "0" * 64
    defensegan.train_gan(ds.train.x, r, seeded(SEED, "defensegan"), defensegan.Checkpoint(directory, other))
    named = directory / "state.json"
    if damage == "truncated_state":
        named.write_text(named.read_text()[:40])
    else:  # the weights file: truncated, or recording another run's data
        named = directory / json.loads(named.read_text())["weights"]  # checkpoint-<step>.safetensors
        if damage == "truncated_weights":
            named.write_bytes(named.read_bytes()[:100])
    before = _digest(bundle)
    options = {"defensegan": {"work_dir": str(work), "recipe": {"generator_steps": 2, "checkpoint_every": 1}}}
    with pytest.raises(CheckpointError) as exc:
        build_bundle(bundle, trusted_imports=_trust(bundle), steps=["defensegan"], options=options, argv=[])
    assert str(named) in str(exc.value) and f"delete {directory}" in str(exc.value)
    assert ("not trained on this data" in str(exc.value)) == (damage == "other_data")
    assert _digest(bundle) == before


def test_robust_load_checkpoint_refuses_what_it_cannot_restore(tmp_path: Path) -> None:
    ds = Dataset("tiny", Split(torch.rand(20, 1, 8, 8), torch.arange(20) % 2), Split(torch.rand(4, 1, 8, 8),
                 torch.arange(4) % 2), Split(torch.rand(4, 1, 8, 8), torch.arange(4) % 2), ["a", "b"])
    r = robust.recipe("quick", epochs=1, width=2, hidden=4)
    net = build_architecture(robust.architecture_spec(r, ds))
    opt = torch.optim.Adam(net.parameters())
    g = torch.Generator()
    sha = dataset_sha256(ds)
    path = tmp_path / "checkpoint.safetensors"
    _truncated_safetensors(path, sha)
    with pytest.raises(CheckpointError, match=f"{path} cannot be resumed: SafetensorError"):
        robust.load_checkpoint(path, net, opt, g, data_sha256=sha)
    # further along than this run's epochs (only a file put there by hand: epochs is in the key)
    state = {"epoch": 5, "history": [], "best_epoch": 5, "best_pgd": 0.0, "best_clean": 0.0, "seconds": 0.0,
             "collapsed_at": None}
    robust.save_checkpoint(path, net, opt, {k: v.clone() for k, v in net.state_dict().items()}, g, state,
                           data_sha256=sha)
    with pytest.raises(CheckpointError, match="holds 5 epochs"):
        robust.train_robust(ds, r, seed=0, checkpoint=path)
    # another recipe's shapes
    wide = build_architecture(robust.architecture_spec(robust.recipe("quick", width=3, hidden=4), ds))
    robust.save_checkpoint(path, wide, torch.optim.Adam(wide.parameters()),
                           {k: v.clone() for k, v in wide.state_dict().items()}, g,
                           {**state, "epoch": 0}, data_sha256=sha)
    with pytest.raises(CheckpointError, match="RuntimeError"):
        robust.load_checkpoint(path, net, opt, g, data_sha256=sha)


# ---------------------------------------------------------------------------- finding 1: failed steps
def _failing_step(*, overwrite: bool):
    """A robust build_step that writes (a new robust_classifier, a new file, the manifest through
    ctx.classifier()) and then fails."""
    def build_step(ctx) -> None:
        if overwrite:
            r = robust.recipe(ctx.preset)
            spec = robust.architecture_spec(r, ctx.dataset)
            ctx.writer.add_module(robust.ARTIFACT, build_architecture(spec), spec)
            ctx.writer.add_tensors("robust_extra", {"w": torch.ones(3)})
            ctx.writer.set_defense(robust.STEP, {"classifier": robust.ARTIFACT, "broken": True})
            ctx.forget_classifier()
            ctx.classifier()  # saves the manifest mid-step
        raise RuntimeError("boom")
    return build_step


def test_a_failed_step_keeps_the_defense_the_bundle_had(bundle: Path, monkeypatch) -> None:
    before = _digest(bundle)
    monkeypatch.setattr(robust, "build_step", _failing_step(overwrite=True))
    with pytest.raises(RuntimeError, match="boom"):
        build_bundle(bundle, trusted_imports=_trust(bundle), steps=["robust"], argv=[])
    assert _digest(bundle) == before  # the old robust_classifier, no robust_extra, the old manifest
    b = Bundle.load(bundle, trusted_imports=_trust(bundle))
    assert b.manifest["defenses"]["robust"] == {"classifier": "robust_classifier",
                                                "threat_model": {"norm": "linf", "eps": 0.3}}
    b.read_verified("robust_classifier")
    assert "robust" not in b.manifest.get("quality", {}).get("defenses", {})


def test_a_failed_step_new_to_the_bundle_is_recorded_unusable(bundle: Path, monkeypatch) -> None:
    """A defense the bundle did not have: recorded unusable with the error, as on a new bundle,
    and the build goes on (what the step wrote is undone)."""
    from models.recipes import squeeze

    monkeypatch.setattr(squeeze, "build_step", lambda ctx: (_ for _ in ()).throw(ValueError("cannot squeeze")))
    build_bundle(bundle, trusted_imports=_trust(bundle), steps=["squeeze"], argv=[])
    m = json.loads((bundle / "manifest.json").read_text())
    assert "squeeze" not in m["defenses"] and "robust" in m["defenses"]
    assert m["quality"]["defenses"]["squeeze"]["usable"] is False
    assert "cannot squeeze" in m["quality"]["defenses"]["squeeze"]["reason"]


def test_a_failed_step_of_a_new_bundle_is_recorded_unusable(data: tuple[Path, Path], tmp_path: Path,
                                                            monkeypatch) -> None:
    npz, mlp = data
    out = tmp_path / "new"
    monkeypatch.setattr(robust, "build_step", _failing_step(overwrite=True))
    build_bundle(out, dataset=f"npz:{npz}", preset="quick", steps=["classifier", "robust"],
                 classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[])
    m = json.loads((out / "manifest.json").read_text())
    assert "robust" not in m["defenses"] and robust.ARTIFACT not in m["artifacts"]
    verdict = m["quality"]["defenses"]["robust"]
    assert verdict["usable"] is False and "boom" in verdict["reason"]
    assert not (out / "robust_extra.safetensors").exists() and not (out / "robust_classifier.safetensors").exists()
    Bundle.load(out, trusted_imports=_trust(out)).read_verified("classifier")


def test_a_checkpoint_error_in_a_new_bundle_is_not_recorded_unusable(data: tuple[Path, Path], tmp_path: Path,
                                                                     monkeypatch) -> None:
    npz, mlp = data
    out = tmp_path / "new"

    def build_step(ctx) -> None:
        raise CheckpointError("robust checkpoint X cannot be resumed: ...")

    monkeypatch.setattr(robust, "build_step", build_step)
    with pytest.raises(CheckpointError):
        build_bundle(out, dataset=f"npz:{npz}", preset="quick", steps=["classifier", "robust"],
                     classifier=parse_classifier(f"torchscript:{mlp}", None, {}), argv=[])
    m = json.loads((out / "manifest.json").read_text())  # the classifier step's, saved before
    assert "robust" not in m.get("quality", {}).get("defenses", {})


# ---------------------------------------------------------------------------- finding 2: Defense-GAN's steps
def test_a_shorter_defensegan_run_refuses_a_longer_runs_checkpoint(tmp_path: Path) -> None:
    """Without lr_decay generator_steps stays out of the work directory's key (a longer run
    resumes a shorter one); a shorter run is refused, never handed the longer run's generator."""
    x = torch.rand(16, 1, 28, 28)
    ds = Dataset("tiny", Split(x, torch.arange(16) % 2), Split(x[:4], torch.arange(4) % 2),
                 Split(x[:4], torch.arange(4) % 2), ["a", "b"])
    ctx = SimpleNamespace(options={"defensegan": {"work_dir": str(tmp_path)}}, dataset=ds, preset="quick", seed=0)

    def run(steps: int, **kw):
        r = defensegan.recipe("quick", generator_steps=steps, checkpoint_every=1, batch_size=8, critic_steps=1, **kw)
        ckpt = defensegan.Checkpoint(defensegan.work_dir(ctx, r), dataset_sha256(ds))
        return defensegan.train_gan(x, r, seeded(0, "defensegan"), ckpt)[1]

    short, long_ = (defensegan.recipe("quick", generator_steps=n, checkpoint_every=1) for n in (2, 4))
    assert defensegan.work_dir(ctx, short) == defensegan.work_dir(ctx, long_)
    assert defensegan.work_dir(ctx, defensegan.replace(short, lr_decay=True)) != \
        defensegan.work_dir(ctx, defensegan.replace(long_, lr_decay=True))
    assert run(4)["resumed_from_step"] == 0
    with pytest.raises(CheckpointError, match="holds 4 generator steps, more than the 2 asked for") as exc:
        run(2)
    assert "state.json" in str(exc.value) and "delete" in str(exc.value)
    again = run(4)
    assert again["resumed_from_step"] == 4 and again["generator_steps"] == 4  # finished: nothing to train
    assert run(5)["resumed_from_step"] == 4  # a longer run resumes it
    assert run(3, lr_decay=True)["resumed_from_step"] == 0  # its own directory


# ---------------------------------------------------------------------------- finding 3: preset and seed
def test_extending_takes_the_bundles_preset_and_seed_and_refuses_others(bundle: Path, monkeypatch) -> None:
    seen: list[tuple[str, int]] = []

    def build_step(ctx) -> None:
        seen.append((ctx.preset, ctx.seed))

    from models.recipes import squeeze

    monkeypatch.setattr(squeeze, "build_step", build_step)
    build_bundle(bundle, trusted_imports=_trust(bundle), steps=["squeeze"], argv=[])
    build_bundle(bundle, trusted_imports=_trust(bundle), preset="quick", seed=SEED, steps=["squeeze"], argv=[])
    assert seen == [("quick", SEED)] * 2
    before = _digest(bundle)
    with pytest.raises(ValueError, match="built with --preset quick; pass --preset quick"):
        build_bundle(bundle, trusted_imports=_trust(bundle), preset="default", steps=["squeeze"], argv=[])
    with pytest.raises(ValueError, match=f"built with --seed {SEED}; pass --seed {SEED}"):
        build_bundle(bundle, trusted_imports=_trust(bundle), seed=0, steps=["squeeze"], argv=[])
    assert _digest(bundle) == before and len(seen) == 2


def test_a_new_bundle_defaults_to_the_default_preset_and_seed_0(tmp_path: Path) -> None:
    from models.train import _as_built

    out = tmp_path / "b"
    assert (_as_built(out, "preset", None, None, "default"), _as_built(out, "seed", None, None, 0)) == ("default", 0)
    assert _as_built(out, "seed", 5, None, 0) == 5  # a new bundle (or one that records none): as given
    assert _as_built(out, "seed", None, 5, 0) == 5
    with pytest.raises(ValueError, match=r"--seed 5; pass --seed 5 \(or leave it out\)"):
        _as_built(out, "seed", 0, 5, 0)
