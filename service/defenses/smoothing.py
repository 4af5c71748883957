"""Randomized smoothing (Cohen, Rosenfeld & Kolter 2019): certify or abstain.

The smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I), is robust in
L2 around x: if the top class has probability at least pA_lower > 1/2, no perturbation of
norm below R = sigma * Phi^-1(pA_lower) changes g's answer.

  PREDICT(x, n, alpha)      counts of the top two classes; two-sided binomial test; abstain
                            if the p-value > alpha.
  CERTIFY(x, n0, n, alpha)  pick c_A from n0 samples, count it in n fresh samples,
                            pA_lower = one-sided Clopper-Pearson bound at level alpha;
                            abstain if pA_lower < 1/2, else radius sigma * Phi^-1(pA_lower).
  CERTIFY_AT(x, r, ...)     is c_A certified at radius r? Sequential (`SequentialTest`): draw
                            samples on a geometric schedule whose first look is the first at
                            which a unanimous count certifies, and stop as soon as the
                            Clopper-Pearson interval (alpha split over the looks, a union
                            bound) lies wholly above or below Phi(r / sigma). A radius that not
                            even a unanimous count at n_max could certify is refused before any
                            sample, and only "pA > 1/2?" is asked (the label and the radius it
                            has), on the schedule of that question. What /predict runs
                            (`certify_batch_at_radius`: all images of a batch together, c_A
                            from the clean image when n0 = 0); /certify runs CERTIFY.

What the certificate covers (the `denoiser` option):
  false (default)  f is the bundle's classifier trained with noise at this sigma
                   (`smoothing_sigma25` / `smoothing_sigma50`), not the plain base classifier.
  true             f is D then the pipeline's classifier: the bundle's DnCNN denoiser for this
                   sigma, then the plain base classifier (denoised smoothing, Salman et al.
                   2020). Purifiers placed after this decider in the pipeline are part of the
                   pipeline's classifier function and so part of f too.
The certificate is about the smoothed classifier g only; detectors before it are not covered.

All noise comes from the certificate's `seed`: two streams per image (`copy_noise`: the
selection copies and the estimation copies), each addressed by copy (`CopyNoise`: copy j
depends on the seed and j alone), so the same seed reproduces a certificate whatever the
batch size, and another n, n0, alpha or target radius reads the same copies. It is drawn
soundly in float64 and rounded to a grid (see NOISE_GRID: Voracek & Hein 2023). Sampling is
batched: one forward pass per `batch_size` noisy copies, never a Python loop per sample, and
never more than `batch_size` copies of one image drawn at once (a larger draw is made in
chunks, the deadline checked between them: `_count_batch`).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.stats import beta, binomtest, norm

from service.defenses.base import (Classify, Component, Decision, DefenseEnv, RunContext, image_seeds,
                                   optimize_for_cpu)

log = logging.getLogger("shieldserve")

ABSTAIN = -1


# ---------------------------------------------------------------------- the statistics
def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion."""
    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


