"""Defense-GAN's training recipe (Samangouei, Kabkab & Chellappa, ICLR 2018).

Networks (models/architectures.py; the WGAN-GP MNIST shapes of the paper's reference code, with a width knob):
  generator  Linear(latent -> 4*4*4w), ReLU, ConvT(4w -> 2w) + crop to H/4, ReLU,
             ConvT(2w -> w), ReLU, ConvT(w -> C), sigmoid            (paper: w = 64)
  critic     Conv(C -> w, s2), LReLU, Conv(w -> 2w, s2), LReLU, Conv(2w -> 4w, s2), LReLU, Linear
  encoder    the critic's body with a latent-sized head: x -> z, trained to invert G so the
             projection can start next to z* instead of at random (our addition, not the paper's)

Training: WGAN-GP (Gulrajani et al. 2017), 5 critic steps per generator step, lambda = 10,
Adam 1e-4 (0.5, 0.9), on the train split. Then the encoder: latent regression on G's samples
plus reconstruction ||G(E(x)) - x||^2 on real training digits. Then the projection's
reconstruction-error detector is calibrated on the validation split.

Checkpoints: a safetensors file and a JSON state in a work directory outside the bundle
(options {"defensegan": {"work_dir": DIR}}, or $SHIELDSERVE_WORK_DIR, or a per-user
`<tmp>/shieldserve-work-<uid>`, mode 0700), keyed by dataset (with the sha256 of its train and
validation images and labels, also recorded in the checkpoint and checked on load), preset,
seed and recipe; a build that finds one resumes from it. `generator_steps` is left out of that
key unless `lr_decay` (whose schedule depends on the run's length): a longer run resumes a
shorter one, and a shorter run than the checkpoint's is refused (CheckpointError), as is one
that cannot be read or was trained on other data: delete the directory it names, or train in
another work directory.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from models.architectures import (  # noqa: F401 - the networks, defined with the other builtins
    Critic, Encoder, Generator, builtin_spec,
)
from models.recipes.common import (
    CheckpointError, batches, checkpoint_error, dataset_sha256, progress, seeded, work_root,
)

STEP = "defensegan"


# --------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class DefenseGanRecipe:
    latent_dim: int = 128
    width: int = 16                # paper: 64; 16 trains in ~15 min on 2 CPU cores
    generator_steps: int = 1200    # paper: ~100k; our CPU budget allows ~1k
    critic_width: int = 0          # 0: same as width
    critic_steps: int = 5
    gp_lambda: float = 10.0
    lr: float = 5e-4               # paper: 1e-4; 5x to get digits within ~1k generator steps
    betas: tuple[float, float] = (0.5, 0.9)
    lr_decay: bool = False         # linear decay to 0 over generator_steps (Gulrajani et al.'s code)
    batch_size: int = 64
    encoder_width: int = 16
    encoder_steps: int = 600
    encoder_batch_size: int = 64
    encoder_lr: float = 1e-3
    encoder_real_weight: float = 1.0  # weight of ||G(E(x)) - x||^2 on real digits
    encoder_sphere: bool = True       # E(x) on the sphere ||z|| = sqrt(latent) (the default projection's)
    # Defense-GAN-Rec (the paper's headline setting): a classifier trained on G(z*) of the training
    # digits (plus the digits themselves), used instead of the base classifier after the projection.
    rec_classifier: bool = True
    rec_width: int = 16
    rec_hidden: int = 128
    rec_epochs: int = 6
    rec_lr: float = 1e-3
    rec_batch_size: int = 64
    rec_images: int = 0               # training digits to project for it (0: all)
    rec_clean_mix: bool = True        # also train on the clean digits (same labels)
    rec_projection: dict = field(default_factory=lambda: {"restarts": 2, "steps": 40})  # cheaper than default
    detector_rate: float = 0.01       # target false-rejection rate of the error detector
    checkpoint_every: int = 100       # generator steps; 0: no checkpoints
    calibration_images: int = 500
    threads: int = 1                  # these nets are tiny: one thread beats two on a shared machine

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, DefenseGanRecipe] = {
    "default": DefenseGanRecipe(),
    "quick": DefenseGanRecipe(width=4, generator_steps=60, critic_steps=2, batch_size=32, lr=1e-3,
                              encoder_width=4, encoder_steps=60, encoder_batch_size=64,
                              checkpoint_every=0, calibration_images=50,
                              rec_width=4, rec_hidden=32, rec_epochs=1, rec_images=200,
                              rec_projection={"restarts": 1, "steps": 5}),
}


def recipe(preset: str, **overrides: Any) -> DefenseGanRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if "betas" in overrides:
        overrides["betas"] = tuple(overrides["betas"])
    return replace(PRESETS[preset], **overrides)


def generator_spec(r: DefenseGanRecipe, shape: tuple[int, int, int]) -> dict[str, Any]:
    c, h, _ = shape
    return builtin_spec("defensegan_generator", latent_dim=r.latent_dim, width=r.width, channels=c, image_size=h)


def encoder_spec(r: DefenseGanRecipe, shape: tuple[int, int, int]) -> dict[str, Any]:
    c, h, _ = shape
    return builtin_spec("defensegan_encoder", latent_dim=r.latent_dim, width=r.encoder_width, channels=c,
                        image_size=h, sphere=r.encoder_sphere)


def rec_spec(r: DefenseGanRecipe, shape: tuple[int, int, int], classes: int) -> dict[str, Any]:
    c, h, _ = shape
    return builtin_spec("mnist_cnn", in_channels=c, num_classes=classes, image_size=h, width=r.rec_width,
                        hidden=r.rec_hidden)


# --------------------------------------------------------------------------- checkpoints
class Checkpoint:
    """Weights (safetensors) and loop state (JSON) of an interrupted training run."""

    def __init__(self, directory: Path | None, data_sha256: str = "") -> None:
        self.dir = directory
        # the training data's sha256 (common.dataset_sha256): recorded on save, checked on load
        self.data_sha256 = data_sha256

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(weights, loop state), or None when there is no checkpoint. One that cannot be used
        (a truncated state.json or weights file, another run's data, not ours) raises
        CheckpointError naming the file: never trained over, nor recorded as a failed step."""
        if self.dir is None or not (self.dir / "state.json").is_file():
            return None
        where = self.dir / "state.json"
        try:
            state = json.loads(where.read_text())
            if not isinstance(state, dict):
                raise checkpoint_error(STEP, where, "it is not a JSON object", self.dir)
            missing = [k for k in ("weights", "generator_step", "seconds", "history") if k not in state]
            if missing:
                raise checkpoint_error(STEP, where, f"it lacks {', '.join(missing)}", self.dir)
            name = state["weights"]
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise checkpoint_error(STEP, where, f"its weights file {name!r} is not a file name in {self.dir}",
                                       self.dir)
            where = self.dir / name
            with safe_open(str(where), framework="pt") as f:
                recorded = (f.metadata() or {}).get("data_sha256")
            if self.data_sha256 and not (recorded == state.get("data_sha256") == self.data_sha256):
                # another run's (other images under the same name and sizes) or not ours at all:
                # never resumed and written into the bundle
                raise checkpoint_error(STEP, where, f"it was not trained on this data (its data sha256 is "
                                                    f"{recorded or 'missing'})", self.dir)
            return load_file(str(where)), state
        except CheckpointError:
            raise
        except (SafetensorError, OSError, ValueError) as exc:  # ValueError: json's JSONDecodeError
            raise checkpoint_error(STEP, where, f"{type(exc).__name__}: {exc}", self.dir) from exc

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Weights under a name of their own (the generator step's), then state.json naming them,
        then the previous weights deleted: state.json's replacement is the one step that moves
        the checkpoint on. Both files replaced in place, one after the other, a process killed
        between the two left step-20 weights under a step-10 state, resumed without a word."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"checkpoint-{int(state['generator_step'])}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(self.dir / (name + ".tmp")),
                  metadata={"data_sha256": self.data_sha256})
        os.replace(self.dir / (name + ".tmp"), self.dir / name)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps({**state, "weights": name, "data_sha256": self.data_sha256}, indent=1))
        os.replace(tmp, self.dir / "state.json")
        for old in self.dir.glob("checkpoint*.safetensors"):  # checkpoint.safetensors: an earlier release's
            if old.name != name:
                old.unlink(missing_ok=True)


