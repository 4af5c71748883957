"""The adversarially trained classifier (`robust_classifier`, served by the `robust` pipeline).

Three recipes, chosen with `method`:
  trades   Zhang et al. 2019: CE(f(x), y) + beta * KL(f(x) || f(x')), x' maximising the KL
           (the default: beta 6, 10 steps of 0.045, 30 epochs; on the 3,500 mnist5k digits it
           holds better under AutoAttack than `pgd` at 3 steps, see docs/defenses/robust.md).
  pgd      Madry et al. 2018: minimise the cross-entropy at a PGD adversarial of each digit
           (3 steps of 0.15 from a uniform random start in the eps ball).
  fgsm_rs  Wong, Rice & Kolter 2020 ("fast is better than free"): one FGSM step of size
           1.25 eps from a uniform random start, so ~2 forward/backward passes per digit
           instead of PGD-7's 8: the one that fits a shared 2-core CPU.

The inner maximisation of `pgd` and `fgsm_rs` is the served `service.attacks.pgd` (one step
with a random start is FGSM-RS). Digits are augmented with small shifts, rotations and
scalings, never flips (a flipped 2 is not a 2). The training eps ramps up linearly over the
first `eps_warmup_epochs` (small-data adversarial training otherwise stalls at chance).

After every epoch: clean accuracy on the validation split and PGD accuracy (L-inf eps,
`val_pgd_steps` steps) on a fixed stratified batch of it. The epoch with the best PGD
accuracy is kept (early stopping, Rice et al. 2020). Catastrophic overfitting (FGSM training
suddenly stops resisting PGD, Wong et al. 2020 sec. 5) shows as that PGD accuracy falling
`collapse_drop` below its best: training stops and the best epoch's weights are restored.
With `ema_decay` > 0 an exponential moving average of the weights is what gets validated and
kept (the training itself is unchanged).

Checkpoints: one safetensors file per epoch (weights, optimiser moments, best weights, random
states; loop state as JSON in the file's metadata, never pickle) in a work directory outside
the bundle (options {"robust": {"work_dir": DIR}}, or $SHIELDSERVE_WORK_DIR, or a per-user
`<tmp>/shieldserve-work-<uid>`, mode 0700), keyed by dataset (with the sha256 of its train
and validation images and labels, also recorded in the checkpoint and checked on load),
preset, seed and recipe. A build that finds one resumes
from it, and lands on the same weights as an uninterrupted run on the same machine. One that
cannot be resumed (truncated, trained on other data, not ours) stops the build with a
CheckpointError naming the file: delete it, or train in another work directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from models.architectures import build_architecture, builtin_spec
from models.datasets import Dataset
from models.recipes.common import (
    CheckpointError, accuracy, batches, checkpoint_error, dataset_sha256, progress, random_affine, seeded, work_root,
)

STEP = "robust"
ARTIFACT = "robust_classifier"
METHODS = ("pgd", "trades", "fgsm_rs")


@dataclass(frozen=True)
class RobustRecipe:
    method: str = "trades"
    width: int = 32
    hidden: int = 200
    epochs: int = 30
    batch_size: int = 50
    lr: float = 2e-3                  # Adam, one cycle: linear up over 40% of the steps, then down to 0
    weight_decay: float = 0.0
    eps: float = 0.3                  # L-inf, on [0, 1] pixels
    eps_warmup_epochs: int = 3
    fgsm_alpha: float = 0.375         # fgsm_rs step (Wong et al.: 1.25 eps)
    pgd_steps: int = 10               # inner maximisation of trades and pgd (the earlier pgd default: 3 x 0.15)
    pgd_step_size: float = 0.045
    trades_beta: float = 6.0
    augment: bool = True
    val_digits: int = 200             # the fixed validation batch PGD is checked on (stratified)
    val_pgd_steps: int = 20
    collapse_drop: float = 0.2        # PGD val accuracy this far below its best: catastrophic overfitting
    ema_decay: float = 0.0            # > 0: validate and keep an exponential moving average of the weights
    checkpoint: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, RobustRecipe] = {
    "default": RobustRecipe(),
    "quick": RobustRecipe(method="fgsm_rs", width=8, hidden=64, epochs=1, batch_size=100, eps_warmup_epochs=1, lr=3e-3, val_digits=50,
                          val_pgd_steps=5, augment=False, checkpoint=False),
}


def recipe(preset: str, **overrides: Any) -> RobustRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    r = replace(PRESETS[preset], **overrides)
    if r.method not in METHODS:
        raise ValueError(f"robust method must be one of {METHODS}, got {r.method!r}")
    if r.epochs < 1 or not 0 < r.eps <= 1:
        raise ValueError("robust recipe needs epochs >= 1 and 0 < eps <= 1")
    if not 0 <= r.ema_decay < 1:
        raise ValueError(f"robust ema_decay must be in [0, 1) (0: no averaging), got {r.ema_decay}")
    return r


def architecture_spec(r: RobustRecipe, dataset: Dataset) -> dict[str, Any]:
    c, h, _ = dataset.input_shape
    return builtin_spec("mnist_cnn", in_channels=c, num_classes=len(dataset.class_names), image_size=h,
                        width=r.width, hidden=r.hidden)


# --------------------------------------------------------------------------- losses
def trades_adversarial(net: nn.Module, x: torch.Tensor, eps: float, steps: int, step_size: float,
                       generator: torch.Generator) -> torch.Tensor:
    """TRADES' inner maximisation: L-inf PGD on KL(f(x) || f(x')) from x + 0.001 N(0, 1)."""
    with torch.no_grad():
        p_clean = F.softmax(net(x), dim=1)
    adv = (x + 0.001 * torch.randn(x.shape, generator=generator).to(x.device)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(net(adv), dim=1), p_clean, reduction="sum")
        (grad,) = torch.autograd.grad(kl, adv)
        adv = torch.min(torch.max(adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def adversarial_loss(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor, r: RobustRecipe, eps: float,
                     generator: torch.Generator) -> torch.Tensor:
    """The recipe's training loss on one batch at training radius `eps` (net left in train mode)."""
    from service.attacks import pgd

    net.eval()  # the attack sees the deterministic network (no dropout)
    if r.method == "trades":
        adv = trades_adversarial(net, xb, eps, r.pgd_steps, min(r.pgd_step_size, eps), generator)
    elif r.method == "pgd":
        adv = pgd(net, xb, yb, eps, steps=r.pgd_steps, step_size=min(r.pgd_step_size, eps), generator=generator)
    else:
        adv = pgd(net, xb, yb, eps, steps=1, step_size=r.fgsm_alpha * eps / r.eps, generator=generator)
    net.train()
    if r.method == "trades":
        logits = net(torch.cat([xb, adv]))
        clean, robust = logits[:len(xb)], logits[len(xb):]
        kl = F.kl_div(F.log_softmax(robust, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
        return F.cross_entropy(clean, yb) + r.trades_beta * kl
    return F.cross_entropy(net(adv), yb)


def pgd_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int) -> float:
    """Accuracy under L-inf PGD (random start, 2.5 eps / steps step size), the same attack each call."""
    from service.attacks import pgd

    g = torch.Generator().manual_seed(seed)
    adv = pgd(net, x, y, eps, steps=steps, generator=g)
    return accuracy(net, adv, y)


def better(clean: float, pgd: float, best_clean: float, best_pgd: float, floor: float) -> bool:
    """Whether an epoch beats the best so far: by validation PGD accuracy, then clean; but an
    epoch at chance on clean digits (at or below `floor`, quality.chance_bound) never beats
    one above it. A constant network's PGD accuracy is 1/K, which no attack lowers, and on UCI
    digits at eps 0.3 it outranked every real epoch (epoch 22: 99.6% clean, 8% PGD): the
    build kept the constant network, and the gate refused `robust` at 10%."""
    return (clean > floor, pgd, clean) >= (best_clean > floor, best_pgd, best_clean)


def collapsed(best_pgd: float, pgd_acc: float, drop: float) -> bool:
    """Catastrophic overfitting: PGD accuracy `drop` or more below the best seen."""
    return best_pgd - pgd_acc >= drop


# --------------------------------------------------------------------------- checkpoints
def work_dir(ctx: Any, r: RobustRecipe) -> Path | None:
    if not r.checkpoint:
        return None
    opts = ctx.options.get(STEP, {})
    root = work_root(opts.get("work_dir") or os.environ.get("SHIELDSERVE_WORK_DIR"))
    # options at their "off" value stay out of the key, so a run started before they existed resumes
    trajectory = {k: v for k, v in r.to_json().items() if k != "checkpoint" and not (k == "ema_decay" and v == 0)}
    # the content of the data too: the same name and split sizes with other images is another run
    key = json.dumps({"dataset": ctx.dataset.describe(), "data_sha256": dataset_sha256(ctx.dataset),
                      "preset": ctx.preset, "seed": ctx.seed, "recipe": trajectory}, sort_keys=True)
    return Path(root) / f"robust-{ctx.preset}-seed{ctx.seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def save_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, best: dict[str, torch.Tensor],
                    generator: torch.Generator, state: dict[str, Any], averaged: nn.Module | None = None,
                    data_sha256: str = "") -> None:
    tensors = {f"model.{k}": v for k, v in net.state_dict().items()}
    if averaged is not None:
        tensors.update({f"ema.{k}": v for k, v in averaged.state_dict().items()})
    tensors.update({f"best.{k}": v for k, v in best.items()})
    opt_state = opt.state_dict()
    for i, s in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": torch.as_tensor(v) for k, v in s.items()})
    tensors["rng.generator"] = generator.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt_state["param_groups"]),
            "data_sha256": data_sha256}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


