"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): certify or abstain.

The smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), is robust in
L2 around x: if the top class has probability at least pA_lower > 1/2, no perturbation of
norm below R = sigma * Phi^-1(pA_lower) changes g's answer.

  PREDICT(x, n, alpha)      counts of the top two classes; two-sided binomial test; abstain
                            if the p-value > alpha.
  CERTIFY(x, n0, n, alpha)  pick c_A from n0 samples, count it in n fresh samples,
                            pA_lower = one-sided Clopper-Pearson bound at level alpha;
                            abstain if pA_lower < 1/2, else radius sigma * Phi^-1(pA_lower).
  CERTIFY_AT(x, r, ...)     is c_A certified at radius r? Sequential: draw samples on a
                            geometric schedule and stop as soon as the Clopper-Pearson interval
                            (alpha split over the looks, a union bound) lies wholly above
                            or below Phi(r / sigma). Easy inputs stop after a few hundred samples.

What the certificate covers (the `denoiser` option):
  false (default)  f is the bundle's classifier trained with noise at this sigma
                   (`smoothing_sigma25` / `smoothing_sigma50`), not the plain base classifier.
  true             f is D then the pipeline's classifier: the bundle's DnCNN denoiser for this
                   sigma, then the plain base classifier (denoised smoothing, Salman et al.
                   2020). Purifiers placed after this decider in the pipeline are part of the
                   pipeline's classifier function and so part of f too.
The certificate is about the smoothed classifier g only; detectors before it are not covered.

All noise comes from a torch.Generator seeded with the certificate's `seed`; with the same
seed, n0, n and batch size a certificate is reproduced exactly. Sampling is batched: one
forward pass per `batch_size` noisy copies, never a Python loop per sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from scipy.stats import beta, binomtest, norm

from service.defenses.base import Classify, Component, Decision, DefenseEnv, RunContext, optimize_for_cpu

ABSTAIN = -1


# ---------------------------------------------------------------------- the statistics
def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion."""
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def radius_from(p_a_lower: float, sigma: float) -> float:
    """Cohen et al.'s L2 radius sigma * Phi^-1(pA_lower); 0 when pA_lower <= 1/2."""
    return sigma * float(norm.ppf(p_a_lower)) if p_a_lower > 0.5 else 0.0


def predict_from_counts(counts: torch.Tensor, alpha: float) -> int:
    """PREDICT: the top class if it beats the runner-up in a two-sided binomial test at alpha."""
    top2 = torch.topk(counts, 2)
    n_a, n_b = int(top2.values[0]), int(top2.values[1])
    if n_a + n_b == 0 or binomtest(n_a, n_a + n_b, 0.5).pvalue > alpha:
        return ABSTAIN
    return int(top2.indices[0])


def geometric_schedule(n_max: int, first: int = 128, factor: float = 2.0) -> list[int]:
    """Cumulative sample counts at which the sequential test looks: first, 2*first, ..., n_max."""
    sizes, n = [], float(first)
    while n < n_max:
        sizes.append(int(n))
        n *= factor
    sizes.append(int(n_max))
    return sizes


def alpha_spending(alpha: float, looks: int) -> list[float]:
    """How CERTIFY_AT splits alpha over its looks: half at the last look (so that at n_max it
    decides almost as a fixed-n CERTIFY would), the other half evenly over the earlier ones.
    The parts sum to alpha: the union bound keeps the overall error at most alpha."""
    if looks == 1:
        return [alpha]
    return [alpha / (2 * (looks - 1))] * (looks - 1) + [alpha / 2]