def upper_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion."""
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def lower_bounds(k: np.ndarray, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """`lower_confidence_bound` on arrays of counts (one scipy call for a whole batch)."""
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    with np.errstate(invalid="ignore"):
        p = beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    return np.where(k <= 0, 0.0, p)


def upper_bounds(k: np.ndarray, n: np.ndarray | int, alpha: float) -> np.ndarray:
    """`upper_confidence_bound` on arrays of counts."""
    k = np.asarray(k, dtype=np.float64)
    n = np.broadcast_to(np.asarray(n, dtype=np.float64), k.shape)
    with np.errstate(invalid="ignore"):
        p = beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1))
    return np.where(k >= n, 1.0, p)


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
    """Cumulative sample counts at which the sequential test looks: first, first*factor, ..., n_max."""
    sizes, n = [], float(first)
    while n < n_max:
        if not sizes or int(n) > sizes[-1]:
            sizes.append(int(n))
        n *= factor
    sizes.append(int(n_max))
    return sizes


# The shares of alpha at the sequential test's first and last looks (the rest is spread evenly
# over the looks between). Most images are decided at the first look (a unanimous count), whose
# size is set by its alpha: a quarter of alpha there instead of 1/22 cuts it from 58 to 49
# samples at sigma 0.5, r = 0.5. A quarter at the last look lets an image that reaches n_max
# decide nearly as a fixed-n CERTIFY would. Chosen on the validation digits
# (docs/defenses/smoothing.md): the same certified accuracy at both sigmas with 31% (sigma 0.5)
# and 12% (sigma 0.25) fewer samples per image than half at the last look and the rest even.
FIRST_LOOK_SHARE = 0.25
LAST_LOOK_SHARE = 0.25


def alpha_spending(alpha: float, looks: int) -> list[float]:
    """How the sequential test splits alpha over its looks: FIRST_LOOK_SHARE of it at the
    first, LAST_LOOK_SHARE at the last, the rest evenly over the looks between (two looks:
    the two shares, rescaled). The parts sum to alpha: the union bound keeps the overall error
    at most alpha."""
    if looks == 1:
        return [alpha]
    first, last = FIRST_LOOK_SHARE, LAST_LOOK_SHARE
    if looks == 2:
        return [alpha * first / (first + last), alpha * last / (first + last)]
    return [alpha * first] + [alpha * (1 - first - last) / (looks - 2)] * (looks - 2) + [alpha * last]


CONTINUE, CERTIFIED, REFUSED = 0, 1, -1
# the level of a refusal's upper bound at each look (see SequentialTest). Chosen on the
# validation digits at sigma 0.5 (docs/defenses/smoothing.md): up to 0.3 it left the certified
# accuracy unchanged there while cutting the samples spent on images that cannot reach the
# target; 0.2 keeps a margin
REFUSE_LEVEL = 0.2
MAX_RADIUS = 10.0  # a target above it is refused (422): no sample budget could certify it
# The smallest alpha a certificate may ask for (422 below it on /certify; a pipeline's or
# certify.alpha below it does not load). scipy's beta.ppf (boost's ibeta inverse) is
# inaccurate below ~1e-305 (a reported lower bound is then no bound, and not monotone in the
# count) and warns on stderr from ~1e-300; at 1e-12, and at the per-look shares of it the
# sequential test spends (~2e-14 at n = 100,000), its lower bounds solve I_p(k, n-k+1) = alpha
# to a relative 5e-12 (checked against mpmath at n up to 100,000 and alpha down to 1e-16, on
# the counts where mpmath converges), are monotone in the count and raise no warning
# (tests/test_smoothing.py): a margin of ~290 orders of magnitude.
MIN_ALPHA = 1e-12


def _first_true(pred: Callable[[int], bool], lo: int, hi: int) -> int:
    """The smallest k in [lo, hi) with pred(k), or hi; pred must be false then true."""
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@functools.lru_cache(maxsize=4096)
def threshold_counts(n: int, alpha: float, refuse_level: float, target: float) -> tuple[int, int]:
    """(k_certified, k_refused) after n samples: the fewest successes whose lower bound at
    `alpha` exceeds `target` (n + 1 if none), and the most whose upper bound at `refuse_level`
    falls below it (-1 if none). The Clopper-Pearson bounds are monotone in k, so each is found
    by bisection: ~2 log2(n) scalar beta.ppf calls (34 at n = 100,000) instead of a pass over
    k = 0..n (1 s at n = 100,000). The same comparisons as that pass, so the same counts
    (tests/test_smoothing.py checks them against it). Cached: shared by every test, radius and
    request that meets the same (n, alpha, refuse level, target)."""
    k_cert = _first_true(lambda k: bool(lower_bounds(np.array([k]), n, alpha)[0] > target), 0, n + 1)
    k_ref = _first_true(lambda k: not bool(upper_bounds(np.array([k]), n, refuse_level)[0] < target), 0, n + 1) - 1
    return k_cert, k_ref


class SequentialTest:
    """Is pA > p* = Phi(radius / sigma)? Anytime-valid by a union bound over the looks.

    At look j (cumulative sample count schedule[j]) the one-sided Clopper-Pearson bounds at
    level alphas[j] are computed from the count k of c_A. CERTIFIED when the lower bound
    exceeds p*, REFUSED when the upper bound falls below it, CONTINUE otherwise (at the last look
    CONTINUE means the budget is spent). Whatever rule stops the sampling, the probability
    that any look's lower bound exceeds the true pA is at most sum(alphas) = alpha: a
    "certified" answer, and the radius reported from the lower bound where it stopped, are
    wrong with probability at most alpha, as for a fixed-n CERTIFY. Refusals spend no alpha of
    the certificate (a wrong refusal costs accuracy, never soundness), so they use a looser
    level of their own, `refuse_level` at every look: an image whose pA is plainly below p*
    stops drawing samples for a radius it will not reach.

    The same looks answer the question behind every answer, "pA > 1/2?" (`answer_verdicts`):
    after a refusal at r an image keeps drawing until its lower bound clears 1/2 (a label with
    the radius that bound gives) or its upper bound falls below 1/2 at `refuse_level` (an
    abstention), so an early refusal does not turn into an abstention. The union bound covers
    this too: it holds for every look at once, whichever question decided where to stop.
    Every method takes arrays: one call decides a whole batch of images.

    `certifiable` is false when not even a unanimous count at any look could certify p*
    (p* too close to 1 for n_max samples at this alpha). Every count is then REFUSED at the
    target from the start, no sample is spent on it, and the schedule is that of "pA > 1/2?"
    (its first look the first at which a unanimous count clears 1/2, as for radius 0): an
    image draws only what its label needs, not n_max.
    """

    def __init__(self, radius: float, sigma: float, n_max: int, alpha: float,
                 first: int | None = None, factor: float = 1.5, refuse_level: float = REFUSE_LEVEL) -> None:
        if not (radius >= 0 and sigma > 0 and n_max >= 1 and 0 < alpha < 1 and 0 < refuse_level < 1):
            raise ValueError("a sequential test needs radius >= 0, sigma > 0, n_max >= 1, 0 < alpha < 1 "
                             "and 0 < refuse_level < 1")
        self.radius, self.sigma, self.alpha = float(radius), float(sigma), float(alpha)
        self.refuse_level = float(refuse_level)
        self.target = float(norm.cdf(self.radius / self.sigma))
        self._set_schedule(n_max, factor, first if first is not None else
                           self._first_decisive_look(n_max, factor, self.target))
        # can any look certify p*? Its best chance is a unanimous count (the same comparison as
        # `thresholds`: k_certified <= n at some look)
        sizes = np.asarray(self.schedule)
        self.certifiable = bool(self.target < 1.0 and (lower_bounds(sizes, sizes, np.asarray(self.alphas))
                                                       > self.target).any())
        if not self.certifiable and first is None:  # only "pA > 1/2?" is asked: its own schedule
            self._set_schedule(n_max, factor, self._first_decisive_look(n_max, factor, 0.5))

    def _set_schedule(self, n_max: int, factor: float, first: int) -> None:
        self.schedule = geometric_schedule(n_max, first=min(first, n_max), factor=factor)
        self.alphas = alpha_spending(self.alpha, len(self.schedule))
        self._thresholds: dict[tuple[int, float], tuple[int, int]] = {}

    def _first_decisive_look(self, n_max: int, factor: float, target: float) -> int:
        """The first look: the fewest samples at which a unanimous count can certify `target`
        (at least 16).

        All n samples agreeing, the lower bound is alpha_1^(1/n), above p* once
        n > ln(alpha_1) / ln(p*). Looking earlier could only refuse, and would cost alpha and a
        forward pass for every image; an easy image is decided in one pass at the first look.
        alpha_1 depends on the number of looks, which depends on the first: a few rounds settle it."""
        if target >= 1.0:
            return n_max
        first = 16
        for _ in range(6):
            a1 = alpha_spending(self.alpha, len(geometric_schedule(n_max, first=min(first, n_max), factor=factor)))[0]
            need = min(n_max, max(16, int(math.log(a1) / math.log(target)) + 1))
            if need == first:
                break
            first = need
        return first

    def thresholds(self, look: int, target: float | None = None) -> tuple[int, int]:
        """(k_certified, k_refused) at this look for `target` (default p*): CERTIFIED iff
        k >= k_certified (lower bound at alphas[look] above the target), REFUSED iff
        k <= k_refused (upper bound at refuse_level below it). The bounds are monotone in k, so
        two bisections settle every count a look can see (`threshold_counts`); computed once
        per look, target and test (tests are cached by their parameters, `sequential_test`),
        so deciding a batch is integer comparisons. p* when not `certifiable`: every count is
        refused, (n + 1, n), with no bound computed."""
        n = self.schedule[look]
        if target is None:
            if not self.certifiable:
                return n + 1, n
            target = self.target
        cached = self._thresholds.get((look, target))
        if cached is None:
            cached = self._thresholds[(look, target)] = threshold_counts(n, self.alphas[look], self.refuse_level,
                                                                         float(target))
        return cached

    def verdicts(self, look: int, k: np.ndarray, target: float | None = None) -> np.ndarray:
        """CERTIFIED, REFUSED or CONTINUE for counts `k` of c_A after schedule[look] samples."""
        k_cert, k_ref = self.thresholds(look, target)
        k = np.asarray(k)
        return np.where(k >= k_cert, CERTIFIED, np.where(k <= k_ref, REFUSED, CONTINUE))

    def answer_verdicts(self, look: int, k: np.ndarray) -> np.ndarray:
        """Is pA > 1/2? CERTIFIED (a label can be given), REFUSED (abstain) or CONTINUE."""
        return self.verdicts(look, k, 0.5)

    def lower(self, look: int, k: np.ndarray) -> np.ndarray:
        """The lower confidence bound on pA at this look (the one a stopped image reports)."""
        return lower_bounds(k, self.schedule[look], self.alphas[look])

    def decide(self, look: int, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(verdicts, lower bounds) for counts `k` of c_A after schedule[look] samples."""
        return self.verdicts(look, k), self.lower(look, k)


