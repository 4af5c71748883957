"""Adversarial training recipes, the `robust` pipeline, and `shieldserve export`.

Training runs here are tiny (a few hundred digits, one or two epochs): they check the
mechanisms (every method runs, checkpoints resume to the same weights, a collapse stops
training and restores the best epoch), never what a real run reaches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from models.datasets import Dataset, Split
from models.recipes import robust
from tests.conftest import png


@pytest.fixture(scope="module")
def small(mnist) -> Dataset:
    return Dataset("small", Split(mnist.train.x[:300], mnist.train.y[:300]), mnist.val.per_class(3),
                   mnist.test.per_class(3), mnist.class_names)


def _tiny(**overrides) -> robust.RobustRecipe:
    base = dict(width=4, hidden=16, epochs=2, batch_size=100, eps_warmup_epochs=1, val_digits=20,
                val_pgd_steps=2, pgd_steps=2, checkpoint=False)
    return robust.recipe("quick", **{**base, **overrides})


@pytest.mark.parametrize("method", robust.METHODS)
def test_every_method_trains_and_reports(small: Dataset, method: str) -> None:
    net, spec, metrics = robust.train_robust(small, _tiny(method=method, epochs=1), seed=0)
    assert spec["name"] == "mnist_cnn"
    assert metrics["method"] == method and metrics["epochs_run"] == 1 and metrics["finished"]
    assert 0.0 <= metrics["val_pgd2_accuracy"] <= 1.0 and 0.0 <= metrics["test_accuracy"] <= 1.0
    assert len(metrics["history"]) == 1
    out = net(small.test.x)
    assert out.shape == (len(small.test), 10) and torch.isfinite(out).all()


def test_unknown_method_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        robust.recipe("quick", method="free")


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_checkpoint_resumes_to_the_uninterrupted_weights(small: Dataset, tmp_path: Path, ema_decay: float) -> None:
    r = _tiny(ema_decay=ema_decay)
    full, _, full_metrics = robust.train_robust(small, r, seed=3)
    ckpt = tmp_path / "checkpoint.safetensors"
    _, _, first = robust.train_robust(small, r, seed=3, checkpoint=ckpt, stop_after=1)
    assert first["epochs_run"] == 1 and not first["finished"]
    # a safetensors file (8-byte header length, JSON header), never a pickle
    raw = ckpt.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert "model.out.weight" in header and json.loads(header["__metadata__"]["state"])["epoch"] == 1
    resumed, _, metrics = robust.train_robust(small, r, seed=3, checkpoint=ckpt)
    assert metrics["resumed_from_epoch"] == 1 and metrics["epochs_run"] == 2 and metrics["finished"]
    assert metrics["history"] == full_metrics["history"]
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_weight_averaging_keeps_the_average_and_leaves_training_alone(small: Dataset) -> None:
    plain, _, plain_metrics = robust.train_robust(small, _tiny(), seed=5)
    averaged, _, metrics = robust.train_robust(small, _tiny(ema_decay=0.9), seed=5)
    # the same steps were taken (averaging never feeds back into training) ...
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in plain_metrics["history"]]
    # ... but what is validated and kept is the average, not the last step's weights
    assert any(not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), averaged.state_dict().values()))
    with pytest.raises(ValueError, match="ema_decay"):
        robust.recipe("quick", ema_decay=1.0)


def _ctx(dataset: Dataset, work: Path):
    from types import SimpleNamespace

    return SimpleNamespace(options={"robust": {"work_dir": str(work)}}, preset="quick", seed=0, dataset=dataset)


def test_checkpoint_key_follows_the_recipe_and_the_data_content(small: Dataset, tmp_path: Path) -> None:
    ctx = _ctx(small, tmp_path)
    key = robust.work_dir(ctx, robust.recipe("quick", checkpoint=True))
    assert key is not None and key == robust.work_dir(ctx, robust.recipe("quick", checkpoint=True, ema_decay=0.0))
    assert key != robust.work_dir(ctx, robust.recipe("quick", checkpoint=True, ema_decay=0.99))
    # the same name and split sizes, other images: another run
    resplit = Dataset("small", Split(small.train.x.flip(0), small.train.y.flip(0)), small.val, small.test,
                      small.class_names)
    assert robust.work_dir(_ctx(resplit, tmp_path), robust.recipe("quick", checkpoint=True)) != key


def test_a_checkpoint_of_other_data_is_not_resumed(small: Dataset, tmp_path: Path) -> None:
    """Re-split data under the same name and sizes: a fresh run in its own directory, and the old
    run's checkpoint, if pointed at, is refused (its recorded data sha256 differs)."""
    r = _tiny(epochs=1, checkpoint=True)
    ckpt = robust.work_dir(_ctx(small, tmp_path), r) / "checkpoint.safetensors"
    robust.train_robust(small, r, seed=0, checkpoint=ckpt)
    resplit = Dataset("small", Split(small.train.x.flip(0), small.train.y.flip(0)), small.val, small.test,
                      small.class_names)
    other = robust.work_dir(_ctx(resplit, tmp_path), r) / "checkpoint.safetensors"
    assert not other.exists()
    _, _, metrics = robust.train_robust(resplit, r, seed=0, checkpoint=other)
    assert metrics["resumed_from_epoch"] == 0 and other.is_file()
    with pytest.raises(ValueError, match="not trained on this data"):
        robust.train_robust(resplit, r, seed=0, checkpoint=ckpt)
    _, _, again = robust.train_robust(small, r, seed=0, checkpoint=ckpt)
    assert again["resumed_from_epoch"] == 1  # its own data: resumed (finished, nothing to train)


