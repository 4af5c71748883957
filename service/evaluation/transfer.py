"""Transfer attacks: adversarials crafted on an ensemble of independently trained surrogates.

The oblivious section attacks the bundle's own classifier, which is not what an attacker
without the weights can do. Here the attacker trains surrogates of their own on the same
kind of data (the bundle's training split: never test) and crafts adversarials on the
average of their logits (Liu et al. 2017; Dong et al. 2018's logit ensemble) with the two
standard tricks that make such adversarials transfer:

- MI-FGSM (Dong et al., CVPR 2018): iterative FGSM whose step follows a momentum of the
  L1-normalised gradients, so the direction stabilises instead of overfitting the surrogates;
- input diversity (Xie et al., CVPR 2019, DI-FGSM): with probability p per step the gradient
  is taken through a random resize-and-pad of the image, so the perturbation does not depend
  on the exact pixel grid of the surrogates.

Surrogates are cached as safetensors (with a sidecar JSON holding their sha256, checked before
loading) in the evaluation's out dir, keyed by bundle version, dataset, seed and architecture,
so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import build_architecture, builtin_spec
from models.datasets import Dataset
from service.evaluation.autoattack import project

log = logging.getLogger("shieldserve.evaluate")

Model = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- surrogates
@dataclass(frozen=True)
class SurrogateRecipe:
    """One surrogate: a builtin architecture (sized here, shaped by the dataset) and its training."""

    architecture: str = "mnist_cnn"
    kwargs: tuple[tuple[str, int], ...] = ()   # width / hidden; hashable so the recipe can key the cache
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3

    def spec(self, dataset: Dataset) -> dict[str, Any]:
        c, h, _ = dataset.input_shape
        return builtin_spec(self.architecture, in_channels=c, num_classes=len(dataset.class_names),
                            image_size=h, **dict(self.kwargs))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["kwargs"] = dict(self.kwargs)
        return d


# Different architectures as well as different seeds: an ensemble of near-copies would share
# its blind spots and transfer less (Liu et al. 2017). Sized to train in seconds on one thread.
DEFAULT_SURROGATES: tuple[SurrogateRecipe, ...] = (
    SurrogateRecipe("mnist_cnn", (("width", 16), ("hidden", 128)), epochs=8),
    SurrogateRecipe("tiny_cnn", (("width", 32),), epochs=10),
    SurrogateRecipe("mnist_cnn", (("width", 24), ("hidden", 64)), epochs=6),
)


@dataclass
class Surrogate:
    net: nn.Module
    recipe: SurrogateRecipe
    seed: int
    test_accuracy: float
    val_accuracy: float
    train_seconds: float
    cached: bool

    def to_json(self) -> dict[str, Any]:
        return {"architecture": self.recipe.architecture, **dict(self.recipe.kwargs), "seed": self.seed,
                "epochs": self.recipe.epochs, "test_accuracy": round(self.test_accuracy, 4),
                "val_accuracy": round(self.val_accuracy, 4), "train_seconds": round(self.train_seconds, 1),
                "cached": self.cached}


def surrogate_recipes(k: int) -> list[SurrogateRecipe]:
    """K recipes: the default three architectures, cycled (each copy gets its own seed)."""
    return [DEFAULT_SURROGATES[i % len(DEFAULT_SURROGATES)] for i in range(k)]


def train_surrogate(dataset: Dataset, recipe: SurrogateRecipe, seed: int) -> tuple[nn.Module, float]:
    """Train on the training split only (validation picks the best epoch); returns the net and
    its validation accuracy."""
    from models.recipes.common import accuracy, fit_keep_best, seeded

    g = seeded(seed, f"transfer_surrogate_{recipe.architecture}")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))  # the weights' init
    net = build_architecture(recipe.spec(dataset))
    x, y = dataset.train.x, dataset.train.y

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(xb), yb)

    def score() -> tuple[float, dict[str, str]]:
        acc = accuracy(net, dataset.val.x, dataset.val.y)
        return acc, {"val_acc": f"{acc:.4f}"}

    best = fit_keep_best(net, x, y, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                         generator=g, loss=loss, score=score,
                         desc=f"surrogate {recipe.architecture} seed {seed}")
    return net, float(best)


def _cache_key(bundle_version: str, dataset: Dataset, recipe: SurrogateRecipe, seed: int) -> str:
    blob = json.dumps({"bundle": bundle_version, "dataset": dataset.name, "shape": list(dataset.input_shape),
                       "classes": len(dataset.class_names), "recipe": recipe.to_json(), "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_train_surrogates(dataset: Dataset, bundle_version: str, cache_dir: Path, *, k: int = 3,
                             seed: int = 0, recipes: Sequence[SurrogateRecipe] | None = None) -> list[Surrogate]:
    """K surrogates, from the cache when an entry with the same key and an intact sha256 is
    there, else trained now and cached."""
    from safetensors.torch import load as load_safetensors
    from safetensors.torch import save_file

    from models.recipes.common import accuracy

    recipes = list(recipes) if recipes is not None else surrogate_recipes(k)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out: list[Surrogate] = []
    for i, recipe in enumerate(recipes):
        s = seed * 1000 + i  # independent surrogates: each its own seed, even with the same architecture
        key = _cache_key(bundle_version, dataset, recipe, s)
        weights = cache_dir / f"surrogate_{i}_{recipe.architecture}_{key}.safetensors"
        meta_path = weights.with_suffix(".json")
        net = None
        if weights.exists() and meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except ValueError:
                meta = {}
            data = weights.read_bytes()
            if hashlib.sha256(data).hexdigest() == meta.get("sha256"):
                net = build_architecture(recipe.spec(dataset))  # the spec comes from code, not the file
                net.load_state_dict(load_safetensors(data))  # the very bytes whose sha256 was checked
                net.eval()
                val, secs, cached = float(meta["val_accuracy"]), float(meta["train_seconds"]), True
            else:
                log.warning("surrogate cache %s: sha256 mismatch, training it again", weights.name)
        if net is None:
            t = time.perf_counter()
            net, val = train_surrogate(dataset, recipe, s)
            secs, cached = time.perf_counter() - t, False
            tmp = weights.with_suffix(".tmp")
            save_file({n: p.detach().contiguous() for n, p in net.state_dict().items()}, str(tmp))
            tmp.replace(weights)
            meta_path.write_text(json.dumps({"sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
                                             "recipe": recipe.to_json(), "seed": s, "bundle": bundle_version,
                                             "dataset": dataset.name, "val_accuracy": val,
                                             "train_seconds": secs}, indent=2) + "\n")
        for p in net.parameters():
            p.requires_grad_(False)
        test_acc = accuracy(net, dataset.test.x, dataset.test.y)  # reported, never used to train
        out.append(Surrogate(net, recipe, s, test_acc, val, secs, cached))
        log.info("surrogate %d (%s, seed %d): test accuracy %.4f%s", i, recipe.architecture, s, test_acc,
                 " (cached)" if cached else f", trained in {secs:.0f}s")
    return out


class LogitEnsemble(nn.Module):
    """The average of the surrogates' logits: the ensemble the attack differentiates."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([n(x) for n in self.nets]).mean(0)