@functools.lru_cache(maxsize=256)
def sequential_test(radius: float, sigma: float, n_max: int, alpha: float, first: int | None = None,
                    factor: float = 1.5, refuse_level: float = REFUSE_LEVEL) -> SequentialTest:
    """A `SequentialTest`, made once per set of parameters (its thresholds are then reused)."""
    return SequentialTest(radius, sigma, n_max, alpha, first, factor, refuse_level)


# ---------------------------------------------------------------------- sampling
# The network sees Q(x + e), Q rounding every pixel to a multiple of NOISE_GRID, and the sum
# is formed in float64 from float64 Gaussian noise (Voracek & Hein 2023: in float32, x + e
# carries rounding artefacts that depend on x, which a base classifier can read, and then
# Cohen et al.'s theorem no longer holds for what was sampled). The smoothed function is that
# of h = f o Q, a fixed function of the real point x + e, to which the theorem applies; Q's
# cells (2^-10 wide, far wider than float64's rounding of x + e) make a sample land in another
# cell than the exact sum only with probability ~1e-11 per sample. Q(x + e) is exact in float32.
NOISE_GRID = 2.0 ** -10


def noisy_copies(out: torch.Tensor, x: torch.Tensor, sigma: float, streams: list[CopyNoise],
                 work: torch.Tensor | None, first: int = 0) -> torch.Tensor:
    """Fill `out` (m * G, *shape) with copies [first, first + m) of each of the G images x
    (G, *shape), image j's noise from streams[j]. With `work` (a float64 buffer shaped like
    out): Q(x + sigma * e) computed soundly as described above; without it: x + sigma * e in
    out's dtype (float32 sampling, the practice Voracek & Hein show can be unsound). The
    arithmetic runs once over all G images (a few large passes, not G small ones)."""
    m = out.shape[0] // x.shape[0]

    def fill(noise: torch.Tensor) -> None:
        for j, stream in enumerate(streams):
            stream.fill(noise[j * m:(j + 1) * m], first)
    return _noisy(out, x, sigma, work, fill)


