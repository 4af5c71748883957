"""MagNet (Meng & Chen, CCS 2017): two denoising autoencoders, their detectors, calibration.

Autoencoder I  (structure [3, "average", 3]): reconstruction-error detectors (L1, L2) and
               the reformer.
Autoencoder II (structure [3]):               Jensen-Shannon divergence detectors at T = 10
               and T = 40, between softmax(logits/T) of x and of AE(x), logits from the
               bundle's base classifier.
Both are trained as in the reference (`train_defense.py`): Gaussian input noise std 0.1,
MSE to the clean image, Adam; hidden activations ReLU rather than sigmoid and smaller
batches, which converge within our CPU budget (see MagnetRecipe).

Calibration: `holdout_per_class` training digits per class are kept out of the autoencoders'
training; the thresholds are set jointly on them plus the validation split (1,500 digits by
default) so that the one-sided 95% Clopper-Pearson upper bound of the whole detector set's
false-rejection rate is <= `target_fpr` (service.defenses.calibration.bounded_joint_thresholds).
Reformer: the autoencoder whose clipped reconstructions keep the most validation accuracy
(`reformer: auto`), or the one named.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import MagnetAutoencoder, builtin_spec  # noqa: F401 - the network, defined with the other builtins
from models.recipes.common import batches, progress, seeded
from service.defenses.magnet import (  # noqa: F401 - the scores the service serves, re-exported
    DETECTORS, REFORMER_AE, detector_scores, js_divergence, reconstruction_error,
)


# ---------------------------------------------------------------------- recipe
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train the tiny networks on one CPU thread: their convolutions are too small to gain
    from more, and on a loaded machine the threads' synchronisation costs several times
    the work (measured: 6 ms vs 230 ms per single-image MagNet pass, 2 threads, load 12)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class MagnetRecipe:
    # The reference trains sigmoid-activated AEs for 100 epochs of 50,000 digits at batch 256.
    # On 3,500 digits and a shared CPU, ReLU hidden layers and small batches converge in a
    # fraction of the steps (val MSE 0.003 after 300 steps, where sigmoid is still at 0.096). 20 epochs x 110 steps.
    activation: str = "relu"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 2e-3
    noise: float | str = "auto"   # "auto": by channel count (noise_for), else the training noise's std
    weight_decay: float = 0.0      # the reference's L2 activity regulariser is 1e-9: negligible
    target_fpr: float = 0.01       # the whole detector set, upper confidence bound
    confidence: float = 0.95       # of that bound
    holdout_per_class: int = 100   # training digits kept out of the AEs' training, for calibration
    reformer: str = "auto"         # "auto" (best clean validation accuracy) or an autoencoder name

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, MagnetRecipe] = {
    "default": MagnetRecipe(),
    # 3 epochs: after 1 the AEs' clean reconstruction errors have a long tail, and thresholds
    # bounded at 1% on 1,000 digits sit above a quarter of FGSM 0.3 digits' errors
    "quick": MagnetRecipe(epochs=3, batch_size=32, lr=1e-2, holdout_per_class=50),
}

STRUCTURES: dict[str, list[int | str]] = {"magnet_ae_i": [3, "average", 3], "magnet_ae_ii": [3]}
# Inputs other than MNIST's 28x28x1: no pooling (an 8x8 digit pooled to 4x4 through 3 filters
# loses the strokes: the quick reformer kept 11% of validation accuracy, the unpooled one 87%),
# and 8 filters, so the autoencoder can pass colour and fine detail through (MagNet's CIFAR
# autoencoders do not pool either).
SMALL_STRUCTURES: dict[str, list[int | str]] = {"magnet_ae_i": [8, 8], "magnet_ae_ii": [8]}
# Training noise by channels: the reference's 0.1 for MNIST, 0.025 for CIFAR's RGB.
NOISE_BY_CHANNELS = {1: 0.1, 3: 0.025}


def structures_for(shape: tuple[int, int, int]) -> dict[str, list[int | str]]:
    """The autoencoders' layers for an input shape (C, H, W)."""
    c, h, w = shape
    return STRUCTURES if (c, h, w) == (1, 28, 28) else SMALL_STRUCTURES


def noise_for(r: "MagnetRecipe", shape: tuple[int, int, int]) -> float:
    return float(r.noise) if r.noise != "auto" else NOISE_BY_CHANNELS.get(shape[0], 0.05)