# ---------------------------------------------------------------------- sampling
class NoiseSampler:
    """Counts f's answers on noisy copies of one image.

    Noise is drawn `batch_size` copies at a time into one preallocated buffer
    (`randn(out=...)`, scaled and shifted in place) and f runs on `forward_batch` copies per
    forward pass (default min(batch_size, 1000): on a CPU a few hundred to a thousand copies per
    pass keep activations in cache; larger batches are slower). The noise depends only on the
    seed, n0, n and batch_size, never on forward_batch. No Python loop per sample.
    """

    def __init__(self, f: Classify, sigma: float, num_classes: int, batch_size: int = 1000,
                 forward_batch: int | None = None) -> None:
        self.f, self.sigma, self.num_classes, self.batch_size = f, sigma, num_classes, batch_size
        self.forward_batch = max(1, min(batch_size, forward_batch or 1000))
        self._buffer: torch.Tensor | None = None

    def _noise_buffer(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.batch_size, *x.shape)
        buf = self._buffer
        if buf is None or buf.shape != shape or buf.dtype != x.dtype or buf.device != x.device:
            buf = self._buffer = torch.empty(shape, dtype=x.dtype, device=x.device)
        return buf

    def counts(self, x: torch.Tensor, num: int, generator: torch.Generator,
               ctx: RunContext | None = None) -> torch.Tensor:
        """(K,) int64 counts of f(x + e) over `num` noise draws; x is one (C, H, W) image."""
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        remaining = num
        with torch.inference_mode():
            buf = self._noise_buffer(x)
            while remaining > 0:
                if ctx is not None:
                    ctx.check()
                m = min(self.batch_size, remaining)
                noisy = buf[:m]
                torch.randn(noisy.shape, generator=generator, out=noisy)
                noisy.mul_(self.sigma).add_(x)
                for i in range(0, m, self.forward_batch):
                    labels = self.f(noisy[i:i + self.forward_batch]).argmax(1)
                    counts += torch.bincount(labels, minlength=self.num_classes)
                remaining -= m
        return counts.cpu()


@dataclass
class Certificate:
    label: int                 # -1: abstained
    abstained: bool
    radius: float              # 0 when abstained
    p_a_lower: float
    count: int                 # samples (of n) on which f answered `label`
    sigma: float
    n0: int
    n: int                     # estimation samples actually drawn
    alpha: float
    samples: int               # n0 + n
    seed: int
    batch_size: int
    seconds: float
    target_radius: float | None = None
    certified: bool | None = None  # with a target radius: certified at it?

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def certify(sampler: NoiseSampler, x: torch.Tensor, n0: int, n: int, alpha: float, seed: int,
            ctx: RunContext | None = None) -> tuple[Certificate, torch.Tensor]:
    """CERTIFY (Cohen et al. 2019, Algorithm 1). Returns the certificate and the n-sample counts."""
    started = time.perf_counter()
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    c_a = int(sampler.counts(x, n0, g, ctx).argmax())
    counts = sampler.counts(x, n, g, ctx)
    k = int(counts[c_a])
    p_lower = lower_confidence_bound(k, n, alpha)
    abstained = p_lower < 0.5
    cert = Certificate(label=ABSTAIN if abstained else c_a, abstained=abstained,
                       radius=0.0 if abstained else radius_from(p_lower, sampler.sigma),
                       p_a_lower=p_lower, count=k, sigma=sampler.sigma, n0=n0, n=n, alpha=alpha,
                       samples=n0 + n, seed=seed, batch_size=sampler.batch_size,
                       seconds=time.perf_counter() - started)
    return cert, counts


def certify_at_radius(sampler: NoiseSampler, x: torch.Tensor, radius: float, n0: int, n_max: int,
                      alpha: float, seed: int, ctx: RunContext | None = None,
                      first: int = 128) -> tuple[Certificate, torch.Tensor]:
    """Is the smoothed classifier certified at `radius`? Stops as soon as that is settled.

    c_A comes from n0 selection samples as in CERTIFY. Estimation samples are drawn on a
    geometric schedule up to n_max; at each of the K looks the Clopper-Pearson interval at that
    look's share of alpha (`alpha_spending`) is compared with p* = Phi(radius / sigma).
    Certified once the lower bound exceeds p*, refused once the upper bound falls below it
    (or at n_max). By the union bound
    over the looks, a "certified" answer is wrong with probability at most alpha, as in CERTIFY
    with fixed n; the reported p_a_lower is valid at the same level.
    """
    started = time.perf_counter()
    g = torch.Generator(device=x.device)
    g.manual_seed(seed)
    c_a = int(sampler.counts(x, n0, g, ctx).argmax())
    target = float(norm.cdf(radius / sampler.sigma))
    schedule = geometric_schedule(n_max, first=min(first, n_max))
    spend = alpha_spending(alpha, len(schedule))
    counts = torch.zeros(sampler.num_classes, dtype=torch.long)
    drawn, p_lower, certified = 0, 0.0, False
    for size, alpha_look in zip(schedule, spend):
        counts += sampler.counts(x, size - drawn, g, ctx)
        drawn = size
        k = int(counts[c_a])
        p_lower = lower_confidence_bound(k, drawn, alpha_look)
        if p_lower > target:
            certified = True
            break
        if upper_confidence_bound(k, drawn, alpha_look) < target:
            break
    abstained = p_lower < 0.5
    cert = Certificate(label=ABSTAIN if abstained else c_a, abstained=abstained,
                       radius=0.0 if abstained else radius_from(p_lower, sampler.sigma),
                       p_a_lower=p_lower, count=int(counts[c_a]), sigma=sampler.sigma, n0=n0, n=drawn,
                       alpha=alpha, samples=n0 + drawn, seed=seed, batch_size=sampler.batch_size,
                       seconds=time.perf_counter() - started, target_radius=radius,
                       certified=certified and not abstained)
    return cert, counts