def _noisy(out: torch.Tensor, x: torch.Tensor, sigma: float, work: torch.Tensor | None,
           fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """`noisy_copies` with the standard normal noise written by `fill` into `work` (sound) or
    `out` (float32): the copies of each image x[j] consecutive, as many for each."""
    g = x.shape[0]
    m = out.shape[0] // g
    noise = out if work is None else work
    fill(noise)
    flat = noise.view(g, m, -1)
    if work is None:
        return torch.add(x.reshape(g, 1, -1), flat, alpha=sigma, out=flat).view_as(out)
    # in units of the grid: round(x / grid + e * sigma / grid), integers exact in float32
    torch.add(x.reshape(g, 1, -1).to(torch.float64) / NOISE_GRID, flat, alpha=sigma / NOISE_GRID, out=flat)
    flat.round_()
    return out.copy_(work).mul_(NOISE_GRID)


def standard_normal64(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill the contiguous float64 tensor `out` with standard normal draws: Box-Muller on
    float64 uniforms, in whole-tensor operations (the logarithms, square roots and sines
    vectorised on every core; torch's own float64 `randn` draws one value at a time on one
    thread, at about twice the cost).

    On the CPU the uniforms come from numpy's PCG64 (its default generator) keyed by one 63-bit
    draw of `generator`: it fills float64 uniforms at about half the cost per value of torch's
    mt19937, and those serial draws were the larger part of the noise's cost. The stream
    depends only on `generator`'s state, so a seed still reproduces its certificate; each call
    takes a fresh key, so two calls never share a stream."""
    flat = out.view(-1)
    half = flat.numel() // 2
    if flat.device.type == "cpu":
        key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        rng = np.random.Generator(np.random.PCG64(key))
        rng.random(out=flat.numpy()[:2 * half])
        if flat.numel() % 2:
            flat[-1] = float(rng.standard_normal())
    else:
        if flat.numel() % 2:
            torch.randn(1, generator=generator, dtype=torch.float64, device=flat.device, out=flat[-1:])
        torch.rand(2 * half, generator=generator, dtype=torch.float64, device=flat.device, out=flat[:2 * half])
    _box_muller(flat[:half], flat[half:2 * half])
    return out


def _box_muller(r: torch.Tensor, theta: torch.Tensor) -> None:
    """Uniforms in, standard normals out, in place: each pair (u1 in r, u2 in theta) becomes
    (sqrt(-2 log(1 - u1)) cos(2 pi u2), ... sin(2 pi u2)), the cosines in r, the sines in theta."""
    r.neg_().log1p_().mul_(-2.0).sqrt_()     # u1 in [0, 1): log(1 - u1) is finite
    theta.mul_(2.0 * math.pi)
    cos = torch.cos(theta)
    theta.sin_().mul_(r)                     # r sin(2 pi u2)
    r.mul_(cos)                              # r cos(2 pi u2)


class CopyNoise:
    """The standard normal noise of one image's noisy copies, addressed by copy: on the CPU,
    copy j is made from uniforms [j * U, (j + 1) * U) of one PCG64 stream keyed by a draw of
    `generator` (U: the copy's values rounded up to even), by Box-Muller within the copy (its
    first U/2 uniforms the radii, the rest the angles, both cosines and sines kept). So copy j's
    values depend on the key and j alone: not on how many copies a call draws, where a chunk
    starts, or how many an earlier look drew. One image asked at another radius, alpha or
    budget (another schedule of looks) reads the same copies further or less far, and a client
    jittering what it asks gets no fresh draw (image_seeds keys only the image, sigma and f).

    `fill(out, first)` writes copies [first, first + m) into `out` (m, *shape): float64 on the
    CPU as above; float32 (`sound: false`) or another device: draws of `generator` in call
    order (torch.randn, standard_normal64), reproducible from the seed and the schedule, not
    addressed by copy."""

    def __init__(self, per_copy: int, generator: torch.Generator) -> None:
        self.per_copy, self.generator = int(per_copy), generator
        self.half = (self.per_copy + 1) // 2
        self.cpu = torch.device(generator.device).type == "cpu"
        self.key = int(torch.randint(0, 2**63 - 1, (1,), generator=generator)) if self.cpu else None

    def fill(self, out: torch.Tensor, first: int) -> torch.Tensor:
        if out.dtype != torch.float64:
            return torch.randn(out.shape, generator=self.generator, out=out)
        if not self.cpu or self.key is None:
            return standard_normal64(out, self.generator)
        m, d, h = out.shape[0], self.per_copy, self.half
        if out.numel() != m * d:
            raise ValueError(f"copies of {d} values expected, got a tensor of shape {tuple(out.shape)}")
        u = out.view(m, d) if d == 2 * h else torch.empty(m, 2 * h, dtype=torch.float64)
        bits = np.random.PCG64(self.key)
        bits.advance(int(first) * 2 * h)  # one 64-bit draw per float64 uniform
        np.random.Generator(bits).random(out=u.numpy().reshape(-1))
        _box_muller(u[:, :h], u[:, h:])  # within each copy: its first half the radii
        if d != 2 * h:
            out.view(m, d).copy_(u[:, :d])
        return out


def copy_noise(seed: int, per_copy: int, device: torch.device | str = "cpu") -> tuple[CopyNoise, CopyNoise]:
    """An image's two streams from its seed: the selection copies (n0, c_A) and the
    estimation copies (the counts), apart so that n0 does not shift the estimation noise."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return CopyNoise(per_copy, g), CopyNoise(per_copy, g)


# ---------------------------------------------------------------------- precision
PRECISIONS = ("auto", "float32", "bfloat16")


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices natively (AVX-512 BF16 or AMX; oneDNN's
    own check). Without it torch emulates bfloat16, several times slower than float32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bfloat16 on a CPU that has it natively, else float32. Asking for bfloat16
    where it would be emulated is refused (it would be slower, not faster)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    native = device.type == "cpu" and native_bfloat16()
    if precision == "auto":
        return "bfloat16" if native else "float32"
    if precision == "bfloat16" and not native:
        raise ValueError("precision bfloat16 needs a CPU with native bfloat16 (AVX-512 BF16 or AMX); "
                         "this one has none: use float32 or auto")
    return precision


class BFloat16(torch.nn.Module):
    """f in bfloat16: the input rounded to bfloat16, weights and arithmetic in bfloat16,
    logits back in float32. A fixed function of its input, as f is, so a certificate computed
    by sampling it is a certificate of the classifier smoothed over it (the f that is
    smoothed is this one; /pipelines says so). On a CPU with native bfloat16 about 1.7x the
    forwards/s of the float32 network (docs/defenses/smoothing.md)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        from models.bundle import Classifier

        if isinstance(module, Classifier):  # a fresh one: a used one's feature extractor does not copy
            module = Classifier(module.network, module.spec, module.feature_layer)
        self.module = copy.deepcopy(module).to(torch.bfloat16).eval()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(torch.bfloat16)).float()


def sampling_network(module: torch.nn.Module, shape: tuple[int, ...], precision: str,
                     optimize: bool = True) -> Classify:
    """The network the sampler runs: in `precision` (float32 or bfloat16, resolved); in float32
    TorchScript-optimised for the CPU (optimize_for_cpu) unless `optimize` is off."""
    if precision == "bfloat16":
        fast = BFloat16(module)
        agree = _argmax_agreement(module, fast, shape)
        if agree >= BF16_MIN_AGREEMENT:
            return fast  # eager: TorchScript's frozen copy measured no faster in bfloat16
        # e.g. a user's network that bfloat16 does not suit
        log.warning("smoothing: %s in bfloat16 agrees with float32 on %.1f%% of noisy probes (< %.0f%%); "
                    "sampling it in float32", type(module).__name__, 100 * agree, 100 * BF16_MIN_AGREEMENT)
    return optimize_for_cpu(module, shape) if optimize else module


BF16_MIN_AGREEMENT = 0.98


def _argmax_agreement(f: torch.nn.Module, g: torch.nn.Module, shape: tuple[int, ...], n: int = 512) -> float:
    """Share of noisy probes (uniform pixels plus Gaussian noise, as the sampler feeds) on which
    f and g answer the same class; 0 if g fails on them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, *shape), generator=gen) + 0.5 * torch.randn((n, *shape), generator=gen)
    try:
        with torch.inference_mode():
            return float((f(x).argmax(1) == g(x).argmax(1)).float().mean())
    except RuntimeError:
        return 0.0


