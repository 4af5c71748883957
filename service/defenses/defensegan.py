"""Defense-GAN (Samangouei, Kabkab & Chellappa, ICLR 2018): project onto the generator's range.

    z* = argmin_z ||G(z) - x||^2 (mean over pixels),   classify G(z*)

R restarts per image are optimised together as one batch for L steps; each image keeps the
restart with the lowest error seen. Preset `paper` is the paper's procedure (L = 200, R = 10,
SGD step 10.0 with momentum 0.7, step x0.1 at 80% of L, restarts drawn from N(0, I)):
2,000 generator forward+backward passes per image.

Preset `default` is the fast version: restart 0 starts at E(x), an encoder trained to invert
G; the other restarts start at E(x) plus Gaussian noise; after `prune_at` steps only each
image's best restart continues; a restart stops when its error has not improved by
`min_delta` (relative) for `patience` steps; all images of a batch are projected together and
finished rows leave the batch, so their passes are not spent.
In `default`, z is also kept on the sphere ||z|| = sqrt(latent) (min_norm = max_norm = 1),
where N(0, I) puts its mass: the generator was never trained far inside it, and draws hazy
averages there that fit adversarial noise (docs/defenses/defensegan.md, "Why FGSM gets through").
`generator_evals` counts, per image, the rows that went through a generator forward+backward
pass (one row = one restart of one image), exactly as they were run.

Where the restarts start: served (RunContext.noise_key set), each image draws its R starts from
its own generator, seeded by a keyed hash of its pixels and the projection's settings
(`image_seeds`): the same image gets the same starts alone, in any batch company and at any
position, so resending it cannot shop for another reconstruction error near the `detect: true`
threshold. Without the key (evaluation, calibration, tests) or with a client-chosen `seed`, the
starts come from the run's generator (`ctx.generator`, seeded from `ctx.seed`), one draw for the
whole batch, reproducible from the seed.

Components: the purifier (always); with `classifier: rec`, an adapter that labels G(z*) with the
bundle's Defense-GAN-Rec classifier (trained on projections of the training digits, the paper's
"Defense-GAN-Rec") instead of the base classifier; and, with `detect: true`, a detector that rejects when the
reconstruction error is above the threshold calibrated on clean validation digits (stored in
the bundle with its target rate). The detector's projection is reused by the purifier for the
same request, so detecting costs nothing extra.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from models.bundle import BundleError, finite_number
from service.defenses.base import Classify, Component, DefenseEnv, Detection, Purified, RunContext
from service.defenses.base import image_seeds as keyed_seeds


@dataclass(frozen=True)
class ProjectionSettings:
    steps: int = 200                # L
    restarts: int = 10              # R
    optimizer: str = "momentum"     # "momentum" (the paper's) | "adam"
    lr: float = 10.0
    momentum: float = 0.7
    decay_at: float = 0.8           # lr x decay from this share of L on
    decay: float = 0.1
    init: str = "random"            # "random": z ~ N(0, I) | "encoder": E(x) (+ noise for restarts > 0)
    init_noise: float = 0.0         # std of the noise added to E(x) for restarts 1..R-1
    prune_at: int = 0               # after this many steps keep each image's best restart only (0: never)
    patience: int = 0               # stop a restart after this many steps without improvement (0: never)
    min_delta: float = 1e-3         # relative improvement that counts
    max_norm: float = 0.0           # keep ||z|| <= max_norm * sqrt(latent) (0: unconstrained, the paper's)
    min_norm: float = 0.0           # keep ||z|| >= min_norm * sqrt(latent) (0: unconstrained, the paper's)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, ProjectionSettings] = {
    "paper": ProjectionSettings(),
    # tuned on validation digits (clean and FGSM) against `paper`: lower error at ~1/12 the passes;
    # z kept on the sphere ||z|| = sqrt(latent) (where N(0, I) puts its mass; see the docs)
    "default": ProjectionSettings(steps=150, restarts=6, optimizer="adam", lr=0.05, init="encoder",
                                  init_noise=0.5, prune_at=10, patience=15, min_delta=2e-3,
                                  decay_at=0.8, decay=0.3, min_norm=1.0, max_norm=1.0),
}


# What build accepts, from the manifest's stored projection or a pipeline's `overrides`. The
# warm-up runs up to `steps` x `restarts` generator passes per image with no deadline, so an
# unbounded value (steps 10**9, no early stop) held start-up forever. The cap on passes is ten
# times `paper`'s 2,000 (200 steps x 10 restarts), the costliest projection shipped.
MAX_STEPS = 10_000
MAX_RESTARTS = 100
MAX_PASSES = 20_000             # steps x restarts per image
_INTS = {"steps": (1, MAX_STEPS), "restarts": (1, MAX_RESTARTS), "prune_at": (0, MAX_STEPS),
         "patience": (0, MAX_STEPS)}
# (low, high, low included, high included); a NaN anywhere turns z, the error and the detector's
# comparison into NaN, an infinite lr or noise does the same a step later. The upper bounds sit
# far above every shipped value (lr 10, noise 0.5, norms 1).
_FLOATS = {"lr": (0.0, 1000.0, False, True), "momentum": (0.0, 1.0, True, False),
           "decay_at": (0.0, 1.0, True, True), "decay": (0.0, 1.0, False, True),
           "init_noise": (0.0, 100.0, True, True), "min_delta": (0.0, 1.0, True, False),
           "max_norm": (0.0, 100.0, True, True), "min_norm": (0.0, 100.0, True, True)}
_CHOICES = {"optimizer": ("momentum", "adam"), "init": ("random", "encoder")}


def check_settings(s: ProjectionSettings, source: Callable[[str], str] = lambda name: "") -> None:
    """Raise ValueError naming the field, its bound and the value where `s` is outside what
    build serves (MAX_STEPS and the tables above); `source(field)` says where a value came from."""
    for name, (lo, hi) in _INTS.items():
        v = getattr(s, name)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ValueError(f"defensegan projection {name}{source(name)} must be an integer in [{lo}, {hi}], got {v!r}")
    for name, (lo, hi, lo_in, hi_in) in _FLOATS.items():
        v = getattr(s, name)
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        ok = ok and (lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)
        if not ok:
            bounds = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
            raise ValueError(f"defensegan projection {name}{source(name)} must be a finite number in {bounds}, got {v!r}")
    for name, allowed in _CHOICES.items():
        if getattr(s, name) not in allowed:
            raise ValueError(f"defensegan projection {name}{source(name)} must be one of {allowed}, got {getattr(s, name)!r}")
    if s.steps * s.restarts > MAX_PASSES:
        raise ValueError(f"defensegan projection steps x restarts{source('steps') or source('restarts')} must be at most {MAX_PASSES} "
                         f"generator passes per image, got {s.steps} x {s.restarts} = {s.steps * s.restarts}")
    if s.max_norm > 0 and s.min_norm > s.max_norm:
        raise ValueError(f"defensegan projection min_norm{source('min_norm')} must be at most max_norm "
                         f"({s.max_norm!r}), got {s.min_norm!r}")


@dataclass
class Projection:
    z: torch.Tensor                 # (B, latent) the best restart's latent
    x: torch.Tensor                 # (B, C, H, W) G(z)
    error: torch.Tensor             # (B,) mean squared error per pixel of G(z) against x
    initial_error: torch.Tensor     # (B,) the best starting point's error (before any step)
    generator_evals: torch.Tensor   # (B,) generator forward+backward passes spent on each image
    steps: torch.Tensor             # (B,) steps the image's last active restart ran
    extra: dict[str, Any] = field(default_factory=dict)


def _clamp_norm(z: torch.Tensor, s: ProjectionSettings, latent: int) -> torch.Tensor:
    """Keep min_norm*sqrt(latent) <= ||z|| <= max_norm*sqrt(latent): where N(0, I) puts its mass
    (the shell at ~sqrt(latent)); far from it the generator draws hazy, averaged strokes."""
    if s.max_norm <= 0 and s.min_norm <= 0:
        return z
    norm = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lo = s.min_norm * latent ** 0.5
    hi = s.max_norm * latent ** 0.5 if s.max_norm > 0 else float("inf")
    return z * (norm.clamp(lo, hi) / norm)


def reconstruction_grad(generator: nn.Module, z: torch.Tensor,
                        target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(G(z), per-row mean squared error against target, its gradient with respect to z).
    The bundle's generator writes its backward pass out (`reconstruction_grad`: several times
    faster on the few rows a projection step has); any other generator goes through autograd."""
    own = getattr(generator, "reconstruction_grad", None)
    if own is not None:
        return own(z, target)
    zr = z.detach().requires_grad_(True)
    with torch.enable_grad():
        out = generator(zr)
        loss = (out - target).pow(2).flatten(1).mean(1)
        (grad,) = torch.autograd.grad(loss.sum(), zr)
    return out.detach(), loss.detach(), grad