# ---------------------------------------------------------------------- the decider
_OPTIONS = {"sigma", "denoiser", "n", "n0", "alpha", "batch_size", "forward_batch", "optimize"}
_REQUEST_OPTIONS = {"sigma", "n", "n0", "alpha", "radius", "seed"}


class SmoothingDecider(Component):
    """Certifies each image with CERTIFY (or CERTIFY_AT with a `radius` option), or abstains.

    Per-request options in RunContext.options: sigma, n, n0, alpha, radius, seed.
    """

    role = "decider"
    defense = "smoothing"
    certifies = True

    def __init__(self, *, classifiers: dict[float, Classify], denoisers: dict[float, Classify],
                 sigma: float, denoiser: bool, n: int, n0: int, alpha: float, batch_size: int,
                 num_classes: int, device: torch.device, forward_batch: int | None = None,
                 optimize: bool = True, input_shape: tuple[int, ...] | None = None,
                 eager_classifiers: dict[float, Classify] | None = None,
                 eager_denoisers: dict[float, Classify] | None = None) -> None:
        self.classifiers, self.denoisers = classifiers, denoisers
        # the same networks before optimize_for_cpu: differentiable, for attacks on the pipeline
        self.eager_classifiers = eager_classifiers or classifiers
        self.eager_denoisers = eager_denoisers or denoisers
        self.sigma, self.use_denoiser = sigma, denoiser
        self.n, self.n0, self.alpha, self.batch_size = n, n0, alpha, batch_size
        self.num_classes, self.device = num_classes, device
        self.forward_batch, self.optimize, self.input_shape = forward_batch, optimize, input_shape
        self._fast: dict[int, tuple[Classify, Classify]] = {}  # id(pipeline classifier) -> (it, optimized)

    @property
    def sigmas(self) -> list[float]:
        return sorted(self.denoisers if self.use_denoiser else self.classifiers)

    def function(self, sigma: float, classify: Classify, differentiable: bool = False) -> Classify:
        """The base function f that is smoothed at this sigma (see the module docstring).
        `differentiable`: the eager networks, with gradients to the input (the served ones are
        TorchScript-frozen for inference; attacks in the evaluation need the same function
        with a backward pass)."""
        if sigma not in self.sigmas:
            raise ValueError(f"sigma {sigma:g} is not available; this pipeline has sigma in "
                             f"{[float(s) for s in self.sigmas]}")
        if self.use_denoiser:
            denoise = (self.eager_denoisers if differentiable else self.denoisers)[sigma]
            if not differentiable:
                classify = self._optimized(classify)
            return lambda z: classify(denoise(z))
        return (self.eager_classifiers if differentiable else self.classifiers)[sigma]

    def _optimized(self, classify: Classify) -> Classify:
        """The pipeline's classifier as `optimize_for_cpu` makes it, once per classifier object."""
        if not (self.optimize and self.input_shape and isinstance(classify, torch.nn.Module)):
            return classify
        hit = self._fast.get(id(classify))
        if hit is None or hit[0] is not classify:
            hit = self._fast[id(classify)] = (classify, optimize_for_cpu(classify, self.input_shape))
        return hit[1]

    def decide(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> Decision:
        opts = ctx.options or {}
        unknown = set(opts) - _REQUEST_OPTIONS
        if unknown:
            raise ValueError(f"unknown smoothing options {sorted(unknown)}")
        sigma = float(opts.get("sigma", self.sigma))
        n, n0 = int(opts.get("n", self.n)), int(opts.get("n0", self.n0))
        alpha = float(opts.get("alpha", self.alpha))
        target = opts.get("radius")
        sampler = NoiseSampler(self.function(sigma, classify), sigma, self.num_classes, self.batch_size,
                               self.forward_batch)
        b = x.shape[0]
        labels = torch.full((b,), ABSTAIN, dtype=torch.long)
        confidence, radius = torch.zeros(b), torch.zeros(b)
        probs = torch.zeros(b, self.num_classes)
        abstained = torch.ones(b, dtype=torch.bool)
        certificates: list[dict[str, Any]] = []
        base_seed = int(opts.get("seed", ctx.seed))
        for i in range(b):
            seed = (base_seed + i) % 2**63  # one recorded seed per image
            if target is None:
                cert, counts = certify(sampler, x[i], n0, n, alpha, seed, ctx)
            else:
                cert, counts = certify_at_radius(sampler, x[i], float(target), n0, n, alpha, seed, ctx)
            probs[i] = counts.float() / max(int(counts.sum()), 1)
            labels[i], abstained[i] = cert.label, cert.abstained
            confidence[i], radius[i] = cert.p_a_lower, cert.radius
            certificates.append(cert.to_json())
        return Decision(labels=labels, confidence=confidence, probabilities=probs, abstained=abstained,
                        radius=radius, details={"certificate": certificates})

    def public_settings(self) -> dict[str, Any]:
        covers = ("the bundle's DnCNN denoiser for this sigma, then the plain base classifier"
                  if self.use_denoiser else "the bundle's classifier trained with Gaussian noise at this sigma")
        return {"sigma": self.sigma, "sigmas": [float(s) for s in self.sigmas], "denoiser": self.use_denoiser,
                "n": self.n, "n0": self.n0, "alpha": self.alpha, "batch_size": self.batch_size,
                "forward_batch": self.forward_batch, "optimize": self.optimize, "norm": "L2", "certificate_covers": covers}


def _setting(env: DefenseEnv, name: str, default: Any) -> Any:
    certify_cfg = getattr(env.settings, "certify", None)
    return getattr(certify_cfg, name, default) if certify_cfg is not None else default


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)}; smoothing takes {sorted(_OPTIONS)}")
    section = env.bundle.defense("smoothing")
    use_denoiser = bool(options.get("denoiser", False))
    optimize = bool(options.get("optimize", True))
    sigma = float(options.get("sigma", 0.25))
    shape = tuple(env.bundle.input_spec.shape)
    fast = (lambda m: optimize_for_cpu(m, shape)) if optimize else (lambda m: m)
    eager_classifiers: dict[float, Classify] = {}
    eager_denoisers: dict[float, Classify] = {}
    if use_denoiser:
        for s, rec in section.get("denoisers", {}).items():
            eager_denoisers[float(s)] = _frozen(env.bundle.module(rec["artifact"], env.device))
    else:
        for s, rec in section.get("classifiers", {}).items():
            eager_classifiers[float(s)] = env.bundle.classifier(env.device, artifact=rec["artifact"])
    classifiers = {s: fast(m) for s, m in eager_classifiers.items()}
    denoisers = {s: fast(m) for s, m in eager_denoisers.items()}
    available = sorted(denoisers if use_denoiser else classifiers)
    if sigma not in available:
        what = "denoisers" if use_denoiser else "noise-trained classifiers"
        raise ValueError(f"sigma {sigma:g}: the bundle has {what} for sigma in {available}")
    n = int(options.get("n", _setting(env, "predict_n", 1000)))
    n0 = int(options.get("n0", _setting(env, "predict_n0", 64)))
    alpha = float(options.get("alpha", _setting(env, "alpha", 0.001)))
    batch_size = int(options.get("batch_size", _setting(env, "batch_size", 8000)))
    forward_batch = int(options.get("forward_batch", 1000))
    if not (n >= 1 and n0 >= 1 and batch_size >= 1 and forward_batch >= 1 and 0 < alpha < 1):
        raise ValueError("smoothing needs n >= 1, n0 >= 1, batch_size >= 1, forward_batch >= 1 and 0 < alpha < 1")
    decider = SmoothingDecider(classifiers=classifiers, denoisers=denoisers, sigma=sigma, denoiser=use_denoiser,
                               n=n, n0=n0, alpha=alpha, batch_size=batch_size,
                               num_classes=env.bundle.input_spec.num_classes, device=env.device,
                               forward_batch=forward_batch, optimize=optimize, input_shape=shape,
                               eager_classifiers=eager_classifiers, eager_denoisers=eager_denoisers)
    if optimize and env.inference_classifier is not None:  # the runtime's copy: no second trace
        decider._fast[id(env.classifier)] = (env.classifier, env.inference_classifier)
    return [decider]


def _frozen(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


__all__ = ["ABSTAIN", "Certificate", "NoiseSampler", "SmoothingDecider", "alpha_spending", "build",
           "certify", "certify_at_radius", "geometric_schedule", "lower_confidence_bound", "optimize_for_cpu",
           "predict_from_counts", "radius_from", "upper_confidence_bound"]