# what determines the training trajectory (generator_steps does not: a longer run resumes a shorter
# one, and train_gan refuses a checkpoint further along than the run asks for). robust.py keys on
# its whole recipe, epochs included, for the same reason: its one-cycle schedule depends on the
# run's length, as Defense-GAN's does only with lr_decay (then generator_steps is in the key too).
_GAN_FIELDS = {"latent_dim", "width", "critic_width", "critic_steps", "gp_lambda", "lr", "betas", "lr_decay",
               "batch_size"}


def work_dir(ctx: Any, r: DefenseGanRecipe) -> Path | None:
    if r.checkpoint_every <= 0:
        return None
    opts = ctx.options.get(STEP, {})
    root = work_root(opts.get("work_dir") or os.environ.get("SHIELDSERVE_WORK_DIR"))
    neutral = {"critic_width": 0, "lr_decay": False}  # fields added later: at these values, the old key
    gan = {k: v for k, v in r.to_json().items() if k in _GAN_FIELDS and neutral.get(k, object()) != v}
    if r.lr_decay:  # the schedule depends on the run's length: a longer run is another run
        gan["generator_steps"] = r.generator_steps
    # the content of the data too: the same name and split sizes with other images is another run
    key = json.dumps({"dataset": ctx.dataset.describe(), "data_sha256": dataset_sha256(ctx.dataset),
                      "preset": ctx.preset, "seed": ctx.seed, "recipe": gan}, sort_keys=True)
    return Path(root) / f"defensegan-{ctx.preset}-seed{ctx.seed}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _pack(prefix: str, d: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in d.items() if isinstance(v, torch.Tensor)}