def test_the_default_work_root_is_private_to_the_user(tmp_path: Path, monkeypatch) -> None:
    import os
    import stat
    import tempfile

    from models.recipes.common import work_root

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("SHIELDSERVE_WORK_DIR", raising=False)
    root = Path(work_root(None))
    assert root == tmp_path / f"shieldserve-work-{os.getuid()}"
    st = root.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()
    assert work_root("/elsewhere") == "/elsewhere"  # a configured one is the user's choice
    root.chmod(0o777)
    with pytest.raises(ValueError, match="writable by others.*SHIELDSERVE_WORK_DIR"):
        work_root(None)
    root.chmod(0o700)
    root.rmdir()
    root.symlink_to(tmp_path)
    with pytest.raises(ValueError, match="not a plain directory"):
        work_root(None)


def test_catastrophic_overfitting_stops_and_restores_the_best_epoch(small: Dataset, monkeypatch) -> None:
    scripted = iter([0.5, 0.6, 0.1, 0.6])  # epoch 3 collapses (0.5 below the best, 0.6)
    monkeypatch.setattr(robust, "pgd_accuracy", lambda *a, **k: next(scripted))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def keep(net: torch.nn.Module, epoch: int) -> None:
        seen[epoch] = {k: v.clone() for k, v in net.state_dict().items()}

    net, _, metrics = robust.train_robust(small, _tiny(epochs=4, collapse_drop=0.3), seed=0, after_epoch=keep)
    assert metrics["catastrophic_overfitting_at_epoch"] == 3 and metrics["epochs_run"] == 3
    assert metrics["best_epoch"] == 2 and metrics["val_pgd2_accuracy"] == 0.6
    assert sorted(seen) == [0, 1, 2]  # epoch 4 never ran
    for k, v in net.state_dict().items():
        assert torch.equal(v, seen[1][k]), k


def test_a_small_dip_is_not_a_collapse() -> None:
    assert robust.collapsed(0.8, 0.55, 0.2) and not robust.collapsed(0.8, 0.7, 0.2)


# --------------------------------------------------------------------------- serving and export
def test_robust_pipeline_serves_the_adversarially_trained_network(make_client, quick_bundle: Path, mnist) -> None:
    from models.bundle import Bundle

    client = make_client()
    info = {p["name"]: p for p in client.get("/pipelines").json()["pipelines"]}
    assert info["robust"]["defenses"][0]["settings"]["classifier"] == "robust_classifier"
    x = mnist.test.x[:6]
    r = client.post("/predict?pipeline=robust", files=[("file", (f"{i}.png", png(x[i]), "image/png"))
                                                         for i in range(len(x))])
    assert r.status_code == 200, r.text
    labels = [res["label"] for res in r.json()["results"]]
    net = Bundle.load(quick_bundle).classifier(artifact="robust_classifier")
    served_x = torch.stack([_roundtrip(x[i]) for i in range(len(x))])
    assert labels == net(served_x).argmax(1).tolist()


