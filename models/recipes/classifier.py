"""The base classifier recipe: a CNN trained with cross-entropy, optionally with PGD
adversarial training (Madry et al. 2018) or Gaussian noise augmentation (for smoothing).

Presets: `default` reaches >= 97.5% on the mnist5k test split; `quick` trains in seconds
for tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import build_architecture, builtin_spec
from models.datasets import Dataset
from models.recipes.common import accuracy, fit_keep_best, random_affine, seeded


@dataclass(frozen=True)
class ClassifierRecipe:
    architecture: str = "mnist_cnn"
    width: int = 32
    hidden: int = 200
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    noise_sigma: float = 0.0          # Gaussian noise augmentation (randomized smoothing)
    adversarial: str = "none"          # "none" | "pgd" (Madry adversarial training)
    adv_eps: float = 0.3
    adv_steps: int = 7
    adv_step_size: float = 0.1
    adv_mix: float = 0.5               # share of each batch replaced by its adversarial copy

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ClassifierRecipe] = {
    "default": ClassifierRecipe(),
    "quick": ClassifierRecipe(width=8, hidden=64, epochs=4, batch_size=128, lr=3e-3, augment=False),
}


def recipe(preset: str, **overrides: Any) -> ClassifierRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    r = replace(PRESETS[preset], **overrides)
    if r.adversarial not in ("none", "pgd"):  # another spelling trained a plain classifier without a word
        raise ValueError(f"classifier adversarial must be 'none' or 'pgd', got {r.adversarial!r}")
    return r


def architecture_spec(r: ClassifierRecipe, dataset: Dataset) -> dict[str, Any]:
    c, h, _ = dataset.input_shape
    k = len(dataset.class_names)
    if r.architecture == "mnist_cnn":
        return builtin_spec("mnist_cnn", in_channels=c, num_classes=k, image_size=h,
                            width=r.width, hidden=r.hidden)
    return builtin_spec(r.architecture, in_channels=c, num_classes=k, image_size=h)


def train_classifier(dataset: Dataset, r: ClassifierRecipe, seed: int, step: str = "classifier",
                     device: str = "cpu") -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train and return (network, architecture spec, metrics). Keeps the epoch with the best
    validation accuracy."""
    from service.attacks import pgd

    g = seeded(seed, step)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    spec = architecture_spec(r, dataset)
    net = build_architecture(spec).to(device)
    x_train, y_train = dataset.train.x.to(device), dataset.train.y.to(device)
    x_val, y_val = dataset.val.x.to(device), dataset.val.y.to(device)

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if r.augment:
            xb = random_affine(xb, g)
        if r.noise_sigma > 0:
            xb = xb + r.noise_sigma * torch.randn(xb.shape, generator=g).to(device)
        if r.adversarial == "pgd":
            k = int(len(xb) * r.adv_mix)
            net.eval()
            xb = xb.clone()
            xb[:k] = pgd(net, xb[:k], yb[:k], r.adv_eps, steps=r.adv_steps,
                         step_size=r.adv_step_size, generator=g)
            net.train()
        return F.cross_entropy(net(xb), yb)

    def score() -> tuple[float, dict[str, str]]:
        val_x = x_val
        if r.noise_sigma > 0:
            val_x = (x_val + r.noise_sigma * torch.randn(x_val.shape, generator=g).to(device))
        acc = accuracy(net, val_x, y_val)
        return acc, {"val_acc": f"{acc:.4f}"}

    best_acc = fit_keep_best(net, x_train, y_train, epochs=r.epochs, batch_size=r.batch_size, lr=r.lr,
                             weight_decay=r.weight_decay, generator=g, loss=loss, score=score, desc=f"train {step}")
    metrics = {"val_accuracy": round(best_acc, 4),
               "test_accuracy": round(accuracy(net, dataset.test.x.to(device), dataset.test.y.to(device)), 4)}
    return net, spec, metrics


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    """Train the base classifier (plain, or adversarially with options adversarial='pgd')."""
    overrides = {k: v for k, v in ctx.options.get("classifier", {}).items()}
    r = recipe(ctx.preset, **overrides)
    net, spec, metrics = train_classifier(ctx.dataset, r, ctx.seed, device=str(ctx.device))
    # trained on [0, 1] pixels: served without the bundle's input conversion (Bundle.classifier)
    ctx.writer.add_module("classifier", net, spec, preprocess="none", training={"recipe": r.to_json(), "seed": ctx.seed},
                          metrics=metrics)
    ctx.writer.manifest["metrics"]["classifier_test_accuracy"] = metrics["test_accuracy"]