def recipe(preset: str, **overrides: Any) -> MagnetRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def train_autoencoder(x_train: torch.Tensor, x_val: torch.Tensor, spec: dict[str, Any], r: MagnetRecipe,
                      g: torch.Generator, desc: str) -> tuple[nn.Module, dict[str, float]]:
    noise = noise_for(r, tuple(x_train.shape[1:]))
    """Denoising training: noisy input, clean target, MSE. Keeps the best validation epoch."""
    from models.architectures import build_architecture

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    ae = build_architecture(spec).to(x_train.device)
    opt = torch.optim.Adam(ae.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    best, best_state = float("inf"), None
    steps = -(-len(x_train) // r.batch_size)
    bar = progress(r.epochs * steps, desc)
    for epoch in range(r.epochs):
        ae.train()
        for idx in batches(len(x_train), r.batch_size, g):
            xb = x_train[idx]
            noisy = (xb + noise * torch.randn(xb.shape, generator=g).to(xb.device)).clamp(0, 1)
            loss = F.mse_loss(ae(noisy), xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        ae.eval()
        with torch.no_grad():
            val = float(F.mse_loss(ae(x_val), x_val))
        bar.set_postfix(epoch=epoch + 1, val_mse=f"{val:.5f}")
        if val <= best:
            best, best_state = val, copy.deepcopy(ae.state_dict())
    bar.close()
    assert best_state is not None
    ae.load_state_dict(best_state)
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    return ae, {"val_mse": round(best, 6)}


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    """Train both autoencoders, calibrate the four detectors jointly, write the section."""
    with one_thread():
        _build(ctx)


def _build(ctx: "BuildContext") -> None:  # noqa: F821
    from models.datasets import calibration_holdout
    from service.defenses.calibration import bounded_calibration_record, bounded_joint_thresholds, rejection_rate

    r = recipe(ctx.preset, **ctx.options.get("magnet", {}))
    structures = structures_for(ctx.dataset.input_shape)
    if r.reformer not in ("auto", *structures):
        raise ValueError(f"magnet reformer must be 'auto' or one of {sorted(structures)}, got {r.reformer!r}")
    g = seeded(ctx.seed, "magnet")
    ds, dev = ctx.dataset, ctx.device
    c = ds.input_shape[0]
    train, held = calibration_holdout(ds, r.holdout_per_class)
    x_train, x_val = train.x.to(dev), ds.val.x.to(dev)
    aes: dict[str, nn.Module] = {}
    for name, structure in structures.items():
        spec = builtin_spec("magnet_autoencoder", in_channels=c, structure=structure,
                            activation=r.activation)
        ae, metrics = train_autoencoder(x_train, x_val, spec, r, g, f"train {name}")
        ctx.writer.add_module(name, ae, spec, training={"recipe": r.to_json(), "seed": ctx.seed,
                                                        "train_digits": len(x_train)},
                              metrics=metrics)
        aes[name] = ae
    clf = ctx.classifier()
    names = list(DETECTORS)
    x_cal = torch.cat([x_val, held.x.to(dev)])
    scores = detector_scores(x_cal, aes, clf, names)
    thresholds, _, _ = bounded_joint_thresholds(scores, r.target_fpr, r.confidence)
    record = bounded_calibration_record(
        thresholds, r.target_fpr, r.confidence, scores,
        {"validation": len(x_val), "train_holdout": len(held)},
        val_scores={n: s[:len(x_val)] for n, s in scores.items()})
    with torch.no_grad():
        y_val = ds.val.y.to(dev)
        reformed_val = {n: round(float((clf(ae(x_val).clamp(0, 1)).argmax(1) == y_val).float().mean()), 4)
                        for n, ae in aes.items()}
    reformer = (max(structures, key=lambda n: (reformed_val[n], n == REFORMER_AE)) if r.reformer == "auto"
                else r.reformer)
    with torch.no_grad():
        reformed_acc = float((clf(aes[reformer](ds.test.x.to(dev)).clamp(0, 1)).argmax(1)
                              == ds.test.y.to(dev)).float().mean())
    test_scores = detector_scores(ds.test.x.to(dev), aes, clf, names)
    ctx.writer.set_defense("magnet", {
        "calibration": record,
        # the divergence detectors read the classifier: their joint thresholds hold for this one
        "classifier_sha256": ctx.writer.manifest["artifacts"]["classifier"]["sha256"],
        "detectors": DETECTORS,
        "reformer": {"autoencoder": reformer, "clip": [0.0, 1.0], "chosen_by": r.reformer,
                     "reformed_val_accuracy": reformed_val},
        "settings": r.to_json(),
        "metrics": {"test_fpr": round(rejection_rate(test_scores, thresholds), 6),
                    "reformed_test_accuracy": round(reformed_acc, 4)},
    })