def _unpack(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


def _opt_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{i}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _load_opt(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def _rng_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"rng.step": g.get_state(), "rng.torch": torch.get_rng_state()}


# --------------------------------------------------------------------------- training
def _gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    alpha = torch.rand(real.shape[0], 1, 1, 1, generator=g).to(real.device)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def train_gan(x_train: torch.Tensor, r: DefenseGanRecipe, g: torch.Generator, ckpt: Checkpoint,
              device: str = "cpu") -> tuple[Generator, dict[str, Any]]:
    """WGAN-GP. Returns the generator and training metrics. Resumes from `ckpt` if present."""
    c, h, _ = x_train.shape[1:]
    gen = Generator(r.latent_dim, r.width, c, h).to(device)
    critic = Critic(r.critic_width or r.width, c, h).to(device)
    opt_g = torch.optim.Adam(gen.parameters(), lr=r.lr, betas=r.betas)
    opt_c = torch.optim.Adam(critic.parameters(), lr=r.lr, betas=r.betas)
    start, seconds, history = 0, 0.0, []
    seed = g.initial_seed()  # `g` as seeded for the step, before a checkpoint's state replaces it
    loaded = ckpt.load()
    if loaded is not None:
        tensors, state = loaded
        assert ckpt.dir is not None
        start = state["generator_step"]
        if not isinstance(start, int) or start < 0:
            raise checkpoint_error(STEP, ckpt.dir / "state.json", f"its generator_step is {start!r}", ckpt.dir)
        if start > r.generator_steps:
            # The work directory's key leaves generator_steps out (without lr_decay the first N
            # steps are the same in a run of any length, so a longer run resumes a shorter one);
            # a shorter run cannot undo steps, and bundling the longer run's generator as this
            # one's would record a recipe it was not trained with.
            raise checkpoint_error(STEP, ckpt.dir / "state.json",
                                   f"it holds {start} generator steps, more than the {r.generator_steps} asked "
                                   f"for (ask for generator_steps >= {start} to use it)", ckpt.dir)
        try:
            gen.load_state_dict(_unpack("gen", tensors))
            critic.load_state_dict(_unpack("critic", tensors))
            _load_opt(opt_g, _unpack("opt_g", tensors))
            _load_opt(opt_c, _unpack("opt_c", tensors))
            g.set_state(tensors["rng.step"])
            torch.set_rng_state(tensors["rng.torch"])
            seconds, history = float(state["seconds"]), list(state["history"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # another recipe's shapes, missing pieces
            raise checkpoint_error(STEP, ckpt.dir / str(state["weights"]), f"{type(exc).__name__}: {exc}",
                                   ckpt.dir) from exc
    x_train = x_train.to(device)
    n = len(x_train)
    # The real batches: the i-th one drawn (i = generator step * critic_steps + critic step) is
    # batch i % per_epoch of epoch i // per_epoch, whose order is a permutation seeded by the
    # run's seed and the epoch alone. A resumed run so draws the batches the uninterrupted one
    # would: the order was drawn from `g` when an epoch ran out, and a checkpoint taken mid-epoch
    # did not hold the rest of it (a resumed run drew a new one, and trained another generator).
    # Only whole batches (a short last one is left out), or the one short batch of fewer images.
    per_epoch = max(1, n // r.batch_size)
    shuffled: dict[int, torch.Tensor] = {}

    def real_batch(i: int) -> torch.Tensor:
        epoch, k = divmod(i, per_epoch)
        if epoch not in shuffled:
            shuffled.clear()
            rng = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
            shuffled[epoch] = torch.randperm(n, generator=rng)
        return x_train[shuffled[epoch][k * r.batch_size:(k + 1) * r.batch_size].to(x_train.device)]

    bar = progress(r.generator_steps, "train defensegan (WGAN-GP)")
    bar.update(start)
    t0 = time.monotonic()
    w_dist = gp = 0.0
    for step in range(start, r.generator_steps):
        if r.lr_decay:
            for opt in (opt_g, opt_c):
                for group in opt.param_groups:
                    group["lr"] = r.lr * (1 - step / r.generator_steps)
        for p in critic.parameters():
            p.requires_grad_(True)
        for k in range(r.critic_steps):
            real = real_batch(step * r.critic_steps + k)
            z = torch.randn(len(real), r.latent_dim, generator=g).to(device)
            with torch.no_grad():
                fake = gen(z)
            d_real, d_fake = critic(real).mean(), critic(fake).mean()
            penalty = _gradient_penalty(critic, real, fake, g)
            loss_c = d_fake - d_real + r.gp_lambda * penalty
            opt_c.zero_grad(set_to_none=True)
            loss_c.backward()
            opt_c.step()
            w_dist, gp = float((d_real - d_fake).detach()), float(penalty.detach())
        for p in critic.parameters():
            p.requires_grad_(False)
        z = torch.randn(r.batch_size, r.latent_dim, generator=g).to(device)
        loss_g = -critic(gen(z)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        bar.update(1)
        if (step + 1) % 20 == 0:
            bar.set_postfix(w=f"{w_dist:.3f}", gp=f"{gp:.3f}")
        if (step + 1) % 100 == 0:
            history.append({"generator_step": step + 1, "wasserstein_estimate": round(w_dist, 4),
                            "gradient_penalty": round(gp, 4)})
        if ckpt.enabled and ((step + 1) % r.checkpoint_every == 0 or step + 1 == r.generator_steps):
            tensors = {**_pack("gen", gen.state_dict()), **_pack("critic", critic.state_dict()),
                       **_pack("opt_g", _opt_tensors(opt_g)), **_pack("opt_c", _opt_tensors(opt_c)),
                       **_rng_tensors(g)}
            ckpt.save(tensors, {"generator_step": step + 1, "seconds": seconds + time.monotonic() - t0,
                                "history": history, "recipe": r.to_json()})
    bar.close()
    seconds += time.monotonic() - t0
    gen.eval()
    for p in gen.parameters():
        p.requires_grad_(False)
    if start >= r.generator_steps and history:  # resumed a finished run: report its last estimate
        w_dist = history[-1]["wasserstein_estimate"]
    metrics = {"generator_steps": r.generator_steps, "wasserstein_estimate": round(w_dist, 4),
               "train_seconds": round(seconds, 1), "resumed_from_step": start, "history": history[-5:]}
    return gen, metrics


def train_encoder(gen: Generator, x_train: torch.Tensor, r: DefenseGanRecipe, g: torch.Generator,
                  device: str = "cpu") -> tuple[Encoder, dict[str, Any]]:
    """E(x) ~ z*: latent regression on G's samples, plus ||G(E(x)) - x||^2 on real digits."""
    c, h, _ = x_train.shape[1:]
    enc = Encoder(r.latent_dim, r.encoder_width, c, h, sphere=r.encoder_sphere).to(device)
    opt = torch.optim.Adam(enc.parameters(), lr=r.encoder_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, r.encoder_steps)
    x_train = x_train.to(device)
    bar = progress(r.encoder_steps, "train defensegan encoder")
    rec = lat = 0.0
    for step in range(r.encoder_steps):
        z = torch.randn(r.encoder_batch_size, r.latent_dim, generator=g).to(device)
        with torch.no_grad():
            fake = gen(z)
        loss_lat = F.mse_loss(enc(fake), z)
        idx = torch.randint(0, len(x_train), (r.encoder_batch_size,), generator=g)
        real = x_train[idx.to(device)]
        loss_rec = F.mse_loss(gen(enc(real)), real)
        loss = loss_lat + r.encoder_real_weight * 100.0 * loss_rec  # rec is per pixel: scale to ~latent's size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        rec, lat = float(loss_rec.detach()), float(loss_lat.detach())
        bar.update(1)
        if (step + 1) % 20 == 0:
            bar.set_postfix(rec=f"{rec:.4f}", lat=f"{lat:.3f}")
    bar.close()
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc, {"steps": r.encoder_steps, "train_reconstruction_mse": round(rec, 5),
                 "latent_mse": round(lat, 4)}


def train_rec_classifier(gen: Generator, enc: Encoder | None, x_train: torch.Tensor, y_train: torch.Tensor,
                         r: DefenseGanRecipe, settings: Any, classes: int, g: torch.Generator,
                         device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Defense-GAN-Rec: a classifier trained from scratch on G(z*) of the training digits."""
    from models.architectures import MnistCNN
    from models.recipes.common import random_affine
    from service.defenses.defensegan import project

    c, h, _ = x_train.shape[1:]
    t0 = time.monotonic()
    rng = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    bar = progress(math.ceil(len(x_train) / 100), "project defensegan training digits")
    recs, evals = [], 0.0
    for i in range(0, len(x_train), 100):
        p = project(gen, x_train[i:i + 100].to(device), settings, encoder=enc, rng=rng)
        recs.append(p.x.cpu())
        evals += float(p.generator_evals.float().sum())
        bar.update(1)
    bar.close()
    x_rec = torch.cat(recs)
    project_seconds = time.monotonic() - t0
    net = MnistCNN(c, classes, h, width=r.rec_width, hidden=r.rec_hidden).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=r.rec_lr)
    steps = r.rec_epochs * math.ceil(len(x_rec) / r.rec_batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = progress(steps, "train defensegan Rec classifier")
    net.train()
    loss_v = 0.0
    for _ in range(r.rec_epochs):
        for idx in batches(len(x_rec), r.rec_batch_size, g):
            xb, yb = x_rec[idx], y_train[idx]
            if r.rec_clean_mix:
                xb, yb = torch.cat([xb, x_train[idx]]), torch.cat([yb, yb])
            xb = random_affine(xb, g, 1.0, 5.0, 0.05)
            loss = F.cross_entropy(net(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_v = float(loss.detach())
            bar.update(1)
    bar.close()
    net.eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    return net, {"epochs": r.rec_epochs, "train_images": len(x_rec), "final_loss": round(loss_v, 4),
                 "projection": dict(r.rec_projection),
                 "projection_generator_evals_per_image": round(evals / max(len(x_rec), 1), 1),
                 "projection_seconds": round(project_seconds, 1),
                 "seconds": round(time.monotonic() - t0, 1)}


def save_samples(gen: Generator, path: Path, g: torch.Generator, rows: int = 8, cols: int = 16) -> None:
    """A PNG grid of generator samples, for a person to judge."""
    from service.imaging import encode_png

    with torch.no_grad():
        z = torch.randn(rows * cols, gen.latent_dim, generator=g)
        imgs = gen(z.to(next(gen.parameters()).device)).cpu()
    c, h, w = imgs.shape[1:]
    grid = torch.ones(c, rows * (h + 2) + 2, cols * (w + 2) + 2)
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        grid[:, 2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = imgs[k]
    path.write_bytes(encode_png(grid))


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    """Train G (WGAN-GP) and the encoder, calibrate the error detector, write artifacts."""
    opts = ctx.options.get(STEP, {})
    # the recipe's settings at the top of the section, as every other step reads them, or under
    # "recipe" (read alone until this release: a top-level `generator_steps` was ignored)
    settings = {**opts.get("recipe", {}), **{k: v for k, v in opts.items() if k not in ("recipe", "work_dir")}}
    r = recipe(ctx.preset, **settings)
    threads = torch.get_num_threads()
    if r.threads > 0:
        torch.set_num_threads(r.threads)
    try:
        _build(ctx, r)
    finally:
        torch.set_num_threads(threads)


def _build(ctx: Any, r: DefenseGanRecipe) -> None:
    from service.defenses.calibration import calibration_record, threshold_for
    from service.defenses.defensegan import PRESETS as PROJECTION_PRESETS
    from service.defenses.defensegan import project

    device = str(ctx.device)
    g = seeded(ctx.seed, STEP)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    shape = ctx.dataset.input_shape
    ckpt = Checkpoint(work_dir(ctx, r), dataset_sha256(ctx.dataset))
    gen, gan_metrics = train_gan(ctx.dataset.train.x, r, g, ckpt, device)
    enc, enc_metrics = train_encoder(gen, ctx.dataset.train.x, r, g, device)
    samples = "defensegan_samples.png"
    save_samples(gen.cpu(), ctx.writer.path / samples, seeded(ctx.seed, STEP + "/samples"))
    gen, enc = gen.to(device), enc.to(device)

    settings = PROJECTION_PRESETS["default"]
    classes = len(ctx.dataset.class_names)
    rec = rec_metrics = None
    if r.rec_classifier:
        train = ctx.dataset.train
        if r.rec_images:
            train = train.per_class(max(1, r.rec_images // classes))
        rec, rec_metrics = train_rec_classifier(gen, enc, train.x, train.y, r,
                                                replace(settings, **r.rec_projection), classes, g, device)

    # Calibrate on clean validation digits with the projection the pipeline runs by default.
    val = ctx.dataset.val.per_class(max(1, r.calibration_images // classes))
    proj = project(gen, val.x.to(device), settings, encoder=enc,
                   rng=torch.Generator(device=device).manual_seed(ctx.seed))
    threshold = threshold_for(proj.error, r.detector_rate)
    measured = float((proj.error > threshold).float().mean())
    clf = ctx.classifier()
    with torch.no_grad():
        val_acc = float((clf(proj.x).argmax(1).cpu() == val.y).float().mean())
        val_acc_raw = float((clf(val.x.to(device)).argmax(1).cpu() == val.y).float().mean())
        val_acc_rec = float((rec(proj.x).argmax(1).cpu() == val.y).float().mean()) if rec is not None else None
    training = {"recipe": r.to_json(), "seed": ctx.seed}
    ctx.writer.add_module("defensegan_generator", gen, generator_spec(r, shape), training=training,
                          metrics=gan_metrics)
    ctx.writer.add_module("defensegan_encoder", enc, encoder_spec(r, shape), training=training,
                          metrics=enc_metrics)
    if rec is not None:
        ctx.writer.add_module("defensegan_classifier", rec, rec_spec(r, shape, classes), preprocess="none", training=training,
                              metrics=rec_metrics)
    ctx.writer.set_defense(STEP, {
        "generator": "defensegan_generator", "encoder": "defensegan_encoder",
        "classifier": "defensegan_classifier" if rec is not None else None,
        "samples_png": samples,
        "detector": {"reconstruction_error": calibration_record({"reconstruction_error": threshold},
                                                                r.detector_rate, measured, len(val))},
        "projection": {"preset": "default", **settings.to_json()},
        "metrics": {"val_accuracy_purified": round(val_acc, 4), "val_accuracy_raw": round(val_acc_raw, 4),
                    "val_accuracy_purified_rec": None if val_acc_rec is None else round(val_acc_rec, 4),
                    "val_mean_reconstruction_error": round(float(proj.error.mean()), 6),
                    "val_generator_evals_per_image": round(float(proj.generator_evals.float().mean()), 1)},
    })
