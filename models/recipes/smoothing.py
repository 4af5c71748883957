"""Randomized smoothing's artifacts: base classifiers trained under Gaussian noise, and a
Gaussian denoiser for denoised smoothing.

* `smoothing_sigma25`, `smoothing_sigma50`: classifiers for sigma 0.25 / 0.5 (Cohen et al.
  2019), trained by `train_noise_classifier`: Gaussian noise augmentation on randomly shifted
  (up to 2 px), rotated and scaled digits, plus consistency regularisation (Jeong & Shin 2020)
  over two noisy copies of each digit, optionally on SmoothAdv's adversarial digits (Salman et
  al. 2019: L2 PGD against the smoothed classifier; `adversarial_eps`, off by default). They
  are a strided CNN (`smoothing_cnn`, 5 MFLOP at the default width 32), not the base CNN
  (38 MFLOP): certification needs 10^4-10^5 forward passes per image.
* `smoothing_denoiser_sigma25`, `..._sigma50`: a small DnCNN (residual conv net) trained
  in front of the *plain* base classifier with MSE, then MSE + the stability objective (Salman
  et al. 2020): ||D(x+d) - x||^2 + lambda * CE(f(D(x+d)), f(x)). The classifier stays frozen
  and unchanged; the pair D then f is what denoised smoothing certifies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.architectures import (  # noqa: F401 - the networks, defined with the other builtins
    DnCNN, SmoothingCNN, SmoothingMLP, build_architecture, builtin_spec,
)
from models.recipes.common import accuracy, batches, fit_keep_best, progress, random_affine, seeded

SIGMAS = (0.25, 0.5)


def sigma_tag(sigma: float) -> str:
    """0.25 -> "sigma25", 0.5 -> "sigma50": artifact names carry the noise level."""
    return f"sigma{int(round(sigma * 100)):02d}"


@dataclass(frozen=True)
class SmoothingRecipe:
    architecture: str = "smoothing_cnn"
    # smoothing_cnn's channels (twice as many in its second convolution) and dense width. Width
    # 16 samples ~2.7x faster (1.7 MFLOP) but certified 1.6 points less on the test digits at
    # sigma 0.5, so 32 stays (docs/defenses/smoothing.md, "A narrower network")
    width: int = 32
    hidden: int = 256
    sigmas: tuple[float, ...] = SIGMAS
    # 300, not 40: the 40-epoch networks were still improving when the one-cycle schedule
    # ended, and an epoch of this small net is cheap (docs/defenses/smoothing.md, "Longer training")
    epochs: int = 300
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    augment: bool = True
    max_shift: float = 2.0             # augmentation: shifts up to this many pixels, small rotations/scalings
    max_degrees: float = 10.0
    max_scale: float = 0.1
    # Consistency regularisation (Jeong & Shin 2020): `noise_copies` noisy copies of each digit,
    # loss = mean CE + consistency_weight * KL(mean prediction || each copy's) + entropy_weight * H(mean)
    noise_copies: int = 2
    consistency_weight: float = 10.0
    entropy_weight: float = 0.5
    # SmoothAdv (Salman et al. 2019): train on x' within L2 adversarial_eps of each digit that
    # maximises the cross-entropy of the smoothed soft classifier (the mean softmax over the
    # noise_copies noisy copies, whose noise is then trained on too), found by
    # adversarial_steps of L2 PGD; the radius ramps up linearly over adversarial_warmup epochs
    adversarial_eps: float = 0.0       # 0: off (noise augmentation + consistency only)
    adversarial_steps: int = 1
    adversarial_warmup: int = 10
    denoiser_width: int = 16
    denoiser_depth: int = 5
    denoiser_epochs: int = 10
    denoiser_mse_epochs: int = 2       # MSE alone first, then MSE + stability
    denoiser_batch_size: int = 64
    denoiser_lr: float = 1e-3
    stability_weight: float = 1.0
    denoiser_max_train: int = 0        # 0: every training digit
    denoiser: bool = True
    classifiers: bool = True           # False: keep the bundle's noise-trained classifiers, (re)train denoisers only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, SmoothingRecipe] = {
    "default": SmoothingRecipe(),
    "quick": SmoothingRecipe(architecture="smoothing_mlp_small", epochs=2, batch_size=128, lr=3e-3,
                             augment=False, noise_copies=1, denoiser_width=8, denoiser_depth=3, denoiser_epochs=1,
                             denoiser_mse_epochs=1, denoiser_batch_size=128, denoiser_lr=3e-3,
                             denoiser_max_train=1000),
}


def recipe(preset: str, **overrides: Any) -> SmoothingRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return replace(PRESETS[preset], **overrides)


def smoothadv_attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, eps: float,
                     steps: int) -> torch.Tensor:
    """SmoothAdv's attack (Salman et al., NeurIPS 2019): the x' in [0, 1] within L2 `eps` of x
    that maximises -log of the smoothed soft classifier's probability of y, that classifier
    estimated by the mean softmax over x' + noise_i (noise: m copies per digit, (m * B, ...),
    copy i of digit j at row i * B + j, fixed over the steps), by `steps` of normalised-gradient
    L2 PGD of 2 eps / steps, each followed by the projection onto the ball. Gradients reach
    only the perturbation, never the weights; dropout is off while attacking."""
    if eps <= 0 or steps < 1:
        return x
    was_training = net.training
    net.eval()
    b = x.shape[0]
    m = noise.shape[0] // b
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        xa = (x + delta).clamp(0.0, 1.0)
        probs = F.softmax(net(xa.repeat(m, 1, 1, 1) + noise), 1).view(m, b, -1).mean(0)
        loss = F.nll_loss(probs.clamp_min(1e-12).log(), y)
        (grad,) = torch.autograd.grad(loss, delta)
        norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
        moved = delta.detach() + (2.0 * eps / steps) * grad / norm
        length = moved.flatten(1).norm(dim=1).clamp_min(1e-12).view_as(norm)
        delta = (moved * (eps / length).clamp(max=1.0)).requires_grad_(True)
    net.train(was_training)
    return (x + delta.detach()).clamp(0.0, 1.0)


def train_noise_classifier(dataset, r: SmoothingRecipe, sigma: float, seed: int, step: str,
                           device: str = "cpu") -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A classifier for randomized smoothing at `sigma`: Gaussian noise augmentation plus
    consistency regularisation (Jeong & Shin, NeurIPS 2020) on `noise_copies` noisy copies of
    each (randomly shifted/rotated) digit, with `adversarial_eps` > 0 on SmoothAdv's adversarial
    digits (`smoothadv_attack`). Keeps the epoch with the best noisy validation accuracy (4 noise
    draws)."""
    g = seeded(seed, step)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    c, h, _ = dataset.input_shape
    k = len(dataset.class_names)
    shape = {"width": r.width, "hidden": r.hidden} if r.architecture == "smoothing_cnn" else {}
    spec = builtin_spec(r.architecture, in_channels=c, num_classes=k, image_size=h, **shape)
    net = build_architecture(spec).to(device)
    x_train, y_train = dataset.train.x.to(device), dataset.train.y.to(device)
    x_val, y_val = dataset.val.x.to(device), dataset.val.y.to(device)
    val_noise = [sigma * torch.randn(x_val.shape, generator=g).to(device) for _ in range(4)]
    m = max(1, r.noise_copies)
    steps_per_epoch = -(-len(x_train) // r.batch_size)
    batches_seen = 0

    def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        nonlocal batches_seen
        if r.augment:
            xb = random_affine(xb, g, max_shift=r.max_shift, max_degrees=r.max_degrees,
                               max_scale=r.max_scale)
        noise = sigma * torch.randn((m * len(xb), *xb.shape[1:]), generator=g).to(device)
        if r.adversarial_eps > 0:
            ramp = min(1.0, (batches_seen // steps_per_epoch + 1) / max(1, r.adversarial_warmup))
            xb = smoothadv_attack(net, xb, yb, noise, r.adversarial_eps * ramp, r.adversarial_steps)
        batches_seen += 1
        logits = net(xb.repeat(m, 1, 1, 1) + noise)
        value = F.cross_entropy(logits, yb.repeat(m))
        if m > 1 and (r.consistency_weight > 0 or r.entropy_weight > 0):
            logp = F.log_softmax(logits, 1).view(m, len(xb), -1)
            avg = logp.exp().mean(0)
            log_avg = avg.clamp_min(1e-12).log()
            kl = (avg.unsqueeze(0) * (log_avg.unsqueeze(0) - logp)).sum(2).mean()
            entropy = -(avg * log_avg).sum(1).mean()
            value = value + r.consistency_weight * kl + r.entropy_weight * entropy
        return value

    def score() -> tuple[float, dict[str, str]]:
        acc = sum(accuracy(net, x_val + z, y_val) for z in val_noise) / len(val_noise)
        return acc, {"noisy_val_acc": f"{acc:.4f}"}

    best_acc = fit_keep_best(net, x_train, y_train, epochs=r.epochs, batch_size=r.batch_size, lr=r.lr,
                             weight_decay=r.weight_decay, generator=g, loss=loss, score=score, desc=f"train {step}")
    noisy_test = dataset.test.x.to(device) + sigma * torch.randn(dataset.test.x.shape, generator=g).to(device)
    metrics = {"noisy_val_accuracy": round(best_acc, 4),
               "noisy_test_accuracy": round(accuracy(net, noisy_test, dataset.test.y.to(device)), 4),
               "test_accuracy": round(accuracy(net, dataset.test.x.to(device), dataset.test.y.to(device)), 4)}
    return net.cpu(), spec, metrics


def train_denoiser(dataset, classifier: nn.Module, sigma: float, r: SmoothingRecipe, seed: int,
                   step: str) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """DnCNN with MSE, then MSE + stability against the frozen classifier's clean labels."""
    g = seeded(seed, step)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    c = dataset.input_shape[0]
    spec = builtin_spec("dncnn", in_channels=c, width=r.denoiser_width, depth=r.denoiser_depth)
    net = DnCNN(in_channels=c, width=r.denoiser_width, depth=r.denoiser_depth)
    opt = torch.optim.Adam(net.parameters(), lr=r.denoiser_lr)
    x_train = dataset.train.x[:r.denoiser_max_train or None]
    classifier.eval()
    for p in classifier.parameters():  # frozen: gradients flow to the denoiser only
        p.requires_grad_(False)
    with torch.no_grad():
        targets = torch.cat([classifier(x_train[i:i + 500]).argmax(1) for i in range(0, len(x_train), 500)])
    steps = r.denoiser_epochs * -(-len(x_train) // r.denoiser_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    bar = progress(steps, f"train {step}")
    for epoch in range(r.denoiser_epochs):
        net.train()
        stability = epoch >= r.denoiser_mse_epochs
        for idx in batches(len(x_train), r.denoiser_batch_size, g):
            xb = x_train[idx]
            noisy = xb + sigma * torch.randn(xb.shape, generator=g)
            out = net(noisy)
            loss = F.mse_loss(out, xb, reduction="sum") / len(xb)
            if stability:
                loss = loss + r.stability_weight * F.cross_entropy(classifier(out), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    net.eval()
    metrics = _denoised_accuracy(net, classifier, dataset, sigma, g)
    return net, spec, metrics


@torch.no_grad()
def _denoised_accuracy(denoiser: nn.Module, classifier: nn.Module, dataset, sigma: float,
                       g: torch.Generator) -> dict[str, Any]:
    """Accuracy of f(D(x + noise)) and of f(x + noise) on one noise draw of the test split."""
    x, y = dataset.test.x, dataset.test.y
    noisy = x + sigma * torch.randn(x.shape, generator=g)
    hit_d = hit_n = 0
    for i in range(0, len(x), 500):
        hit_d += int((classifier(denoiser(noisy[i:i + 500])).argmax(1) == y[i:i + 500]).sum())
        hit_n += int((classifier(noisy[i:i + 500]).argmax(1) == y[i:i + 500]).sum())
    return {"noisy_test_accuracy_denoised": round(hit_d / len(x), 4),
            "noisy_test_accuracy_without_denoiser": round(hit_n / len(x), 4)}


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    """Noise-trained classifiers at each sigma, a denoiser per sigma, and the manifest section."""
    r = recipe(ctx.preset, **ctx.options.get("smoothing", {}))
    prev = ctx.writer.manifest.get("defenses", {}).get("smoothing", {})
    # Artifacts for sigmas (or parts) this run does not rebuild stay as the bundle had them.
    section: dict[str, Any] = {"recipe": r.to_json(), "denoisers": dict(prev.get("denoisers", {})),
                               "classifiers": dict(prev.get("classifiers", {}))}
    for sigma in (r.sigmas if r.classifiers else ()):
        name = f"smoothing_{sigma_tag(sigma)}"
        net, spec, metrics = train_noise_classifier(ctx.dataset, r, sigma, ctx.seed, name, str(ctx.device))
        ctx.writer.add_module(name, net, spec, preprocess="none",  # trained on noisy [0, 1] pixels
                              training={"recipe": r.to_json(), "seed": ctx.seed, "sigma": sigma},
                              metrics=metrics)
        section["classifiers"][str(sigma)] = {"artifact": name, "metrics": metrics}
    if r.denoiser:
        base = ctx.classifier().cpu()
        for sigma in r.sigmas:
            name = f"smoothing_denoiser_{sigma_tag(sigma)}"
            den, spec, metrics = train_denoiser(ctx.dataset, base, sigma, r, ctx.seed, name)
            ctx.writer.add_module(name, den, spec, training={"recipe": r.to_json(), "seed": ctx.seed,
                                                             "sigma": sigma, "classifier": "classifier"},
                                  metrics=metrics)
            section["denoisers"][str(sigma)] = {"artifact": name, "metrics": metrics}
    section["sigmas"] = sorted({float(k) for k in section["classifiers"]} | {float(k) for k in section["denoisers"]}
                               | set(map(float, r.sigmas)))
    ctx.writer.set_defense("smoothing", section)