def image_seeds(key: bytes, x: torch.Tensor, settings: ProjectionSettings, latent: int) -> list[int]:
    """One seed per image of `x` (base.image_seeds): its restarts' starts depend on its pixels
    and the projection's settings alone, not its batch company or position. The tag keeps
    these seeds apart from smoothing's under the same key."""
    return keyed_seeds(key, x, ("defensegan", latent, tuple(sorted(settings.to_json().items()))))


def _normal(b: int, r: int, latent: int, device: torch.device, rng: torch.Generator | None,
            rngs: list[torch.Generator] | None) -> torch.Tensor:
    """(b * r, latent) standard normal draws, image i's in rows i*r .. i*r + r-1: from `rng` in
    one draw for the batch, or, with `rngs`, image i's r rows from rngs[i] alone (then stacked:
    one small draw per image, the projection itself stays batched)."""
    if rngs is None:
        return torch.randn(b * r, latent, generator=rng, device=device)
    if len(rngs) != b:
        raise ValueError(f"rngs: one generator per image, got {len(rngs)} for {b} images")
    return torch.cat([torch.randn(r, latent, generator=g, device=g.device) for g in rngs]).to(device)


def project(generator: nn.Module, x: torch.Tensor, settings: ProjectionSettings, *,
            encoder: nn.Module | None = None, rng: torch.Generator | None = None,
            rngs: list[torch.Generator] | None = None,
            check: Callable[[], None] | None = None) -> Projection:
    """Project each image of the batch onto G's range (see the module docstring).

    The restarts' random starts come from `rng` (one draw for the whole batch: an image's
    starts depend on its position and the batch's size), or, where `rngs` is given, image i's
    from rngs[i] alone (`_normal`): they then depend on that generator only.

    The optimiser's state is kept for the active rows only, packed together: a step is one
    gradient call and a few whole-tensor updates, with no gather or scatter. A row that stops
    (pruned, or out of patience) hands its best point back to the per-row arrays, and the
    active rows are packed again. Every active row has run the same number of steps, so
    Adam's bias correction is one value per step."""
    s = settings
    b = x.shape[0]
    r = s.restarts
    device = x.device
    latent = int(getattr(generator, "latent_dim"))
    x = x.detach()
    if s.optimizer not in ("momentum", "adam"):
        raise ValueError(f"unknown optimizer {s.optimizer!r}")
    if s.init == "encoder":
        if encoder is None:
            raise ValueError("init='encoder' needs the encoder")
        with torch.no_grad():
            z0 = encoder(x).repeat_interleave(r, dim=0)
        noise = _normal(b, r, latent, device, rng, rngs) if r > 1 else None
        if noise is not None:
            noise.view(b, r, latent)[:, 0] = 0  # restart 0 is E(x) itself
            z0 = z0 + s.init_noise * noise
    elif s.init == "random":
        z0 = _normal(b, r, latent, device, rng, rngs)
    else:
        raise ValueError(f"unknown init {s.init!r}")

    # per row (b * r), final once the row stops
    best_loss = torch.full((b * r,), float("inf"), device=device)
    best_z = torch.empty(b * r, latent, device=device)
    best_x = torch.zeros((b * r, *x.shape[1:]), device=device)
    steps_run = torch.zeros(b * r, dtype=torch.long, device=device)
    initial = best_loss.clone()
    # the active rows, packed: `rows` maps them to their row
    rows = torch.arange(b * r, device=device)
    z = _clamp_norm(z0, s, latent)
    target = x.repeat_interleave(r, dim=0)
    a_loss, a_z, a_x = best_loss.clone(), z.clone(), best_x.clone()
    since = torch.zeros(b * r, dtype=torch.long, device=device)
    buf1 = torch.zeros_like(z)  # momentum / Adam first moment
    buf2 = torch.zeros_like(z)  # Adam second moment
    decay_step = int(s.decay_at * s.steps)
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def hand_back(t: int) -> None:  # the active rows' best so far into the per-row arrays
        best_loss[rows], best_z[rows], best_x[rows] = a_loss, a_z, a_x
        steps_run[rows] = t + 1

    t = -1
    for t in range(s.steps):
        if check is not None:
            check()
        out, loss, grad = reconstruction_grad(generator, z, target)
        if t == 0:
            initial.copy_(loss)
        better = loss < a_loss * (1 - s.min_delta)
        improved = loss < a_loss
        a_loss = torch.where(improved, loss, a_loss)
        a_z = torch.where(improved.unsqueeze(1), z, a_z)
        a_x = torch.where(improved.view(-1, *[1] * (out.dim() - 1)), out, a_x)
        since = torch.where(better, 0, since + 1)

        lr = s.lr * (s.decay if t >= decay_step else 1.0)
        if s.optimizer == "momentum":  # TF MomentumOptimizer, as in the reference code
            buf1 = s.momentum * buf1 + grad
            z = z - lr * buf1
        else:
            buf1 = beta1 * buf1 + (1 - beta1) * grad
            buf2 = beta2 * buf2 + (1 - beta2) * grad * grad
            # the step count as a float32 tensor, as the per-row counts were: the bias
            # corrections round exactly as before (tests/test_defensegan.py compares bit for bit)
            k = torch.full((1, 1), float(t + 1), device=device)
            m_hat, v_hat = buf1 / (1 - beta1 ** k), buf2 / (1 - beta2 ** k)
            z = z - lr * m_hat / (v_hat.sqrt() + eps)
        z = _clamp_norm(z, s, latent)

        keep = since < s.patience if s.patience > 0 else None
        if s.prune_at > 0 and t + 1 == s.prune_at and r > 1:
            every = best_loss.clone()  # the choice among an image's restarts looks at all of them
            every[rows] = a_loss
            best_of = every.view(b, r).argmin(1) + torch.arange(b, device=device) * r
            chosen = torch.zeros(b * r, dtype=torch.bool, device=device)
            chosen[best_of] = True
            keep = chosen[rows] if keep is None else keep & chosen[rows]
        if keep is not None and not bool(keep.all()):
            hand_back(t)
            rows, z, target, buf1, buf2, since = rows[keep], z[keep], target[keep], buf1[keep], buf2[keep], since[keep]
            a_loss, a_z, a_x = a_loss[keep], a_z[keep], a_x[keep]
            if rows.numel() == 0:
                break
    if rows.numel():
        hand_back(t)

    pick = best_loss.view(b, r).argmin(1) + torch.arange(b, device=device) * r
    return Projection(z=best_z[pick], x=best_x[pick], error=best_loss[pick],
                      initial_error=initial.view(b, r).min(1).values,
                      generator_evals=steps_run.view(b, r).sum(1),
                      steps=steps_run.view(b, r).max(1).values)


