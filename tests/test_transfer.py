"""Transfer attacks: MI-FGSM with input diversity on a surrogate ensemble, the surrogates'
training and cache, and the evaluate section end to end."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models.datasets import Dataset, Split
from service.evaluation import transfer

TINY = (transfer.SurrogateRecipe("tiny_cnn", (("width", 4),), epochs=1, batch_size=128),)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 28 * 28, 10)).eval()


def _ensemble() -> transfer.LogitEnsemble:
    return transfer.LogitEnsemble([_net(0), _net(1)]).eval()


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
def test_mi_fgsm_stays_in_the_eps_ball_and_the_pixel_range(norm, eps):
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 10
    adv = transfer.mi_fgsm(_ensemble(), x, y, eps, norm=norm, steps=5, generator=torch.Generator().manual_seed(1))
    assert adv.shape == x.shape and float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    d = (adv - x).flatten(1)
    size = d.abs().max(dim=1).values if norm == "linf" else d.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert float(size.min()) > 0.5 * eps  # it moved: the budget is used, not ignored


@pytest.mark.parametrize("shape", [(2, 1, 28, 28), (2, 3, 32, 32), (2, 1, 28, 20)])
def test_input_diversity_keeps_the_shape_and_is_the_identity_at_p0(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert transfer.input_diversity(x, 0.0, g) is x
    changed = 0
    for _ in range(20):
        z = transfer.input_diversity(x, 1.0, g)
        assert z.shape == x.shape
        changed += int(not torch.equal(z, x))
    # p = 1: every draw resizes; only a one-pixel enlargement cropped back onto its duplicated
    # row or column can give the image back unchanged
    assert changed >= 10


def test_transfer_attack_fools_the_surrogate_ensemble():
    model = _ensemble()
    x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the ensemble gets right by construction
    adv = transfer.transfer_attack(model, x, y, 0.3, steps=10, batch_size=8, seed=0)
    with torch.no_grad():
        acc = float((model(adv).argmax(1) == y).float().mean())
    # a random conv net's logit margins are far below what eps 0.3 on 784 pixels can move
    assert acc <= 0.5, acc


def _small(mnist, test_x: torch.Tensor | None = None) -> Dataset:
    test = mnist.test.head(50)
    return Dataset("small", mnist.train.head(600), mnist.val.head(100),
                   Split(test.x if test_x is None else test_x, test.y), mnist.class_names)


def test_surrogates_train_on_the_train_split_only(mnist, tmp_path):
    # a test split of NaNs: a single test image in the training (or in picking the epoch)
    # would make every weight NaN
    ds = _small(mnist, test_x=torch.full((50, 1, 28, 28), float("nan")))
    (s,) = transfer.load_or_train_surrogates(ds, "v", tmp_path, recipes=TINY)
    assert all(torch.isfinite(p).all() for p in s.net.parameters())
    assert not s.cached and s.val_accuracy > 0.2


def test_surrogate_cache_is_reused_and_checked(mnist, tmp_path, monkeypatch):
    ds = _small(mnist)
    (first,) = transfer.load_or_train_surrogates(ds, "v", tmp_path, recipes=TINY)
    trained = []
    real = transfer.train_surrogate
    monkeypatch.setattr(transfer, "train_surrogate", lambda *a, **kw: trained.append(1) or real(*a, **kw))
    (again,) = transfer.load_or_train_surrogates(ds, "v", tmp_path, recipes=TINY)
    assert again.cached and not trained
    assert all(torch.equal(a, b) for a, b in zip(first.net.state_dict().values(), again.net.state_dict().values()))
    # another bundle version is another key: trained, not reused
    (other,) = transfer.load_or_train_surrogates(ds, "w", tmp_path, recipes=TINY)
    assert not other.cached and len(trained) == 1
    # a weights file that no longer matches its recorded sha256 is not loaded
    (weights,) = [p for p in tmp_path.glob("*.safetensors") if json.loads(p.with_suffix(".json").read_text())["bundle"] == "v"]
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    (redone,) = transfer.load_or_train_surrogates(ds, "v", tmp_path, recipes=TINY)
    assert not redone.cached and len(trained) == 2


@pytest.mark.slow
def test_cli_transfer_section(quick_bundle, tmp_path, monkeypatch):
    from service.cli import main

    monkeypatch.setattr(transfer, "DEFAULT_SURROGATES", TINY)  # seconds, not a minute
    out = tmp_path / "eval"
    rc = main(["evaluate", "--bundle", str(quick_bundle), "--pipelines", "baseline,magnet", "--limit", "4",
               "--out", str(out), "--sections", "transfer", "--transfer-surrogates", "2", "--transfer-steps", "3",
               "--threads", "1"])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["transfer_attacks"]) == {"mifgsm_di_linf_0.3", "mifgsm_di_l2_2"}
    meta = report["transfer_attacks"]["mifgsm_di_linf_0.3"]
    assert meta["steps"] == 3 and 0.0 <= meta["success_on_base"] <= 1.0 and meta["mean_linf"] <= 0.3 + 1e-5
    surrogates = report["transfer_surrogates"]["surrogates"]
    assert len(surrogates) == 2 and surrogates[0]["seed"] != surrogates[1]["seed"]
    assert all("test_accuracy" in s for s in surrogates)
    for name in ("baseline", "magnet"):
        row = report["pipelines"][name]["attacks"]["transfer/mifgsm_di_linf_0.3"]
        assert row["section"] == "transfer" and {"robust_accuracy", "attack_success", "rejected"} <= set(row)
    assert report["pipelines"]["magnet"]["attacks"]["transfer/mifgsm_di_linf_0.3"]["detection_auc"] is not None
    assert len(list((out / "transfer_surrogates").glob("*.safetensors"))) == 2
    md = (out / "report.md").read_text()
    assert "## Transfer attacks on the surrogate ensemble" in md and "| magnet | mifgsm_di_linf_0.3 |" in md


def test_findings_say_when_transfer_beats_the_oblivious_attacks():
    from service.evaluation.report import findings

    def rep(transfer_acc: float) -> dict:
        return {"attacks": {"oblivious/pgd_linf_0.3": {"section": "oblivious", "robust_accuracy": 0.8},
                            "transfer/mifgsm_di_linf_0.3": {"section": "transfer", "robust_accuracy": transfer_acc}}}

    lines = findings({"budget": {"linf_eps": 0.3}, "pipelines": {"rmc": rep(0.2), "robust": rep(0.8)}})
    assert len(lines) == 1 and "**rmc**" in lines[0] and "0.200 (mifgsm_di_linf_0.3)" in lines[0]