def _roundtrip(x: torch.Tensor) -> torch.Tensor:
    """The pixels the service sees for png(x): 8-bit, as the decoder divides them."""
    return (x.clamp(0, 1) * 255.0).round() / 255.0


def test_a_bundle_without_the_robust_classifier_says_how_to_add_it(quick_bundle: Path, tmp_path: Path) -> None:
    from service.defenses import build_defense
    from tests.conftest import defense_env

    copy = tmp_path / "bundle"
    shutil.copytree(quick_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["defenses"].pop("robust", None)
    from models.bundle import content_version

    manifest["version"] = content_version(manifest)  # a bundle saved without it, not an edited one
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="--steps robust"):
        build_defense("robust", {}, defense_env(copy))


@pytest.mark.parametrize("pipeline", ["baseline", "robust", "magnet", "neuralfp"])
def test_export_gives_the_served_labels(make_client, quick_bundle: Path, mnist, tmp_path: Path, pipeline: str) -> None:
    from service.export import export, load_info

    out = tmp_path / f"{pipeline}.pt"
    plan = export(quick_bundle, pipeline, out)
    model = torch.jit.load(str(out))
    info = load_info(out)
    assert info["pipeline"] == pipeline and info["input"]["range"] == [0.0, 1.0]
    # what only rejects is listed (the detectors; the query monitor, on every pipeline but
    # baseline), and the labels of what is accepted are the export's: exact
    assert bool(info["left_out"]) == (pipeline != "baseline") and plan.exact and info["exact"] is True
    assert any("query monitor" in s for s in info["left_out"]) == (pipeline != "baseline")
    x = torch.cat([mnist.test.per_class(2).x, torch.rand(4, 1, 28, 28)])  # digits and noise
    client = make_client()
    r = client.post(f"/predict?pipeline={pipeline}", files=[("file", (f"{i}.png", png(x[i]), "image/png"))
                                                             for i in range(len(x))])
    assert r.status_code == 200, r.text
    with torch.no_grad():
        exported = model(_roundtrip(x)).argmax(1).tolist()
    accepted = [(res["label"], exported[i]) for i, res in enumerate(r.json()["results"]) if res["status"] == "accepted"]
    assert accepted and all(a == b for a, b in accepted)
    # gradients reach the input: the file is usable by gradient-based attacks
    z = _roundtrip(x[:2]).requires_grad_(True)
    model(z).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_export_of_a_smoothing_pipeline_says_what_is_left_out(quick_bundle: Path, tmp_path: Path) -> None:
    from service.export import export

    plan = export(quick_bundle, "default", tmp_path / "default.pt")
    assert any("smoothing noise" in s for s in plan.left_out) and any("magnet detector" in s for s in plan.left_out)


TAIL_PIPELINES = """
pipelines:
  denoised-reformed:
    defenses:
      - {defense: smoothing, sigma: 0.25, denoiser: true, target_radius: 0.5, n: 200, batch_size: 200}
      - {defense: magnet, detectors: [], reform: true}
    query_monitor: false
  denoised-projected:
    defenses:
      - {defense: smoothing, sigma: 0.25, denoiser: true, target_radius: 0.5, n: 100, batch_size: 100}
      - {defense: defensegan, projection: default}
    query_monitor: false
"""