_LOOP_STATE = ("epoch", "history", "best_epoch", "best_pgd", "best_clean", "seconds", "collapsed_at")


def load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, generator: torch.Generator,
                    averaged: nn.Module | None = None,
                    data_sha256: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore net (and its average), optimiser and random states in place; returns (best weights, loop state).

    `data_sha256`: the training data's (common.dataset_sha256); a checkpoint that records other
    data (or none) was not trained on it, and is refused rather than resumed and bundled. A
    checkpoint that cannot be read or restored (truncated, another recipe's shapes, not ours)
    is refused the same way: CheckpointError, naming the file and what to do."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if data_sha256 is not None and meta.get("data_sha256") != data_sha256:
                raise checkpoint_error(STEP, path, f"it was not trained on this data (its data sha256 is "
                                                   f"{meta.get('data_sha256') or 'missing'})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        state = json.loads(meta["state"])
        missing = [k for k in _LOOP_STATE if k not in state] if isinstance(state, dict) else list(_LOOP_STATE)
        if missing:
            raise checkpoint_error(STEP, path, f"its loop state lacks {', '.join(missing)}")
        net.load_state_dict(part("model."))
        if averaged is not None:
            averaged.load_state_dict(part("ema."))
        opt_state: dict[str, Any] = {"state": {}, "param_groups": json.loads(meta["param_groups"])}
        for key, v in part("opt.").items():
            i, _, name = key.partition(".")
            opt_state["state"].setdefault(int(i), {})[name] = v
        opt.load_state_dict(opt_state)
        generator.set_state(tensors["rng.generator"])
        torch.set_rng_state(tensors["rng.torch"])
        best = part("best.")
        shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        if {k: tuple(v.shape) for k, v in best.items()} != shapes:
            raise checkpoint_error(STEP, path, "its best weights do not fit the network")
        return best, state
    except CheckpointError:
        raise
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as exc:
        # truncated or garbled (SafetensorError, JSONDecodeError), another recipe's shapes
        # (RuntimeError from load_state_dict), or missing pieces (KeyError)
        raise checkpoint_error(STEP, path, f"{type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- training
def _lr_at(step: int, total: int, peak: float) -> float:
    """One cycle, piecewise linear (stateless, so a resumed run continues the same schedule)."""
    up = max(1, int(0.4 * total))
    if step < up:
        return peak * (step + 1) / up
    return peak * max(0.0, (total - step) / max(1, total - up))


def train_robust(dataset: Dataset, r: RobustRecipe, seed: int, device: str = "cpu", checkpoint: Path | None = None,
                 after_epoch: Callable[[nn.Module, int], None] | None = None,
                 stop_after: int | None = None) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train and return (network, architecture spec, metrics), the best epoch's weights loaded.

    `checkpoint`: a file to resume from (if present) and to write after every epoch.
    `after_epoch(net, epoch)` runs after each epoch's training, before its validation (tests use
    it to craft a collapse). `stop_after`: leave after this many epochs, as an interrupted run.
    """
    g = seeded(seed, STEP)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    spec = architecture_spec(r, dataset)
    net = build_architecture(spec).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    x_train, y_train = dataset.train.x.to(device), dataset.train.y.to(device)
    val = dataset.val.per_class(max(1, r.val_digits // len(dataset.class_names)))
    x_vb, y_vb = val.x.to(device), val.y.to(device)
    steps_per_epoch = -(-len(x_train) // r.batch_size)
    total = r.epochs * steps_per_epoch
    warmup = max(1, r.eps_warmup_epochs * steps_per_epoch)
    from models.recipes.quality import chance_bound

    floor = chance_bound(len(dataset.class_names))
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_pgd": -1.0, "best_clean": -1.0,
                             "seconds": 0.0, "collapsed_at": None}
    best: dict[str, torch.Tensor] = copy.deepcopy(net.state_dict())
    # Weight averaging (Gowal et al. 2020, "Uncovering the limits of adversarial training"): the
    # average of the last few hundred steps' weights, which there lifted clean and robust accuracy
    # together (not on mnist5k under the one-cycle schedule: docs/defenses/robust.md); it is what
    # gets validated and kept.
    averaged = copy.deepcopy(net).eval().requires_grad_(False) if r.ema_decay > 0 else None
    resumed_from = 0
    data_sha = dataset_sha256(dataset)
    if checkpoint is not None and checkpoint.is_file():
        best, state = load_checkpoint(checkpoint, net, opt, g, averaged, data_sha256=data_sha)
        if not isinstance(state["epoch"], int) or not 0 <= state["epoch"] <= r.epochs:
            # the work directory's key holds `epochs`: only a file put there by hand gets here
            raise checkpoint_error(STEP, checkpoint, f"it holds {state['epoch']!r} epochs, not 0 to this run's "
                                                     f"{r.epochs}")
        resumed_from = state["epoch"]
    started = time.monotonic() - state["seconds"]
    bar = progress(total, f"train {ARTIFACT} ({r.method})")
    bar.update(state["epoch"] * steps_per_epoch)
    done = state["collapsed_at"] is not None
    for epoch in range(state["epoch"], r.epochs):
        if done or (stop_after is not None and epoch >= stop_after):
            break
        net.train()
        for k, idx in enumerate(batches(len(x_train), r.batch_size, g)):
            step = epoch * steps_per_epoch + k
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, r.lr)
            xb, yb = x_train[idx], y_train[idx]
            if r.augment:
                xb = random_affine(xb, g)
            eps = r.eps * min(1.0, (step + 1) / warmup)
            value = adversarial_loss(net, xb, yb, r, eps, g)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            if averaged is not None:
                # a plain running mean of the weights until 1 / (1 - ema_decay) steps, an exponential
                # moving average after: the random initial weights never weigh in
                decay = min(r.ema_decay, step / (step + 1))
                with torch.no_grad():
                    for a, p in zip(averaged.parameters(), net.parameters()):
                        a.lerp_(p, 1 - decay)
            bar.update(1)
        if after_epoch is not None:
            after_epoch(net, epoch)
        net.eval()
        scored = averaged if averaged is not None else net
        clean = accuracy(scored, dataset.val.x.to(device), dataset.val.y.to(device))
        robust = pgd_accuracy(scored, x_vb, y_vb, r.eps, r.val_pgd_steps, seed)
        state["history"].append({"epoch": epoch + 1, "val_clean": round(clean, 4), "val_pgd": round(robust, 4),
                                 "loss": round(float(value.detach()), 4)})
        bar.set_postfix(epoch=epoch + 1, val=f"{clean:.3f}", pgd=f"{robust:.3f}")
        if better(clean, robust, state["best_clean"], state["best_pgd"], floor):
            state.update(best_epoch=epoch + 1, best_pgd=robust, best_clean=clean)
            best = copy.deepcopy(scored.state_dict())
        elif collapsed(state["best_pgd"], robust, r.collapse_drop) and epoch + 1 > r.eps_warmup_epochs:
            state["collapsed_at"] = epoch + 1
            done = True
        state["epoch"] = epoch + 1
        state["seconds"] = round(time.monotonic() - started, 1)
        if checkpoint is not None:
            save_checkpoint(checkpoint, net, opt, best, g, state, averaged, data_sha256=data_sha)
    bar.close()
    net.load_state_dict(best)
    net.eval()
    finished = state["epoch"] >= r.epochs or state["collapsed_at"] is not None
    metrics: dict[str, Any] = {
        "method": r.method, "epochs_run": state["epoch"], "finished": finished,
        "best_epoch": state["best_epoch"], "val_accuracy": round(state["best_clean"], 4),
        f"val_pgd{r.val_pgd_steps}_accuracy": round(state["best_pgd"], 4), "val_pgd_digits": len(y_vb),
        "catastrophic_overfitting_at_epoch": state["collapsed_at"],
        "train_seconds": state["seconds"], "resumed_from_epoch": resumed_from, "history": state["history"],
        "test_accuracy": round(accuracy(net, dataset.test.x.to(device), dataset.test.y.to(device)), 4),
    }
    return net, spec, metrics


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    """Train `robust_classifier` and add it (and its `robust` section) to the bundle."""
    r = recipe(ctx.preset, **{k: v for k, v in ctx.options.get(STEP, {}).items() if k != "work_dir"})
    directory = work_dir(ctx, r)
    ckpt = directory / "checkpoint.safetensors" if directory is not None else None
    net, spec, metrics = train_robust(ctx.dataset, r, ctx.seed, device=str(ctx.device), checkpoint=ckpt)
    ctx.writer.add_module(ARTIFACT, net, spec, preprocess="none",  # trained on [0, 1] pixels
                          training={"recipe": r.to_json(), "seed": ctx.seed}, metrics=metrics)
    ctx.writer.set_defense(STEP, {"classifier": ARTIFACT, "threat_model": {"norm": "linf", "eps": r.eps}})
    ctx.writer.manifest["metrics"]["robust_classifier_test_accuracy"] = metrics["test_accuracy"]
