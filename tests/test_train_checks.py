"""`shieldserve train`: what a user gets wrong is refused before anything trains, and a step
stopped by a signal, or killed, leaves a bundle that loads (or that the same step repairs)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.bundle import Bundle, BundleError
from models.train import ClassifierSource, build_bundle

REPO = Path(__file__).resolve().parents[1]


def _copy(bundle: Path, to: Path) -> Path:
    shutil.copytree(bundle, to)
    return to


def _no_data(monkeypatch) -> None:
    import models.train

    monkeypatch.setattr(models.train, "load_dataset", lambda spec: pytest.fail("the data was loaded before the refusal"))


@pytest.mark.parametrize("options, match", [
    ({"robust": {"epoch": 3}}, r"--options robust: unknown setting 'epoch'; settings: .*epochs"),
    ({"classifier": {"epoch": 3}}, r"--options classifier: unknown setting 'epoch'"),
    ({"squeeze": {"rate": 0.1}}, r"--options squeeze: unknown setting 'rate'; settings: bound, confidence, target_fpr"),
    ({"defensegan": {"recipe": {"generator_step": 5}}}, r"--options defensegan: unknown setting 'generator_step'"),
    ({"defensegan": {"recipe": 5}}, r"defensegan.recipe must be an object"),
    ({"defensegan": {"recipe": {"work_dir": "/tmp/x"}}}, r"--options defensegan: unknown setting 'work_dir'"),
])
def test_a_misspelt_step_setting_is_refused_before_anything_is_written(tmp_path, monkeypatch, options, match) -> None:
    """A misspelt key was a TypeError traceback (in the classifier step), or its defense recorded
    unusable after every other step had trained, the command exiting 0."""
    _no_data(monkeypatch)
    with pytest.raises(ValueError, match=match):
        build_bundle(tmp_path / "b", preset="quick", options=options)
    assert not (tmp_path / "b").exists()


def test_defensegan_takes_its_settings_at_the_top_of_its_section_too(tmp_path, monkeypatch) -> None:
    """Every step reads its recipe's settings from its section; Defense-GAN read them only under
    "recipe" and silently ignored `{"defensegan": {"generator_steps": 600}}`."""
    from types import SimpleNamespace

    import models.recipes.defensegan as dg

    seen = {}
    monkeypatch.setattr(dg, "_build", lambda ctx, r: seen.update(r=r))
    ctx = SimpleNamespace(preset="quick", options={"defensegan": {"generator_steps": 7, "work_dir": "/x",
                                                                  "recipe": {"encoder_steps": 3}}})
    dg.build_step(ctx)
    assert seen["r"].generator_steps == 7 and seen["r"].encoder_steps == 3


def test_what_cannot_work_is_refused_before_the_data_loads(tmp_path, monkeypatch, quick_bundle) -> None:
    _no_data(monkeypatch)
    # steps to add to a bundle that is not there: each would fail after its training
    with pytest.raises(ValueError, match="there is no bundle at .* to add steps to"):
        build_bundle(tmp_path / "nothing", preset="quick", steps=["magnet"])
    # a brought classifier that no step would use
    src = ClassifierSource("torchscript", str(tmp_path / "net.pt"))
    with pytest.raises(ValueError, match="add `classifier` to --steps"):
        build_bundle(_copy(quick_bundle, tmp_path / "b1"), steps=["squeeze"], classifier=src)
    # a device torch cannot use here (an AssertionError traceback from the first step before)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            build_bundle(tmp_path / "c", preset="quick", device="cuda")
    with pytest.raises(ValueError, match="is not a torch device|trains on cpu or cuda"):
        build_bundle(tmp_path / "c", preset="quick", device="gpu")
    assert not (tmp_path / "c").exists()
    # the gate's settings where the gate does not run (the quick preset measures no images), also
    # on a bundle extended with the preset it was built with
    with pytest.raises(ValueError, match="quality gate does not run here"):
        build_bundle(tmp_path / "c", preset="quick", options={"quality": {"max_accuracy_drop": 0.05}})
    with pytest.raises(ValueError, match="the quick preset measures 0 images"):
        build_bundle(_copy(quick_bundle, tmp_path / "b2"), steps=["quality"],
                     options={"quality": {"max_accuracy_drop": 0.05}})


def test_a_signal_nohup_ignores_stays_ignored_while_the_steps_run() -> None:
    import signal as sig

    from models.train import _signals_stop_the_step

    before = sig.signal(sig.SIGHUP, sig.SIG_IGN)
    try:
        with _signals_stop_the_step():
            assert sig.getsignal(sig.SIGHUP) is sig.SIG_IGN  # `nohup shieldserve train` survives the terminal
            assert sig.getsignal(sig.SIGTERM) not in (sig.SIG_IGN, sig.SIG_DFL)
        assert sig.getsignal(sig.SIGHUP) is sig.SIG_IGN
    finally:
        sig.signal(sig.SIGHUP, before)


def test_an_existing_bundles_input_conversion_and_brought_classifier_are_not_dropped(tmp_path, monkeypatch,
                                                                                   quick_bundle) -> None:
    """`--steps` ignored --value-range/--mean/--std on an existing bundle (its classifier then
    served through the old conversion), and `--steps classifier` without --classifier replaced a
    brought network with the built-in one, silently."""
    import models.train

    b = _copy(quick_bundle, tmp_path / "b")
    with pytest.raises(ValueError, match="has its input conversion .* from its build"):
        build_bundle(b, steps=["squeeze"], input_overrides={"mean": (0.5,), "std": (0.1,)})
    m = json.loads((b / "manifest.json").read_text())
    m["artifacts"]["classifier"]["architecture"] = {"kind": "torchscript"}  # as a brought one is recorded
    (b / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setattr(models.train, "load_dataset", lambda spec: pytest.fail("the data was loaded"))
    with pytest.raises(ValueError, match="serves a classifier you brought"):
        build_bundle(b, steps=["classifier"], trusted_imports=[f"torchscript:{m['artifacts']['classifier']['sha256']}"])


def test_a_misspelt_feature_layer_is_refused_before_anything_trains(tmp_path, monkeypatch) -> None:
    _no_data(monkeypatch)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.trace(net.eval(), torch.zeros(1, 1, 8, 8)), str(path))
    src = ClassifierSource("torchscript", str(path), feature_layer="fc9")
    with pytest.raises(ValueError, match=r"--feature-layer 'fc9': the network has no such submodule; it has \['0', '1'"):
        build_bundle(tmp_path / "b", preset="quick", classifier=src)


def test_a_step_killed_while_writing_is_repaired_by_running_it_again(tmp_path, quick_bundle) -> None:
    """SIGKILL (out of memory) while a step writes its artifacts leaves files the manifest's
    hashes do not match: every command refused the bundle, `--steps` on that step included.
    The step writes them again, so it does not check them first; any other step still does."""
    b = _copy(quick_bundle, tmp_path / "b")
    artifact = json.loads((b / "manifest.json").read_text())["artifacts"]["smoothing_sigma25"]
    (b / artifact["file"]).write_bytes(b"half written")
    with pytest.raises(BundleError, match="refusing to load it"):
        build_bundle(b, steps=["squeeze"])
    build_bundle(b, steps=["smoothing"], options={"smoothing": {"epochs": 1, "sigmas": [0.25], "denoiser": False}})
    Bundle.load(b)  # every artifact verified


@pytest.mark.slow
def test_sigterm_during_a_step_undoes_it(tmp_path, quick_bundle) -> None:
    """`kill`, `docker stop` or a job's timeout stops `train --steps` as Ctrl-C does: the step
    is undone and the bundle loads (a SIGTERM left artifacts half rewritten)."""
    b = _copy(quick_bundle, tmp_path / "b")
    before = (b / "manifest.json").read_bytes()
    env = {**os.environ, "SHIELDSERVE_PROGRESS": "0"}
    env.pop("SHIELDSERVE_TEST_QUICK_BUNDLE", None)
    proc = subprocess.Popen([sys.executable, "-m", "service", "train", "--out", str(b), "--steps", "smoothing",
                             "--options", '{"smoothing": {"epochs": 80, "denoiser": false}}'],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        # once the first network is written the step is under way: stop it in the second's training
        first = b / json.loads(before)["artifacts"]["smoothing_sigma25"]["file"]
        mtime = first.stat().st_mtime_ns
        while first.stat().st_mtime_ns == mtime and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read().decode()
    assert code != 0, out
    assert (b / "manifest.json").read_bytes() == before
    Bundle.load(b)  # every artifact as the manifest says