class NoiseSampler:
    """Counts f's answers on noisy copies of one image.

    Noise is drawn `batch_size` copies at a time into one preallocated buffer and f runs on
    `forward_batch` copies per forward pass (default min(batch_size, 1000): on a CPU a few
    hundred to a thousand copies per pass keep activations in cache; larger batches are
    slower). Copy j's noise depends only on the seed, j and `sound` (CopyNoise; with `sound`
    off, on batch_size too), never on forward_batch. No Python loop per sample. `sound` (default): `noisy_copies` with float64
    noise and the grid (see NOISE_GRID).
    """

    def __init__(self, f: Classify, sigma: float, num_classes: int, batch_size: int = 1000,
                 forward_batch: int | None = None, sound: bool = True) -> None:
        self.f, self.sigma, self.num_classes, self.batch_size = f, sigma, num_classes, batch_size
        self.forward_batch = max(1, min(batch_size, forward_batch or 1000))
        self.sound = sound
        self._buffers: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _noise_buffers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (self.batch_size, *x.shape)
        bufs = self._buffers
        if bufs is None or bufs[0].shape != shape or bufs[0].dtype != x.dtype or bufs[0].device != x.device:
            work = torch.empty(shape, dtype=torch.float64, device=x.device) if self.sound else None
            bufs = self._buffers = (torch.empty(shape, dtype=x.dtype, device=x.device), work)
        return bufs

    def counts(self, x: torch.Tensor, num: int, noise: CopyNoise | torch.Generator,
               ctx: RunContext | None = None, first: int = 0) -> torch.Tensor:
        """(K,) int64 counts of f(x + e) over copies [first, first + num) of `noise` (a
        generator: a CopyNoise keyed by it); x is one (C, H, W) image."""
        if isinstance(noise, torch.Generator):
            noise = CopyNoise(x.numel(), noise)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=x.device)
        done = 0
        with torch.inference_mode():
            buf, work = self._noise_buffers(x)
            while done < num:
                if ctx is not None:
                    ctx.check()
                m = min(self.batch_size, num - done)
                noisy = noisy_copies(buf[:m], x.unsqueeze(0), self.sigma, [noise],
                                     None if work is None else work[:m], first + done)
                for i in range(0, m, self.forward_batch):
                    labels = self.f(noisy[i:i + self.forward_batch]).argmax(1)
                    counts += torch.bincount(labels, minlength=self.num_classes)
                done += m
            if ctx is not None:  # the last batch may have run past the deadline too
                ctx.check()
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
    selection, estimation = copy_noise(seed, x.numel(), x.device)
    c_a = int(sampler.counts(x, n0, selection, ctx).argmax())
    counts = sampler.counts(x, n, estimation, ctx)
    k = int(counts[c_a])
    p_lower = lower_confidence_bound(k, n, alpha)
    abstained = not p_lower > 0.5  # Cohen et al.: a label only when pA > 1/2 is shown
    cert = Certificate(label=ABSTAIN if abstained else c_a, abstained=abstained,
                       radius=0.0 if abstained else radius_from(p_lower, sampler.sigma),
                       p_a_lower=p_lower, count=k, sigma=sampler.sigma, n0=n0, n=n, alpha=alpha,
                       samples=n0 + n, seed=seed, batch_size=sampler.batch_size,
                       seconds=time.perf_counter() - started)
    return cert, counts


