"""The attacks: ART's PGD, APGD, Carlini-Wagner L2, Square and HopSkipJump on torch modules,
and a GMSA-style attack on RMC written here.

Every white-box attack takes a model mapping [0, 1] pixels to logits (B, K) or, for the
detector-aware models, (B, K + 1) with the last output meaning "rejected"; with K + 1 outputs
the attack is targeted at the clean runner-up class (which must then also beat "rejected").
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.attacks.cw import cw_l2
from service.attacks.gradient import pgd as torch_pgd

logging.getLogger("art").setLevel(logging.WARNING)


@dataclass(frozen=True)
class Budget:
    """Attack budgets; the defaults are CPU-sized."""

    pgd_steps: int = 40
    apgd_steps: int = 40
    cw_steps: int = 50                # optimiser steps per binary-search step
    cw_binary_steps: int = 3
    cw_lr: float = 0.1
    cw_const: float = 10.0            # initial trade-off constant c (then binary search per image)
    eot_draws: int = 8
    eot_steps: int = 20               # PGD steps for EOT (each step costs `eot_draws` forwards)
    bpda_steps: int = 20              # PGD steps through Defense-GAN's projection (each = one projection)
    gmsa_rounds: int = 2              # GMSA: attack/adapt rounds against RMC
    gmsa_steps: int = 20
    square_queries: int = 300         # per image
    hsj_queries: int = 300            # per image
    transfer_steps: int = 10          # MI-FGSM iterations on the surrogate ensemble (step eps / steps)
    transfer_decay: float = 1.0       # MI-FGSM momentum decay mu (Dong et al. 2018)
    transfer_diversity: float = 0.5   # input-diversity probability p per step (Xie et al. 2019)
    linf_eps: float = 0.3
    l2_eps: tuple[float, ...] = (0.5, 1.0, 2.0)
    linf_sweep: tuple[float, ...] = (0.1, 0.2, 0.3)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def progress_enabled() -> bool:
    return os.environ.get("SHIELDSERVE_PROGRESS", "1") != "0"


def art_classifier(model: nn.Module | Any, nb_classes: int, input_shape: tuple[int, ...] = (1, 28, 28)):
    from art.estimators.classification import PyTorchClassifier

    if not isinstance(model, nn.Module):
        model = _Wrap(model)
    model.eval()
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=input_shape,
                             nb_classes=nb_classes, clip_values=(0.0, 1.0), device_type="cpu")


class _Wrap(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _targets(model: Any, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The clean runner-up class (not y) of the model's class logits: the detector-aware
    attacks aim there."""
    with torch.no_grad():
        z = torch.cat([model(x[i:i + 200])[:, :num_classes] for i in range(0, len(x), 200)])
    z = z.masked_fill(F.one_hot(y, num_classes).bool(), -math.inf)
    return z.argmax(1)


def _labels(model: Any, x: torch.Tensor, y: torch.Tensor, num_classes: int, outputs: int) -> tuple[np.ndarray, bool]:
    """ART labels: y (untargeted) or the runner-up target (K + 1 outputs: targeted)."""
    if outputs == num_classes:
        return y.numpy(), False
    return _targets(model, x, y, num_classes).numpy(), True