# --------------------------------------------------------------------------- components
class _Projector:
    """The loaded networks and the projection settings; a run's projections are remembered in
    its RunContext (`memo`), so the purifier reuses the detector's work for the same request."""

    def __init__(self, generator: nn.Module, encoder: nn.Module | None, settings: ProjectionSettings,
                 preset: str) -> None:
        self.generator, self.encoder, self.settings, self.preset = generator, encoder, settings, preset

    @staticmethod
    def _key(row: torch.Tensor) -> bytes:
        return hashlib.blake2b(row.detach().cpu().numpy().tobytes(), digest_size=16).digest()

    def run(self, x: torch.Tensor, ctx: RunContext) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(G(z*), reconstruction error, generator passes) per image; reuses what this run
        already projected (the detector's work), in which case no new passes are spent. Equal
        rows (one image sent twice) each take their own projection, in order."""
        memo: dict[bytes, list[tuple[torch.Tensor, ...]]] = ctx.memo.get(self, {})
        keys = [self._key(row) for row in x]
        if memo and all(len(memo.get(k, ())) >= keys.count(k) for k in set(keys)):
            hits = [memo[k].pop(0) for k in keys]
            return torch.stack([h[0] for h in hits]), torch.stack([h[1] for h in hits]), torch.stack([h[2] for h in hits])
        p = project(self.generator, x, self.settings, encoder=self.encoder, check=ctx.check,
                    **self._randomness(x, ctx))
        return p.x, p.error, p.generator_evals

    def _randomness(self, x: torch.Tensor, ctx: RunContext) -> dict[str, Any]:
        """Where the restarts' starts come from. Served (ctx.noise_key set): one CPU generator
        per image seeded by `image_seeds`, so a resent image is projected from the same starts
        whatever its batch company or position (the batcher's per-batch seed, secrets.randbits,
        gave a resend a fresh draw: another reconstruction error, another answer near the
        detector's threshold). CPU generators: the starts' draws are the same on every device;
        hashing and seeding cost 0.2 ms for 8 images, 0.6 ms for 64, next to 0.4 s and 2 s of
        projection (one CPU thread). Without the key (evaluation,
        calibration, tests) or with a client-chosen `seed` (as smoothing honours it): the run's
        generator, seeded from ctx.seed, one draw for the batch, as before."""
        if ctx.noise_key is None or "seed" in (ctx.options or {}):
            return {"rng": ctx.generator}
        latent = int(getattr(self.generator, "latent_dim"))
        return {"rngs": [torch.Generator().manual_seed(s)
                         for s in image_seeds(ctx.noise_key, x, self.settings, latent)]}

    def remember(self, x: torch.Tensor, purified: torch.Tensor, error: torch.Tensor, evals: torch.Tensor,
                 ctx: RunContext) -> None:
        memo = ctx.memo.setdefault(self, {})
        for row, px, e, n in zip(x, purified, error, evals):
            memo.setdefault(self._key(row), []).append((px, e, n))


class ProjectionPurifier(Component):
    role = "purifier"
    defense = "defensegan"

    def __init__(self, projector: _Projector) -> None:
        self.projector = projector

    def purify(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> Purified:
        purified, error, evals = self.projector.run(x, ctx)
        return Purified(purified.to(x.dtype), {"reconstruction_error": error.detach(),
                                               "generator_evals": evals.float()})

    def public_settings(self) -> dict[str, Any]:
        return {"projection": self.projector.preset, **self.projector.settings.to_json()}


class RecClassifierAdapter(Component):
    """Defense-GAN-Rec: classify G(z*) with the classifier trained on projections of the training
    digits (artifact `defensegan_classifier`) instead of the base classifier."""

    role = "adapter"
    defense = "defensegan"

    def __init__(self, network: nn.Module, artifact: str) -> None:
        self.network, self.artifact = network, artifact

    def adapt(self, x: torch.Tensor, classifier: Any, ctx: RunContext) -> Classify:
        return self.network

    def public_settings(self) -> dict[str, Any]:
        return {"classifier": self.artifact}


class ReconstructionErrorDetector(Component):
    role = "detector"
    defense = "defensegan"

    def __init__(self, projector: _Projector, threshold: float, rate: float) -> None:
        self.projector, self.threshold, self.rate = projector, threshold, rate

    def detect(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> list[Detection]:
        purified, error, evals = self.projector.run(x, ctx)
        self.projector.remember(x, purified, error, evals, ctx)
        return [Detection("reconstruction_error", error.detach(), self.threshold)]

    def public_settings(self) -> dict[str, Any]:
        return {"detector": "reconstruction_error", "threshold": self.threshold, "target_fpr": self.rate}


_OPTIONS = {"projection", "detect", "rate", "overrides", "classifier"}


def _finite_number(env: DefenseEnv, value: Any, key: str, high: float = math.inf) -> float:
    """A number from the bundle's section, refused (BundleError) unless finite and in [0, high]:
    no error is ever above a NaN or infinite threshold, so the detector would pass everything
    without a word; errors are mean squares (>= 0)."""
    if not finite_number(value) or not 0 <= value <= high:
        raise BundleError(f"bundle {env.bundle.path}: {key} must be a finite number in [0, {high:g}], got {value!r}")
    return float(value)


def _check_networks(env: DefenseEnv, section: dict[str, Any], generator: nn.Module, encoder: nn.Module | None) -> None:
    """Refuse (BundleError) a generator that does not draw this bundle's images or an encoder whose
    latent is not the generator's: each artifact fits its own weights, and a misfit between
    them surfaced as a torch shape error at the warm-up, or on every request with it off."""
    shape = tuple(int(d) for d in env.bundle.input_spec.shape)
    latent = getattr(generator, "latent_dim", None)
    where = f"bundle {env.bundle.path}: artifact {section['generator']!r} (defensegan generator)"
    if isinstance(latent, bool) or not isinstance(latent, int) or latent < 1:
        raise BundleError(f"{where}: latent_dim must be a positive integer, got {latent!r}")
    try:
        with torch.no_grad():
            drawn = tuple(generator(torch.zeros(1, latent, device=env.device)).shape)
            coded = tuple(encoder(torch.zeros(1, *shape, device=env.device)).shape) if encoder is not None else None
    except Exception as exc:
        raise BundleError(f"bundle {env.bundle.path}: the defensegan networks do not run on this bundle's "
                          f"{shape} input and the generator's latent {latent}: {exc}") from exc
    if drawn != (1, *shape):
        raise BundleError(f"{where} draws images of shape {drawn[1:]}, this bundle's input is {shape}")
    if coded is not None and coded != (1, latent):
        raise BundleError(f"bundle {env.bundle.path}: artifact {section['encoder']!r} (defensegan encoder) codes "
                          f"an image into shape {coded[1:]}, the generator takes ({latent},)")


def settings_for(preset: str, section: dict[str, Any]) -> ProjectionSettings:
    """The settings of a projection preset; for the preset the bundle was calibrated with, the
    settings stored in the bundle (so that a bundle and its threshold stay consistent)."""
    stored = section.get("projection", {})
    if preset == stored.get("preset"):
        fields = {k: v for k, v in stored.items() if k in ProjectionSettings.__dataclass_fields__}
        return ProjectionSettings(**fields)
    return PRESETS[preset]


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    """Options: projection (preset name, default 'default'), overrides (ProjectionSettings
    fields), detect (bool, default false), rate (the calibrated rate to use; must match),
    classifier ('base', the default: the pipeline's base classifier labels G(z*), the paper's
    Defense-GAN-Orig; 'rec': the bundle's Defense-GAN-Rec classifier, trained on projections)."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    preset = str(options.get("projection", "default"))
    if preset not in PRESETS:
        raise ValueError(f"unknown projection {preset!r}; choose from {sorted(PRESETS)}")
    overrides = dict(options.get("overrides", {}) or {})
    bad = set(overrides) - set(ProjectionSettings.__dataclass_fields__)
    if bad:
        raise ValueError(f"unknown projection settings {sorted(bad)}")
    section = env.bundle.defense("defensegan")
    stored = preset == section.get("projection", {}).get("preset")
    settings = replace(settings_for(preset, section), **overrides)

    def source(name: str) -> str:
        if name in overrides:
            return " (the pipeline's overrides)"
        return f" (bundle {env.bundle.path}: defenses.defensegan.projection)" if stored else ""

    check_settings(settings, source)
    rec_artifact = section.get("classifier")
    classify_with = str(options.get("classifier", "base"))
    if classify_with not in ("rec", "base"):
        raise ValueError(f"defensegan classifier must be 'rec' or 'base', got {classify_with!r}")
    if classify_with == "rec" and not rec_artifact:
        raise ValueError("this bundle has no Defense-GAN-Rec classifier; use classifier: base")
    generator = env.bundle.module(section["generator"], env.device)
    encoder = env.bundle.module(section["encoder"], env.device) if settings.init == "encoder" else None
    _check_networks(env, section, generator, encoder)
    projector = _Projector(generator, encoder, settings, preset)
    components: list[Component] = []
    if options.get("detect", False):
        calibrated = section["projection"].get("preset", "default")
        if preset != calibrated or overrides:
            raise ValueError(f"the error detector is calibrated for projection {calibrated!r} without "
                             f"overrides; use that projection or detect: false")
        record = section["detector"]["reconstruction_error"]
        key = "defenses.defensegan.detector.reconstruction_error"
        target = _finite_number(env, record.get("target_fpr"), f"{key}.target_fpr", 1.0)
        threshold = _finite_number(env, record.get("thresholds", {}).get("reconstruction_error"),
                                   f"{key}.thresholds.reconstruction_error")
        rate = float(options.get("rate", target))
        if not abs(rate - target) <= 1e-12:  # written so that a NaN rate is refused too
            raise ValueError(f"the bundle's detector is calibrated to rate {target}, not {rate}")
        components.append(ReconstructionErrorDetector(projector, threshold, rate))
    components.append(ProjectionPurifier(projector))
    if classify_with == "rec":
        components.append(RecClassifierAdapter(env.bundle.module(rec_artifact, env.device), rec_artifact))
    return components
