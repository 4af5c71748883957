"""Neural Fingerprinting (Dathathri, Zheng, Yue & Murray 2018): a classifier trained to answer
N secret input perturbations with N secret output changes.

Fingerprints: dx_i uniform in [0, eps) per pixel (the MNIST choice); dy_i,k = +beta on class k
and -alpha on every other class (the MNIST code's 0.7 / 0.2357).
phi(x) = logits(x) / ||logits(x)||,  F(x, dx) = phi(x + dx) - phi(x).
Training loss: CE(f(x), y) + weight * mean_i ||F(x, dx_i) - dy_i,y||^2 (the mean estimated on
a random subset of `fingerprints_per_step` fingerprints per batch, to save CPU).
Detection: D_k(x) = mean_i ||F(x, dx_i) - dy_i,k||; score = min_k D_k(x) (`match: min`), D at
the predicted class (`predicted`), or, the default, `either`: max(min / tau_min, predicted /
tau_pred), rejected above 1 (the two scores calibrated jointly, sharing the rate equally).
Calibration: `holdout_per_class` training digits per class are kept out of the fingerprint
training; tau is the loosest threshold for which the one-sided 95% Clopper-Pearson upper bound
of the false-rejection rate on them plus the validation split is <= `bound` (0.5%, half the
1% `target_fpr`: the network is a fine-tune of the base classifier, which trained on the
held-out digits too, so they look easier to it than new digits; with the bound at 1% the test
split measured 1.1%). `recalibrate: true` keeps the bundle's network and fingerprints and only
sets tau again.

The network is a COPY of the bundle's base classifier fine-tuned with that loss (the base
classifier artifact is never touched); a TorchScript base is copied by loading its file
again, fine-tuned the same way, and saved as TorchScript. The fingerprints are secret: they are written to
the bundle as a safetensors artifact and never leave the service.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.recipes.common import accuracy, fit_keep_best, random_affine, seeded
from service.defenses.neuralfp import (  # noqa: F401 - the scores the service serves, re-exported
    MATCHES, fingerprint_distances, fingerprint_responses, fingerprint_scores, match_score,
)


@dataclass(frozen=True)
class NeuralFPRecipe:
    n_fingerprints: int = 10
    eps: float | str = "auto"      # "auto": eps_for (MNIST's 0.1, smaller for larger inputs), or a number
    alpha: float = 0.2357          # -alpha on the other classes
    beta: float = 0.7              # +beta on the true class
    weight: float = 10.0           # of the fingerprint loss against cross-entropy (1.0 barely
                                   # moves the fingerprint distance in a few hundred steps)
    fingerprints_per_step: int = 10  # a random subset per batch: an unbiased, cheaper loss estimate
    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    augment: bool = True
    scratch_epochs: int = 30       # when the base classifier cannot be copied
    target_fpr: float = 0.01       # upper confidence bound of the clean false-rejection rate
    confidence: float = 0.95
    holdout_per_class: int = 100   # training digits kept out of the fingerprint training, for calibration
    bound: float = 0.005           # the upper bound must be <= this (half the target: see the module doc)
    recalibrate: bool = False      # keep the bundle's network and fingerprints, only set tau again
    match: str = "either"          # score: "min" over classes, "predicted" (D at the predicted class),
                                   # or "either": max(min / tau_min, predicted / tau_pred), reject above 1

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, NeuralFPRecipe] = {
    "default": NeuralFPRecipe(),
    "quick": NeuralFPRecipe(fingerprints_per_step=3, epochs=3, batch_size=64, lr=2e-3, augment=False,
                             scratch_epochs=4, holdout_per_class=50, match="min"),
    # quick: `min`, because 3 short epochs leave the predicted class's clean distances a long
    # tail (tau 1.37 on the quick network, which then rejected 10% of fooled FGSM digits)
}


def recipe(preset: str, **overrides: Any) -> NeuralFPRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


MNIST_PIXELS = 28 * 28


def eps_for(r: NeuralFPRecipe, shape: tuple[int, ...]) -> float:
    """The fingerprints' per-pixel scale: MNIST's 0.1 up to 784 values; for larger inputs
    scaled by sqrt(784 / values), so that a fingerprint's L2 norm stays MNIST's (a 3x32x32
    image: 0.05) rather than growing with the input."""
    if r.eps != "auto":
        return float(r.eps)
    values = 1
    for d in shape:
        values *= int(d)
    return 0.1 * min(1.0, (MNIST_PIXELS / values) ** 0.5)


def make_fingerprints(shape: tuple[int, ...], num_classes: int, r: NeuralFPRecipe,
                      g: torch.Generator) -> dict[str, torch.Tensor]:
    dx = torch.rand((r.n_fingerprints, *shape), generator=g) * eps_for(r, shape)
    dy = torch.full((r.n_fingerprints, num_classes, num_classes), -r.alpha)
    dy[:, torch.arange(num_classes), torch.arange(num_classes)] = r.beta
    return {"dx": dx, "dy": dy}  # dy[i, k] is the response fingerprint i expects for class k


def calibration_scores(model: Any, x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                       match: str) -> dict[str, torch.Tensor]:
    """The clean scores a match calibrates on: one detector (`fingerprint`) for `min` and
    `predicted`; for `either` the two scores `min` and `predicted`, which reject together and
    so share the false-rejection budget (calibration.bounded_joint_thresholds)."""
    if match == "either":
        return {m: fingerprint_scores(model, x, dx, dy, match=m) for m in ("min", "predicted")}
    return {"fingerprint": fingerprint_scores(model, x, dx, dy, match=match)}


def train_fingerprinted(net: nn.Module, dataset: Any, fp: dict[str, torch.Tensor], r: NeuralFPRecipe,
                        epochs: int, g: torch.Generator, device: torch.device) -> tuple[nn.Module, dict[str, float]]:
    """Fine-tune (or train) `net` with CE + fingerprint loss; keep the best validation epoch
    (accuracy, then fingerprint loss)."""
    dx, dy = fp["dx"].to(device), fp["dy"].to(device)
    x_train, y_train = dataset.train.x.to(device), dataset.train.y.to(device)
    x_val, y_val = dataset.val.x.to(device), dataset.val.y.to(device)

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if r.augment:
            xb = random_affine(xb, g)
        pick = torch.randperm(len(dx), generator=g)[:r.fingerprints_per_step].to(device)
        logits, resp = fingerprint_responses(net, xb, dx[pick])
        target = dy[pick][:, yb].transpose(0, 1)           # (B, n, K)
        fp_loss = (resp - target).pow(2).sum(dim=2).mean()
        return F.cross_entropy(logits, yb) + r.weight * fp_loss

    def score() -> tuple[tuple[float, float], dict[str, str]]:
        acc = accuracy(net, x_val, y_val)
        with torch.no_grad():
            _, d = fingerprint_distances(net, x_val, dx, dy)
            fp_val = float(d.gather(1, y_val[:, None]).mean())
        return (acc, -fp_val), {"val_acc": f"{acc:.4f}", "val_fp": f"{fp_val:.4f}"}

    best = fit_keep_best(net, x_train, y_train, epochs=epochs, batch_size=r.batch_size, lr=r.lr, generator=g,
                         loss=loss, score=score, desc="train neuralfp")
    for p in net.parameters():
        p.requires_grad_(False)
    return net, {"val_accuracy": round(best[0], 4), "val_fingerprint_distance": round(-best[1], 4)}


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    from models.recipes.magnet import one_thread

    with one_thread():
        _build(ctx)


def _build(ctx: "BuildContext") -> None:  # noqa: F821
    from models.architectures import build_architecture
    from models.bundle import Classifier
    from models.recipes.classifier import architecture_spec
    from models.recipes.classifier import recipe as classifier_recipe
    from dataclasses import replace as dc_replace

    from models.datasets import calibration_holdout
    from service.defenses.calibration import bounded_calibration_record, bounded_joint_thresholds

    r = recipe(ctx.preset, **ctx.options.get("neuralfp", {}))
    if not 1 <= r.n_fingerprints <= 64:
        raise ValueError("neuralfp n_fingerprints must be in [1, 64]")
    ds, dev, spec_in = ctx.dataset, ctx.device, ctx.input_spec
    if r.recalibrate:
        wrapped, fp, metrics, arch, init, train, held, r = _existing(ctx, r)
    else:
        g = seeded(ctx.seed, "neuralfp")
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
        base = ctx.classifier()
        arch = ctx.writer.manifest["artifacts"]["classifier"].get("architecture", {})
        if arch.get("kind") in ("builtin", "import"):
            init, epochs = "copy of the base classifier", r.epochs
            net = build_architecture(arch, ctx.writer.trusted_imports).to(dev)
            net.load_state_dict(base.network.state_dict())
        elif arch.get("kind") == "torchscript":
            # A fresh copy of the user's TorchScript module, loaded from the bundle's verified
            # bytes: its parameters are ordinary leaf tensors that autograd trains like an eager
            # module's (Bundle.module froze the serving copy, not this one).
            init, epochs = "copy of the base classifier (TorchScript, fine-tuned)", r.epochs
            net = torch.jit.load(io.BytesIO(ctx.writer.load().read_verified("classifier")),
                                 map_location=dev)
        else:
            init, epochs = "builtin CNN from scratch", r.scratch_epochs
            arch = architecture_spec(classifier_recipe(ctx.preset), ds)
            net = build_architecture(arch).to(dev)
        for p in net.parameters():
            p.requires_grad_(True)
        if not any(p.requires_grad for p in net.parameters()):
            raise ValueError("neuralfp: the base classifier has no trainable parameters to fine-tune")
        fp = make_fingerprints(spec_in.shape, spec_in.num_classes, r, g)
        wrapped = Classifier(net, spec_in).to(dev)  # trains in pixel space, like the service uses it
        train, held = calibration_holdout(ds, r.holdout_per_class)
        wrapped, metrics = train_fingerprinted(wrapped, dc_replace(ds, train=train), fp, r, epochs, g, dev)
    dx, dy = fp["dx"].to(dev), fp["dy"].to(dev)
    cal = calibration_scores(wrapped, torch.cat([ds.val.x, held.x]).to(dev), dx, dy, r.match)
    bound = min(r.bound, r.target_fpr)
    thresholds, _, _ = bounded_joint_thresholds(cal, bound, r.confidence)
    record = bounded_calibration_record(thresholds, r.target_fpr, r.confidence, cal,
                                        {"validation": len(ds.val), "train_holdout": len(held)},
                                        val_scores={k: v[:len(ds.val)] for k, v in cal.items()}, bound=bound)
    taus = None
    if r.match == "either":  # the served score is max(min / tau_min, predicted / tau_pred): threshold 1
        taus = {"min": thresholds["min"], "predicted": thresholds["predicted"]}
        record["thresholds"]["fingerprint"] = 1.0
        record["score"] = "max(min / thresholds.min, predicted / thresholds.predicted), rejected above thresholds.fingerprint"
    tau = record["thresholds"]["fingerprint"]
    test_x, test_y = ds.test.x.to(dev), ds.test.y.to(dev)
    test = fingerprint_scores(wrapped, test_x, dx, dy, match=r.match, taus=taus)
    metrics["test_accuracy"] = round(accuracy(wrapped, test_x, test_y), 4)
    if not r.recalibrate:
        training = {"recipe": r.to_json(), "seed": ctx.seed, "init": init, "train_digits": len(train)}
        if arch.get("kind") == "torchscript":
            buf = io.BytesIO()
            torch.jit.save(wrapped.network, buf)
            ctx.writer.add_file("neuralfp_classifier", "neuralfp_classifier.torchscript", buf.getvalue(),
                                format="torchscript", architecture=arch, preprocess="bundle", training=training,
                                metrics=metrics)
        else:  # trained through the bundle's input conversion (the wrapper), as it is served
            ctx.writer.add_module("neuralfp_classifier", wrapped.network, arch, preprocess="bundle", training=training,
                                  metrics=metrics)
        ctx.writer.add_tensors("neuralfp_fingerprints", fp, secret=True,
                               note="the fingerprints (dx, dy): secret, never served")
    ctx.writer.set_defense("neuralfp", {
        "calibration": record,
        "classifier": "neuralfp_classifier",
        "fingerprints": "neuralfp_fingerprints",
        "match": r.match,
        "settings": r.to_json(),
        "metrics": {"test_accuracy": metrics["test_accuracy"],
                    "test_fpr": round(float((test > tau).float().mean()), 6)},
    })


def _existing(ctx: "BuildContext", r: NeuralFPRecipe):  # noqa: F821
    """The bundle's fingerprinted network and fingerprints, for `recalibrate: true`: the
    training settings come from the network's record, the calibration ones from `r`."""
    from models.datasets import calibration_holdout

    ctx.writer.save()
    bundle = ctx.writer.load()
    if not bundle.has("neuralfp_classifier") or not bundle.has("neuralfp_fingerprints"):
        raise ValueError("neuralfp recalibrate: the bundle has no fingerprinted network to recalibrate")
    record = bundle.artifact("neuralfp_classifier")
    trained = dict(record.get("training", {}).get("recipe", {}))
    keep = {"target_fpr", "confidence", "bound", "recalibrate", "match"}
    r = replace(r, **{k: v for k, v in trained.items() if k not in keep and k in asdict(r)})
    wrapped = bundle.classifier(ctx.device, artifact="neuralfp_classifier")
    fp = bundle.tensors("neuralfp_fingerprints", ctx.device)
    train, held = calibration_holdout(ctx.dataset, r.holdout_per_class)
    return (wrapped, fp, dict(record.get("metrics", {})), record.get("architecture"),
            record.get("training", {}).get("init"), train, held, r)