def test_export_computes_the_f_that_purifiers_after_smoothing_run_in(quick_bundle: Path, tmp_path: Path) -> None:
    """Purifiers after a denoised smoothing run inside the function it samples, between the
    denoiser and the classifier (service.pipeline._compose): the export is that f (MagNet's
    reformer included), or refused (Defense-GAN's projection has no exact gradient). Before, both
    were exported as denoiser + classifier, the purifier left out unsaid (argmax differed on 2-3
    of 16 inputs)."""
    from service.evaluation.targets import load_pipelines
    from service.export import ExportRefused, export
    from service.pipeline import _compose

    config = tmp_path / "tail.yaml"
    config.write_text(TAIL_PIPELINES)
    out = tmp_path / "reformed.pt"
    plan = export(quick_bundle, "denoised-reformed", out, str(config))
    assert plan.parts[0].startswith("smoothing denoiser") and plan.parts[1].startswith("magnet reformer")
    assert not plan.exact and any("smoothing noise" in s for s in plan.left_out)
    _, pipes = load_pipelines(quick_bundle, ["denoised-reformed"], str(config))
    pipe = pipes["denoised-reformed"]
    decider = pipe.components[0]
    f = decider.function(decider.sigma, _compose(pipe.components[1:], pipe.classifier, None), differentiable=True)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(out))(x), f(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ExportRefused, match="defensegan purifier has no exact gradient"):
        export(quick_bundle, "denoised-projected", tmp_path / "projected.pt", str(config))
    assert not (tmp_path / "projected.pt").exists()