def art_attack(kind: str, model: Any, x: torch.Tensor, y: torch.Tensor, *, eps: float | None = None,
               norm: str = "linf", budget: Budget = Budget(), num_classes: int | None = None,
               steps: int | None = None, batch_size: int = 100, seed: int = 0) -> torch.Tensor:
    """Run one ART white-box attack; returns the adversarial batch (same shape as x).
    `num_classes`: the dataset's classes (default: the model's outputs, less the "rejected"
    one of a detector-aware model). On a model with that extra output the attack is targeted
    at a real class: untargeted, it could reach its goal by raising "rejected", the very
    answer the defense wants."""
    from art.attacks.evasion import (AutoProjectedGradientDescent, CarliniL2Method,
                                     ProjectedGradientDescent)

    np.random.seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        outputs = int(model(x[:1]).shape[1])
    if num_classes is None:
        num_classes = outputs - int(bool(getattr(model, "rejects", False)))
    if kind == "cw":  # ART's CarliniL2Method is kind "cw_art"
        return torch.cat([cw_l2(model, x[i:i + batch_size], y[i:i + batch_size], num_classes=num_classes,
                                binary_steps=budget.cw_binary_steps, steps=steps or budget.cw_steps, lr=budget.cw_lr,
                                initial_const=budget.cw_const)
                          for i in range(0, len(x), batch_size)])
    clf = art_classifier(model, outputs, tuple(x.shape[1:]))
    labels, targeted = _labels(model, x, y, num_classes, outputs)
    verbose = progress_enabled()
    art_norm = np.inf if norm == "linf" else 2
    if kind == "pgd":
        n = steps or budget.pgd_steps
        step = 2.5 * float(eps) / n  # Madry et al.'s rule of thumb
        atk = ProjectedGradientDescent(clf, norm=art_norm, eps=eps, eps_step=step, max_iter=n, targeted=targeted,
                                       num_random_init=0, batch_size=batch_size, verbose=verbose)
    elif kind == "apgd":
        atk = AutoProjectedGradientDescent(clf, norm=art_norm, eps=eps, eps_step=2 * float(eps) / 10,
                                           max_iter=steps or budget.apgd_steps, targeted=targeted, nb_random_init=1,
                                           batch_size=batch_size, loss_type="cross_entropy", verbose=verbose)
    elif kind == "cw_art":
        atk = CarliniL2Method(clf, confidence=0.0, targeted=targeted, learning_rate=budget.cw_lr,
                              binary_search_steps=budget.cw_binary_steps, max_iter=steps or budget.cw_steps,
                              initial_const=1.0, batch_size=batch_size, verbose=verbose)
    else:
        raise ValueError(f"unknown white-box attack {kind!r}")
    adv = atk.generate(x=x.numpy().astype(np.float32), y=labels)
    return torch.from_numpy(np.asarray(adv, dtype=np.float32)).clamp(0, 1)


# ---------------------------------------------------------------------- GMSA against RMC
def gmsa_rmc(rmc: Any, x: torch.Tensor, y: torch.Tensor, *, eps: float, budget: Budget = Budget(),
             chunk: int = 25, seed: int = 0, bar: Any = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """GMSA-AVG (Chen et al. 2022) against RMC's isolated per-image adaptation, kept cheap.

    Round 0 attacks the bundle's classifier (PGD, L-inf). Each round then lets RMC adapt to
    the current adversarial digit exactly as the service would (same neighbours, same
    fine-tuning: isolated mode is deterministic) and adds that adapted model to the digit's
    ensemble; the next round's PGD attacks the average logits of the ensemble. Per digit the
    first round's adversarial that fools its own adapted model is kept, else the last one.
    """
    g = torch.Generator().manual_seed(seed)
    ft = rmc.finetuner
    out = x.clone()
    fooled_at = torch.full((len(x),), -1, dtype=torch.long)
    for i in range(0, len(x), chunk):
        xb, yb = x[i:i + chunk], y[i:i + chunk]
        params_list: list[dict[str, torch.Tensor]] = []
        best = xb.clone()
        done = torch.zeros(len(xb), dtype=torch.bool)

        def ensemble(z: torch.Tensor) -> torch.Tensor:
            logits = [rmc.classifier(z)]
            if params_list:
                feats = ft._frozen(z).unsqueeze(1)
                for p in params_list:
                    logits.append(torch.vmap(ft._logits)(p, feats).squeeze(1))
            return torch.stack(logits).mean(0)

        adv = xb
        for r in range(budget.gmsa_rounds + 1):
            adv = torch_pgd(ensemble, xb, yb, eps, steps=budget.gmsa_steps, generator=g)
            ids, _ = rmc.neighbours(adv)
            nbr_x = rmc.images[ids].float() / 255.0
            logits, params, _ = ft.run(adv, nbr_x, rmc.labels[ids], rmc.settings)
            fooled = logits.argmax(1) != yb
            take = fooled & ~done
            best[take] = adv[take]
            fooled_at[i:i + chunk][take] = r
            done |= fooled
            params_list.append({n: p.detach() for n, p in params.items()})
        best[~done] = adv[~done]
        out[i:i + chunk] = best
        if bar is not None:
            bar.update(len(xb))
    rounds = {f"fooled_at_round_{r}": int((fooled_at == r).sum()) for r in range(budget.gmsa_rounds + 1)}
    return out, rounds


# ---------------------------------------------------------------------- own PGD (for GMSA, tests)
def pgd(model: Any, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20, norm: str = "linf",
        seed: int = 0) -> torch.Tensor:
    return torch_pgd(model, x, y, eps, steps=steps, norm=norm, generator=torch.Generator().manual_seed(seed))


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t