def certify_at_radius(sampler: NoiseSampler, x: torch.Tensor, radius: float, n0: int, n_max: int,
                      alpha: float, seed: int, ctx: RunContext | None = None,
                      first: int | None = None) -> tuple[Certificate, torch.Tensor]:
    """Is the smoothed classifier certified at `radius`? One image through
    `certify_batch_at_radius` (which see), with the sampler's function, sigma and buffers."""
    [(cert, counts)] = certify_batch_at_radius(
        sampler.f, x.unsqueeze(0), sampler.sigma, radius, n0, n_max, alpha, [seed], sampler.num_classes,
        batch_size=sampler.batch_size, forward_batch=sampler.forward_batch, sound=sampler.sound, first=first,
        ctx=ctx)
    return cert, counts


def _count_batch(f: Classify, xs: torch.Tensor, idx: list[int], need: int, streams: list[CopyNoise],
                 sigma: float, num_classes: int, buffers: "_Buffers", forward_batch: int,
                 ctx: RunContext | None, clean_labels: torch.Tensor | None = None, first: int = 0) -> torch.Tensor:
    """(len(idx), K) counts of f on copies [first, first + need) of each image xs[i], i in idx.

    The copies of many images share each forward pass (images grouped up to the buffers'
    rows), so the network runs at efficient batch sizes however few copies each image needs.
    Each image's noise comes from its own stream (`CopyNoise`): copy j of it depends only on
    its seed and j, never on the other images of the batch nor on how the copies are cut. A
    draw larger than the buffers' rows (`batch_size`) is made in chunks of at most that many
    rows (the float32 noise of `sound: false` is torch.randn per chunk, the same values as one
    draw when an image has a multiple of 16 values, as 28x28 has, torch filling in blocks of
    16), so memory stays bounded by batch_size whatever n, n0 or the look asks. `ctx.check()` (the deadline, a
    client gone, the queued batches let in) runs before every group or chunk and once before
    returning. With `clean_labels` (one entry per image of xs), f's answer on each clean image
    xs[i], i in idx, is written to entry i, the clean images riding in their group's (or
    last chunk's) forward pass: one pass fewer per batch (at one image a pass costs mostly its
    fixed overhead). A row's answer depends on that row alone, never on the noise beside it."""
    out = torch.zeros(len(idx), num_classes, dtype=torch.long)

    def labels_of(noisy: torch.Tensor) -> torch.Tensor:
        return torch.cat([f(noisy[r:r + forward_batch]).argmax(1) for r in range(0, noisy.shape[0], forward_batch)])

    if need > buffers.rows:  # one image at a time, in chunks
        for j, i in enumerate(idx):
            stream = streams[i]
            done = 0
            while done < need:
                if ctx is not None:
                    ctx.check()
                m = min(need - done, buffers.rows)
                extra = 1 if clean_labels is not None and done + m == need else 0
                noisy, work = buffers.get(m + extra)

                def fill(noise: torch.Tensor, start: int = first + done) -> None:
                    stream.fill(noise, start)
                _noisy(noisy[:m], xs[i:i + 1], sigma, None if work is None else work[:m], fill)
                if extra:
                    noisy[m] = xs[i]
                answers = labels_of(noisy[:m + extra])
                if extra:
                    clean_labels[i] = answers[m].cpu()
                out[j] += torch.bincount(answers[:m].cpu(), minlength=num_classes)
                done += m
    else:
        per_group = max(1, buffers.rows // need)
        for g0 in range(0, len(idx), per_group):
            if ctx is not None:
                ctx.check()
            group = idx[g0:g0 + per_group]
            rows = len(group) * need
            extra = len(group) if clean_labels is not None else 0
            noisy, work = buffers.get(rows + extra)
            noisy_copies(noisy[:rows], xs[group], sigma, [streams[i] for i in group],
                         None if work is None else work[:rows], first)
            if extra:
                noisy[rows:] = xs[group]
            answers = labels_of(noisy[:rows + extra])
            if extra:
                clean_labels[group] = answers[rows:].cpu()
            labels = answers[:rows]
            owner = torch.arange(len(group)).repeat_interleave(need)
            flat = torch.bincount(owner * num_classes + labels.cpu(), minlength=len(group) * num_classes)
            out[g0:g0 + len(group)] = flat.view(len(group), num_classes)
    if ctx is not None:  # the last draw may have run past the deadline
        ctx.check()
    return out


class _Buffers:
    """Noise buffers for one batch: `rows` copies per forward group (plus the group's clean
    images; a larger draw is made in chunks of `rows`), allocated on first use and reused look
    after look."""

    def __init__(self, shape: tuple[int, ...], rows: int, sound: bool, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.shape, self.rows, self.sound, self.device, self.dtype = shape, rows, sound, device, dtype
        self._noisy: torch.Tensor | None = None
        self._work: torch.Tensor | None = None

    def get(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._noisy is None or self._noisy.shape[0] < rows:
            self._noisy = torch.empty((rows, *self.shape), dtype=self.dtype, device=self.device)
            self._work = torch.empty((rows, *self.shape), dtype=torch.float64, device=self.device) \
                if self.sound else None
        return self._noisy[:rows], None if self._work is None else self._work[:rows]


def certify_batch_at_radius(f: Classify, xs: torch.Tensor, sigma: float, radius: float, n0: int, n_max: int,
                            alpha: float, seeds: list[int], num_classes: int, *, batch_size: int = 8000,
                            forward_batch: int = 1000, sound: bool = True, first: int | None = None,
                            factor: float = 1.5, ctx: RunContext | None = None,
                            ) -> list[tuple[Certificate, torch.Tensor]]:
    """Certify every image of xs at `radius` with the `SequentialTest`, all images together.

    c_A: the top class of n0 noisy selection copies (Cohen et al.), or with n0 = 0 the answer
    of f on the clean image (a choice made without the estimation noise, so the test's
    guarantee holds as with selection copies; one forward pass instead of n0). Then, look by
    look, every image still undecided gets its next copies, all of them in shared forward
    passes; an image leaves as soon as it is certified, or refused with a lower bound that
    settles "label or abstain" (see `SequentialTest`). A target no count could certify (not
    `certifiable`) is refused for every image before any sample: each draws only what "pA > 1/2?"
    needs, and its certificate says certified false with the radius its lower bound gives.
    Returns per image the certificate and the counts of its estimation copies.
    """
    started = time.perf_counter()
    b = xs.shape[0]
    test = sequential_test(float(radius), float(sigma), int(n_max), float(alpha), first, factor)
    per_image = int(np.prod(xs.shape[1:]))
    selection, estimation = zip(*(copy_noise(s, per_image, xs.device) for s in seeds)) if b else ((), ())
    buffers = _Buffers(tuple(xs.shape[1:]), batch_size, sound, xs.device, xs.dtype)
    counts = torch.zeros(b, num_classes, dtype=torch.long)
    lower = np.zeros(b)
    verdict = np.full(b, CONTINUE)
    # refused at the target radius, still asking "pA > 1/2?"; every image from the start when
    # no count could certify the target (the test's schedule is then that question's)
    refused = np.full(b, not test.certifiable)
    used = np.zeros(b, dtype=np.int64)
    with torch.inference_mode():
        c_a = (_count_batch(f, xs, list(range(b)), n0, list(selection), sigma, num_classes, buffers, forward_batch,
                            ctx).argmax(1) if n0 > 0 else torch.zeros(b, dtype=torch.long))
        active, drawn = list(range(b)), 0
        for look, size in enumerate(test.schedule):
            # n0 = 0: c_A is f's answer on the clean image, computed in the first look's passes
            # (it is known before any count is read, and no noise enters it)
            counts[active] += _count_batch(f, xs, active, size - drawn, list(estimation), sigma, num_classes, buffers,
                                           forward_batch, ctx, clean_labels=c_a if n0 == 0 and look == 0 else None,
                                           first=drawn)
            drawn = size
            k = counts[active, c_a[active]].numpy()
            v = test.verdicts(look, k)
            answer = test.answer_verdicts(look, k)
            # refused at r: stop where a label can be given, else go on with "pA > 1/2?" alone
            refused[np.asarray(active)[(v == REFUSED) & (answer != CERTIFIED)]] = True
            v = np.where(refused[active] & (v != CERTIFIED), np.where(answer == CONTINUE, CONTINUE, REFUSED), v)
            stop = (v != CONTINUE) | (look == len(test.schedule) - 1)
            stopped = [i for i, s in zip(active, stop) if s]
            if stopped:
                verdict[stopped], used[stopped] = v[stop], size
                lower[stopped] = test.lower(look, k[stop])
            active = [i for i, s in zip(active, stop) if not s]
            if not active:
                break
    seconds = time.perf_counter() - started
    out = []
    for i in range(b):
        p_lower = float(lower[i])
        abstained = not p_lower > 0.5  # Cohen et al.: a label only when pA > 1/2 is shown
        label = int(c_a[i])
        cert = Certificate(label=ABSTAIN if abstained else label, abstained=abstained,
                           radius=0.0 if abstained else radius_from(p_lower, sigma), p_a_lower=p_lower,
                           count=int(counts[i, label]), sigma=sigma, n0=n0, n=int(used[i]), alpha=alpha,
                           samples=n0 + int(used[i]), seed=seeds[i], batch_size=batch_size, seconds=seconds,
                           target_radius=radius, certified=bool(verdict[i] == CERTIFIED) and not abstained)
        out.append((cert, counts[i]))
    return out


# ---------------------------------------------------------------------- the decider
_OPTIONS = {"sigma", "denoiser", "n", "n0", "alpha", "batch_size", "forward_batch", "optimize", "target_radius",
            "sound", "precision"}
_REQUEST_OPTIONS = {"sigma", "n", "n0", "alpha", "radius", "seed", "certify"}


class SmoothingDecider(Component):
    """Certifies each image at a target radius (`certify_batch_at_radius`, all images of a
    batch together), or with the full CERTIFY for the largest radius, or abstains.

    Per-request options in RunContext.options: sigma, n, n0, alpha, seed; radius (the target,
    default the pipeline's `target_radius`); certify=True: the full CERTIFY (what /certify
    asks without a radius, and /predict when the pipeline's target_radius is null). With a
    target, n is the sequential test's budget n_max and n0 = 0 selects c_A on the clean image.
    """

    role = "decider"
    defense = "smoothing"
    certifies = True

    def __init__(self, *, classifiers: dict[float, Classify], denoisers: dict[float, Classify],
                 sigma: float, denoiser: bool, n: int, n0: int, alpha: float, batch_size: int,
                 num_classes: int, device: torch.device, forward_batch: int | None = None,
                 optimize: bool = True, input_shape: tuple[int, ...] | None = None,
                 eager_classifiers: dict[float, Classify] | None = None,
                 eager_denoisers: dict[float, Classify] | None = None, target_radius: float | None = 0.5,
                 sound: bool = True, precision: str = "float32") -> None:
        self.classifiers, self.denoisers = classifiers, denoisers
        self.precision = precision  # of the sampled networks (`classifiers`, `denoisers`)
        self.target_radius, self.sound = target_radius, sound
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
        target = opts.get("radius", None if opts.get("certify") else self.target_radius)
        f = self.function(sigma, classify)
        b = x.shape[0]
        if "seed" in opts or ctx.noise_key is None:
            base_seed = int(opts.get("seed", ctx.seed))
            seeds = [(base_seed + i) % 2**63 for i in range(b)]  # one recorded seed per image
        else:
            # the image, sigma and f alone, never what the client may vary freely (a radius, alpha
            # or budget jittered by 1e-12 was a fresh draw: an image that abstained at r = 0.5 got a
            # label 16 times in 30): its noise is the same copies whatever it is asked (CopyNoise),
            # and a certificate holds with probability 1 - alpha over one draw, not over retries
            seeds = image_seeds(ctx.noise_key, x, (sigma, self.use_denoiser))
        if target is None:
            sampler = NoiseSampler(f, sigma, self.num_classes, self.batch_size, self.forward_batch, self.sound)
            done = [certify(sampler, x[i], n0, n, alpha, seeds[i], ctx) for i in range(b)]
        else:
            done = certify_batch_at_radius(f, x, sigma, float(target), n0, n, alpha, seeds, self.num_classes,
                                           batch_size=self.batch_size, forward_batch=self.forward_batch or 1000,
                                           sound=self.sound, ctx=ctx)
        labels = torch.full((b,), ABSTAIN, dtype=torch.long)
        confidence, radius = torch.zeros(b, dtype=torch.float64), torch.zeros(b, dtype=torch.float64)
        probs = torch.zeros(b, self.num_classes)
        abstained = torch.ones(b, dtype=torch.bool)
        certificates: list[dict[str, Any]] = []
        for i, (cert, counts) in enumerate(done):
            probs[i] = counts.float() / max(int(counts.sum()), 1)
            labels[i], abstained[i] = cert.label, cert.abstained
            confidence[i], radius[i] = cert.p_a_lower, cert.radius
            certificates.append(cert.to_json())
        return Decision(labels=labels, confidence=confidence, probabilities=probs, abstained=abstained,
                        radius=radius, details={"certificate": certificates})

    @property
    def composes_followers(self) -> bool:
        """Whether purifiers after this decider run inside f: only with the denoiser, whose f is
        denoiser + the pipeline's classifier; the noise-trained classifier is f by itself."""
        return self.use_denoiser

    def public_settings(self) -> dict[str, Any]:
        covers = ("the bundle's DnCNN denoiser for this sigma, then the plain base classifier"
                  if self.use_denoiser else "the bundle's classifier trained with Gaussian noise at this sigma")
        if self.precision == "bfloat16":
            covers += (" (the denoiser" if self.use_denoiser else " (that network") + \
                " computed in bfloat16, input rounded to bfloat16)"
        return {"sigma": self.sigma, "sigmas": [float(s) for s in self.sigmas], "denoiser": self.use_denoiser,
                "target_radius": self.target_radius, "sound_noise": self.sound, "noise_grid": NOISE_GRID,
                "n": self.n, "n0": self.n0, "alpha": self.alpha, "batch_size": self.batch_size,
                "forward_batch": self.forward_batch, "optimize": self.optimize, "precision": self.precision,
                "norm": "L2", "certificate_covers": covers}


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
    precision = resolve_precision(str(options.get("precision", _setting(env, "precision", "auto"))), env.device)
    fast = functools.partial(sampling_network, shape=shape, precision=precision, optimize=optimize)
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
    target_radius = options.get("target_radius", 0.5)
    if target_radius is not None:
        target_radius = float(target_radius)
        if not 0 <= target_radius <= MAX_RADIUS:
            raise ValueError(f"target_radius must be in [0, {MAX_RADIUS:g}] or null, got {target_radius:g}")
    alpha = float(options.get("alpha", _setting(env, "alpha", 0.001)))
    for name, value in (("alpha", alpha), ("certify.alpha", float(_setting(env, "alpha", 0.001)))):
        if not MIN_ALPHA <= value < 0.5:  # the bounds of certify.alpha and /certify's alpha=
            raise ValueError(f"{name} must be in [{MIN_ALPHA:g}, 0.5), got {value:g} (scipy's Clopper-Pearson "
                             "bounds are not reliable below it; a certificate at 0.5 or more holds less often "
                             "than not)")
    batch_size = int(options.get("batch_size", _setting(env, "batch_size", 8000)))
    forward_batch = int(options.get("forward_batch", 1000))
    if not (n >= 1 and n0 >= (1 if target_radius is None else 0) and batch_size >= 1 and forward_batch >= 1 and 0 < alpha < 1):
        raise ValueError("smoothing needs n >= 1, n0 >= 1 (0 with a target_radius), batch_size >= 1, forward_batch >= 1 and 0 < alpha < 1")
    decider = SmoothingDecider(classifiers=classifiers, denoisers=denoisers, sigma=sigma, denoiser=use_denoiser,
                               n=n, n0=n0, alpha=alpha, batch_size=batch_size,
                               num_classes=env.bundle.input_spec.num_classes, device=env.device,
                               forward_batch=forward_batch, optimize=optimize, input_shape=shape,
                               eager_classifiers=eager_classifiers, eager_denoisers=eager_denoisers,
                               target_radius=target_radius, sound=bool(options.get("sound", True)),
                               precision=precision)
    if optimize and env.inference_classifier is not None:  # the runtime's copy: no second trace
        decider._fast[id(env.classifier)] = (env.classifier, env.inference_classifier)
    return [decider]


def _frozen(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


__all__ = ["ABSTAIN", "CERTIFIED", "CONTINUE", "Certificate", "MAX_RADIUS", "MIN_ALPHA", "NOISE_GRID", "NoiseSampler",
           "CopyNoise", "copy_noise", "threshold_counts",
           "REFUSED", "SequentialTest", "sequential_test", "SmoothingDecider", "alpha_spending", "build", "certify",
           "certify_at_radius", "certify_batch_at_radius", "lower_bounds", "noisy_copies", "upper_bounds", "geometric_schedule", "lower_confidence_bound", "optimize_for_cpu",
           "predict_from_counts", "radius_from", "upper_confidence_bound"]