def test_export_refuses_an_out_whose_folder_is_a_file(quick_bundle: Path, tmp_path: Path, capsys) -> None:
    from service.cli import main

    (tmp_path / "afile").write_text("mine")
    assert main(["export", "--bundle", str(quick_bundle), "--pipeline", "baseline",
                 "--out", str(tmp_path / "afile" / "sub" / "x.pt")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"{tmp_path / 'afile'} is not a directory")
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("pipeline", ["defensegan", "rmc"])
def test_export_refuses_a_pipeline_without_exact_gradients(quick_bundle: Path, tmp_path: Path, pipeline: str) -> None:
    from service.cli import main

    out = tmp_path / "x.pt"
    assert main(["export", "--bundle", str(quick_bundle), "--pipeline", pipeline, "--out", str(out)]) == 2
    assert not out.exists()


# --------------------------------------------------------------------------- AutoAttack
@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
def test_autoattack_stays_in_the_ball_and_counts_the_worst_case(quick_bundle: Path, mnist, norm: str, eps: float) -> None:
    from models.bundle import Bundle
    from service.evaluation.autoattack import AutoAttackBudget, apgd, autoattack

    model = Bundle.load(quick_bundle).classifier()
    t = mnist.test.per_class(1)
    x, y = t.x, t.y
    for target in (None, (y + 1) % 10):
        adv = apgd(model, x, y, eps, norm=norm, iters=5, target=target, generator=torch.Generator().manual_seed(0))
        d = (adv - x).flatten(1)
        assert (d.abs().max(1).values if norm == "linf" else d.norm(dim=1)).max() <= eps + 1e-5
        assert adv.min() >= 0 and adv.max() <= 1
    adv, log = autoattack(model, x, y, eps, norm=norm, budget=AutoAttackBudget(apgd_iters=5, targets=2, square_queries=5))
    after = list(log["after"].values())
    assert after == sorted(after, reverse=True) and after[0] <= log["clean_accuracy"]  # each part only adds
    with torch.no_grad():
        still = model(adv).argmax(1) == y
    assert float(still.float().mean()) == pytest.approx(after[-1])  # the count is what the returned batch gives


def test_evaluate_autoattack_section(quick_bundle: Path, tmp_path: Path) -> None:
    from service.cli import main

    out = tmp_path / "eval"
    rc = main(["evaluate", "--bundle", str(quick_bundle), "--pipelines", "baseline,robust,magnet,smoothing", "--limit", "6",
               "--out", str(out), "--sections", "autoattack", "--autoattack-limit", "robust=4", "--autoattack-budget",
               "apgd_iters=3,targets=1,square_queries=3,pgd_steps=2,pgd_restarts=2,eot_iter=2,check_draws=4",
               "--autoattack-limit", "smoothing=3", "--threads", "0"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = report["pipelines"]["robust"]["attacks"]
    assert {"autoattack/autoattack_linf_0.3", "autoattack/autoattack_l2_2", "autoattack/pgd2x2_linf_0.3"} <= set(rows)
    assert rows["autoattack/autoattack_linf_0.3"]["n"] == 4
    magnet = report["pipelines"]["magnet"]["attacks"]["autoattack/autoattack_linf_0.3"]["autoattack"]
    assert magnet["version"] == "detector-aware" and magnet["attacks"] == ["apgd-ce", "apgd-t"]
    smooth = report["pipelines"]["smoothing"]["attacks"]
    assert smooth["autoattack/autoattack_linf_0.3"]["autoattack"]["version"] == "rand (EOT 2)"
    assert smooth["autoattack/autoattack_linf_0.3"]["n"] == 3
    assert not any(k.startswith("autoattack/pgd") for k in smooth)  # PGD on it: the adaptive section's EOT PGD
    md = (out / "report.md").read_text()
    assert "AutoAttack L-inf 0.3" in md


class _Rejecting(torch.nn.Module):
    """K = 3 class logits and a (K+1)-th rejected logit that wins wherever x[0] > 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Linear(4, 3)
        torch.nn.init.eye_(self.w.weight[:, :3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.w(x.flatten(1))
        reject = 10.0 * (x.flatten(1)[:, :1] - 0.5) + z.max(1, keepdim=True).values
        return torch.cat([z, reject], dim=1)


def test_detector_aware_autoattack_never_counts_a_rejection_as_broken() -> None:
    from service.evaluation.autoattack import AutoAttackBudget, _ce, _dlr_targeted, _wrong, autoattack

    logits = torch.tensor([[0.0, 5.0, 1.0, 9.0], [0.0, 5.0, 1.0, -9.0], [7.0, 5.0, 1.0, -9.0]])
    y = torch.tensor([0, 0, 0])
    assert _wrong(logits, y, 3).tolist() == [False, True, False]  # rejected, wrong class, right
    assert _wrong(logits[:, :3], y, None).tolist() == [True, True, False]
    # the losses rise as the wrong class passes the rejected logit (not only the true one)
    assert float(_ce(logits[:1], y[:1], 3)) < float(_ce(logits[1:2], y[:1], 3))
    t = torch.tensor([1])
    assert float(_dlr_targeted(logits[:1], y[:1], t, 3)) < float(_dlr_targeted(logits[1:2], y[:1], t, 3))
    torch.manual_seed(0)
    model = _Rejecting()
    x = torch.rand(8, 1, 2, 2)
    y = model(x)[:, :3].argmax(1)
    adv, log = autoattack(model, x, y, 0.3, classes=3, budget=AutoAttackBudget(apgd_iters=5, targets=2))
    assert log["version"] == "detector-aware" and "square" not in log["after"]
    with torch.no_grad():
        broken = _wrong(model(adv), y, 3)
    assert float((~broken).float().mean()) == pytest.approx(list(log["after"].values())[-1])
    assert (adv - x).abs().max() <= 0.3 + 1e-6


def test_rand_autoattack_averages_gradients_over_draws() -> None:
    from service.evaluation.autoattack import _loss_grad

    calls = {"n": 0}

    def noisy(x: torch.Tensor) -> torch.Tensor:  # a fresh draw per call, as the EOT model makes
        calls["n"] += 1
        return torch.cat([x.flatten(1), -x.flatten(1)], 1) * (1.0 + 0.1 * torch.randn(()))

    x = torch.rand(2, 1, 1, 1)
    _, _, grad = _loss_grad(noisy, x, torch.tensor([0, 0]), None, eot_iter=5)
    assert calls["n"] == 5 and grad.shape == x.shape


def test_square_linf_stays_in_the_ball_and_breaks_a_linear_model() -> None:
    from service.evaluation.autoattack import _margin, square_linf

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    x = torch.rand(16, 1, 8, 8)
    y = net(x).argmax(1)
    with torch.no_grad():
        stripes = torch.randint(0, 2, (16, 1, 1, 8), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
        start = _margin(net((x + 0.3 * stripes).clamp(0, 1)), y)  # the attack's first point
        adv = square_linf(net, x, y, 0.3, queries=300, generator=torch.Generator().manual_seed(1))
        after = _margin(net(adv), y)
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert (after <= start + 1e-6).all()  # a query is kept only when it lowers the margin
    assert float((net(adv).argmax(1) == y).float().mean()) < 0.5  # eps 0.3 on 64 pixels breaks a linear model