# ---------------------------------------------------------------------- the attack
def input_diversity(x: torch.Tensor, p: float, generator: torch.Generator, max_change: int | None = None) -> torch.Tensor:
    """DI (Xie et al. 2019): with probability p, resize the batch to a random side r != H within
    H +- max_change (nearest neighbour, as in the paper), then zero-pad at a random offset back to
    H x W when smaller, or crop at a random offset when larger. Otherwise x unchanged. Keeps the
    shape, so surrogates of any fixed input size take it."""
    if p <= 0 or float(torch.rand((), generator=generator)) >= p:
        return x
    _, _, h, w = x.shape
    d = max_change if max_change is not None else max(1, h // 7)  # 28 -> r in [24, 32] without 28
    sides = [r for r in range(h - d, h + d + 1) if r != h and r > 0]
    r = sides[int(torch.randint(len(sides), (), generator=generator))]
    rw = max(1, round(w * r / h))  # the same scale on both sides (rw <= w exactly when r < h)
    z = F.interpolate(x, size=(r, rw), mode="nearest")
    if r < h:
        top = int(torch.randint(h - r + 1, (), generator=generator))
        left = int(torch.randint(w - rw + 1, (), generator=generator))
        return F.pad(z, (left, w - rw - left, top, h - r - top))
    top = int(torch.randint(r - h + 1, (), generator=generator))
    left = int(torch.randint(rw - w + 1, (), generator=generator))
    return z[..., top:top + h, left:left + w]


def mi_fgsm(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf", steps: int = 10,
            decay: float = 1.0, diversity: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """MI-FGSM with input diversity (M-DI2-FGSM), untargeted, in the eps ball and [0, 1].

    Step size eps / steps (so the last step can just reach the ball's edge, as in the paper);
    the momentum accumulates the gradient divided by its per-image L1 norm; the step follows the
    sign of the momentum (L-inf) or the momentum divided by its L2 norm (L2)."""
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be linf or l2, got {norm!r}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    view = (-1, *([1] * (x.dim() - 1)))
    alpha = eps / steps
    momentum = torch.zeros_like(x)
    adv = x.clone().detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(input_diversity(adv, diversity, g)), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, adv)
        momentum = decay * momentum + grad / grad.abs().flatten(1).sum(1).clamp_min(1e-12).view(view)
        with torch.no_grad():
            step = momentum.sign() if norm == "linf" else \
                momentum / momentum.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
            adv = project(x, adv + alpha * step, eps, norm).detach()
    return adv


def transfer_attack(model: Model, x: torch.Tensor, y: torch.Tensor, eps: float, *, norm: str = "linf",
                    steps: int = 10, decay: float = 1.0, diversity: float = 0.5, batch_size: int = 100,
                    seed: int = 0, bar: Any = None) -> torch.Tensor:
    """mi_fgsm over x in batches, one seeded generator for the whole run (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(x), batch_size):
        out.append(mi_fgsm(model, x[i:i + batch_size], y[i:i + batch_size], eps, norm=norm, steps=steps,
                           decay=decay, diversity=diversity, generator=g))
        if bar is not None:
            bar.update(len(out[-1]))
    return torch.cat(out) if out else x.clone()
