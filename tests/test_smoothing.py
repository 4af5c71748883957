"""Randomized smoothing's statistics and sampling, on known counts and real digits."""

from __future__ import annotations

import math

import pytest
import torch
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binom, norm

from service.defenses.smoothing import (
    ABSTAIN, CERTIFIED, CONTINUE, MIN_ALPHA, NOISE_GRID, REFUSED, CopyNoise, NoiseSampler, SequentialTest,
    alpha_spending, certify, certify_at_radius, certify_batch_at_radius, geometric_schedule, lower_bounds,
    lower_confidence_bound, noisy_copies, optimize_for_cpu, predict_from_counts, radius_from, resolve_precision,
    sampling_network, standard_normal64, threshold_counts, upper_bounds, upper_confidence_bound,
)


def test_radius_formula_on_known_counts() -> None:
    # all n samples agree: the Clopper-Pearson lower bound is alpha ** (1 / n) in closed form
    n, alpha, sigma = 100_000, 0.001, 0.25
    p = lower_confidence_bound(n, n, alpha)
    assert p == pytest.approx(alpha ** (1 / n), rel=1e-12)
    assert radius_from(p, sigma) == pytest.approx(sigma * norm.ppf(alpha ** (1 / n)), rel=1e-9)
    assert radius_from(p, sigma) == pytest.approx(0.9532, abs=1e-3)
    # 990 of 1000: the bound p solves P(X >= 990 | p) = alpha
    p = lower_confidence_bound(990, 1000, alpha)
    assert binom.sf(989, 1000, p) == pytest.approx(alpha, rel=1e-6)
    assert radius_from(p, 0.5) == pytest.approx(0.5 * norm.ppf(p))
    assert 0.97 < p < 0.99
    # the upper bound mirrors it
    q = upper_confidence_bound(10, 1000, alpha)
    assert binom.cdf(10, 1000, q) == pytest.approx(alpha, rel=1e-6)
    assert lower_confidence_bound(0, 10, alpha) == 0.0 and upper_confidence_bound(10, 10, alpha) == 1.0
    assert radius_from(0.5, 0.25) == 0.0


def _coin(x: torch.Tensor) -> torch.Tensor:
    """A base classifier whose answer under noise is a fair coin between classes 0 and 1."""
    heads = (x.flatten(1)[:, 0] > 0.5).float()
    return torch.stack([heads, 1 - heads] + [torch.full_like(heads, -1.0)] * 8, dim=1)


def test_tie_between_top_two_classes_abstains() -> None:
    assert predict_from_counts(torch.tensor([500, 500, 0, 0]), alpha=0.001) == ABSTAIN
    assert predict_from_counts(torch.tensor([520, 480, 0, 0]), alpha=0.001) == ABSTAIN
    assert predict_from_counts(torch.tensor([900, 100, 0, 0]), alpha=0.001) == 0
    x = torch.full((1, 28, 28), 0.5)
    sampler = NoiseSampler(_coin, sigma=0.25, num_classes=10, batch_size=500)
    cert, counts = certify(sampler, x, n0=100, n=4000, alpha=0.001, seed=3)
    assert cert.abstained and cert.label == ABSTAIN and cert.radius == 0.0
    assert abs(int(counts[0]) - int(counts[1])) < 400 and int(counts.sum()) == 4000
    assert predict_from_counts(counts, alpha=0.001) == ABSTAIN


@pytest.fixture(scope="module")
def smoothing_classifier(quick_bundle):
    from models.bundle import Bundle

    bundle = Bundle.load(quick_bundle)
    rec = bundle.defense("smoothing")["classifiers"]["0.25"]
    return bundle.classifier("cpu", artifact=rec["artifact"])


def test_certificate_reproduced_from_its_seed(mnist, smoothing_classifier) -> None:
    x = mnist.test.x[0]
    sampler = NoiseSampler(smoothing_classifier, 0.25, 10, batch_size=256)
    a, counts_a = certify(sampler, x, 64, 1000, 0.001, seed=12345)
    b, counts_b = certify(sampler, x, 64, 1000, 0.001, seed=12345)
    assert torch.equal(counts_a, counts_b)
    assert (a.label, a.radius, a.p_a_lower, a.seed) == (b.label, b.radius, b.p_a_lower, 12345)
    _, counts_c = certify(NoiseSampler(_coin, 0.25, 10, 256), x, 64, 1000, 0.001, seed=12346)
    assert not torch.equal(counts_a, counts_c)


def test_optimized_model_gives_the_same_certificate(mnist, smoothing_classifier) -> None:
    # the frozen TorchScript copy is the same function: same logits (to rounding), same counts;
    # and the forward-pass batch never changes the noise, so neither the counts
    fast = optimize_for_cpu(smoothing_classifier, (1, 28, 28))
    assert isinstance(fast, torch.jit.ScriptModule)
    x = mnist.test.x[:50]
    with torch.inference_mode():
        assert torch.allclose(fast(x), smoothing_classifier(x), atol=1e-4)
    ref, counts = certify(NoiseSampler(smoothing_classifier, 0.25, 10, 512), x[3], 64, 2000, 0.001, seed=7)
    for f, forward in ((fast, None), (fast, 100), (smoothing_classifier, 37)):
        cert, c = certify(NoiseSampler(f, 0.25, 10, 512, forward), x[3], 64, 2000, 0.001, seed=7)
        assert torch.equal(c, counts) and (cert.label, cert.radius) == (ref.label, ref.radius)
    assert optimize_for_cpu(_coin, (1, 28, 28)) is _coin  # not a module: used as it is


def test_certifies_real_digits(mnist, smoothing_classifier) -> None:
    sampler = NoiseSampler(smoothing_classifier, 0.25, 10, batch_size=500)
    test = mnist.test.per_class(1)
    right = 0
    for i in range(len(test)):
        cert, _ = certify(sampler, test.x[i], 64, 1000, 0.001, seed=i)
        if not cert.abstained:
            assert cert.radius == pytest.approx(0.25 * norm.ppf(cert.p_a_lower))
            right += int(cert.label == int(test.y[i]))
    assert right >= 7, f"only {right}/10 digits certified correctly"


def test_radius_decision_stops_early_on_a_sure_input() -> None:
    def always_seven(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full((z.shape[0],), 7), 10).float()

    x = torch.zeros(1, 28, 28)
    sampler = NoiseSampler(always_seven, 0.25, 10, batch_size=1000)
    cert, _ = certify_at_radius(sampler, x, radius=0.5, n0=64, n_max=100_000, alpha=0.001, seed=0)
    assert cert.certified and cert.label == 7 and cert.radius >= 0.5
    assert cert.samples == 64 + 361, cert.samples  # all agree: decided at the first look, (alpha/4) ** (1/n) > Phi(2)
    # a radius no count of n_max samples could certify is refused before any sample: only the
    # label is asked, settled at the label question's first look (16 unanimous samples)
    cert, _ = certify_at_radius(sampler, x, radius=5.0, n0=64, n_max=4000, alpha=0.001, seed=0)
    assert cert.certified is False and cert.n == 16 and cert.label == 7 and 0 < cert.radius < 5.0
    # a coin is refused at r = 0.25 long before n_max
    cert, _ = certify_at_radius(NoiseSampler(_coin, 0.25, 10, 1000), torch.full((1, 28, 28), 0.5),
                                radius=0.25, n0=64, n_max=100_000, alpha=0.001, seed=0)
    assert cert.certified is False and cert.samples < 5000
    assert geometric_schedule(1000, first=128) == [128, 256, 512, 1000]
    assert geometric_schedule(1000, first=32, factor=1.5) == [32, 48, 72, 108, 162, 243, 364, 546, 820, 1000]
    # the first look is the first at which a unanimous count certifies: easy images take one pass
    for sigma, first in ((0.5, 49), (0.25, 361)):
        test = SequentialTest(0.5, sigma, 4000, 0.001)
        assert test.schedule[0] == first and test.thresholds(0)[0] == first
        assert SequentialTest(0.5, sigma, 4000, 0.001, first=first - 1).thresholds(0)[0] > first - 1
    assert math.isclose(sum(alpha_spending(0.001, len(geometric_schedule(100_000)))), 0.001)
    # a quarter of alpha at the first look, a quarter at the last, the rest even between; the
    # parts always sum to alpha (the union bound)
    for looks in (1, 2, 3, 12):
        parts = alpha_spending(0.001, looks)
        assert len(parts) == looks and math.isclose(sum(parts), 0.001) and min(parts) > 0
    parts = alpha_spending(0.001, 12)
    assert math.isclose(parts[0], 0.00025) and math.isclose(parts[-1], 0.00025)
    assert all(math.isclose(p, 0.0005 / 10) for p in parts[1:-1])


def test_vectorised_bounds_match_the_scalar_ones() -> None:
    k = np.array([0, 1, 17, 99, 100])
    lo, hi = lower_bounds(k, 100, 0.01), upper_bounds(k, 100, 0.01)
    assert lo.tolist() == pytest.approx([lower_confidence_bound(int(v), 100, 0.01) for v in k], abs=1e-12)
    assert hi.tolist() == pytest.approx([upper_confidence_bound(int(v), 100, 0.01) for v in k], abs=1e-12)
    # the sequential test's integer thresholds say what comparing the bounds with p* says
    # (certifying at the look's alpha, refusing at refuse_level), and with 1/2 for answers
    test = SequentialTest(0.5, 0.5, 1000, 0.001)
    assert test.refuse_level == 0.2
    for look, n in enumerate(test.schedule):
        k = np.arange(n + 1)
        a = test.alphas[look]
        for target, got in ((test.target, test.verdicts(look, k)), (0.5, test.answer_verdicts(look, k))):
            want = np.where(lower_bounds(k, n, a) > target, CERTIFIED,
                            np.where(upper_bounds(k, n, test.refuse_level) < target, -1, CONTINUE))
            assert np.array_equal(got, want)


def _simulate(test: SequentialTest, p: float, runs: int, rng: np.random.Generator) -> tuple[float, float]:
    """The sequential test on `runs` simulated images whose c_A has probability p under noise:
    binomial counts drawn look by look, each run stopped at its first decisive look. Returns
    (fraction certified, fraction whose reported lower bound, where it stopped, exceeds p)."""
    k = np.zeros(runs, dtype=np.int64)
    done, certified, over = (np.zeros(runs, dtype=bool) for _ in range(3))
    drawn = 0
    for look, size in enumerate(test.schedule):
        k += rng.binomial(size - drawn, p, runs)
        drawn = size
        verdict, lower = test.decide(look, k)
        stop = ~done & ((verdict != CONTINUE) | (look == len(test.schedule) - 1))
        certified |= stop & (verdict == CERTIFIED)
        over |= stop & (lower > p)
        done |= stop
    return float(certified.mean()), float(over.mean())


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_sequential_test_error_rate_stays_below_alpha(sigma: float) -> None:
    # The worst case for soundness: pA exactly at the target p* = Phi(r / sigma). A certificate
    # at r is then wrong whenever it is given; the union bound promises that happens at most
    # alpha of the time, whatever look it stops at. alpha = 0.1 so that the check has power: the
    # same looks each at the full alpha (no spending; a wrong procedure) are caught.
    alpha, runs, rng = 0.1, 20_000, np.random.default_rng(20)
    margin = 3 * math.sqrt(alpha * (1 - alpha) / runs)
    test = SequentialTest(0.5, sigma, 1000, alpha)
    for p in (test.target, test.target - 0.005):
        certified, over = _simulate(test, p, runs, rng)
        assert certified <= alpha + margin and over <= alpha + margin, (p, certified, over)
    naive = SequentialTest(0.5, sigma, 1000, alpha)
    naive.alphas = [alpha] * len(naive.schedule)
    wrong, _ = _simulate(naive, naive.target, runs, rng)
    assert wrong > alpha + margin, wrong
    # and the lower bound it reports stays valid for an input it certifies easily
    _, over = _simulate(test, 0.995, runs, rng)
    assert over <= alpha + margin


def test_sound_noise_lies_on_the_grid_and_is_float64_gaussian() -> None:
    x = torch.rand(2, 1, 28, 28)
    out, work = torch.empty(2 * 500, 1, 28, 28), torch.empty(2 * 500, 1, 28, 28, dtype=torch.float64)
    streams = [CopyNoise(784, torch.Generator().manual_seed(s)) for s in (1, 2)]
    noisy = noisy_copies(out, x, 0.5, streams, work)
    cells = noisy.double() / NOISE_GRID
    assert torch.equal(cells, cells.round())  # Q(x + e): every value a multiple of the grid
    e = (noisy.view(2, 500, -1) - x.view(2, 1, -1)) / 0.5
    assert abs(float(e.std()) - 1) < 0.01 and abs(float(e.mean())) < 0.01
    # the same image's copies depend only on its own stream, not on the others drawn with it
    alone = noisy_copies(torch.empty(500, 1, 28, 28), x[1:], 0.5, [CopyNoise(784, torch.Generator().manual_seed(2))],
                         torch.empty(500, 1, 28, 28, dtype=torch.float64))
    assert torch.equal(alone, noisy[500:])
    # float64 noise: not float32 noise widened (Voracek & Hein's lattice comes from the latter)
    raw = standard_normal64(torch.empty(10_000, dtype=torch.float64), torch.Generator().manual_seed(0))
    assert float((raw.float().double() != raw).double().mean()) > 0.99


@pytest.mark.parametrize("size", [1, 7, 784_001])
def test_standard_normal64_is_a_reproducible_standard_normal(size: int) -> None:
    a = standard_normal64(torch.empty(size, dtype=torch.float64), torch.Generator().manual_seed(3))
    b = standard_normal64(torch.empty(size, dtype=torch.float64), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    if size > 1000:  # moments and tails within ~5 standard errors of N(0, 1)'s
        x = a.numpy()
        se = 1 / math.sqrt(size)
        assert abs(x.mean()) < 5 * se and abs(x.var() - 1) < 5 * math.sqrt(2) * se
        assert abs((x ** 4).mean() - 3) < 5 * math.sqrt(96) * se
        for t in (1.0, 2.0, 3.0):
            p = 2 * norm.sf(t)
            assert abs((np.abs(x) > t).mean() - p) < 5 * math.sqrt(p * (1 - p) / size), t


def test_precision_auto_follows_the_cpu_and_bfloat16_is_refused_where_emulated(monkeypatch) -> None:
    import service.defenses.smoothing as sm

    cpu = torch.device("cpu")
    monkeypatch.setattr(sm, "native_bfloat16", lambda: True)
    assert resolve_precision("auto", cpu) == "bfloat16" and resolve_precision("float32", cpu) == "float32"
    monkeypatch.setattr(sm, "native_bfloat16", lambda: False)
    assert resolve_precision("auto", cpu) == "float32"
    with pytest.raises(ValueError, match="native bfloat16"):
        resolve_precision("bfloat16", cpu)
    with pytest.raises(ValueError):
        resolve_precision("float16", cpu)


def test_bfloat16_network_is_a_fixed_function_close_to_the_float32_one(mnist, smoothing_classifier) -> None:
    """The sampled network in bfloat16 (emulated where the CPU lacks it: slow, still correct):
    the same answer for the same input whatever the batch around it (a certificate needs a
    fixed f), and the float32 network's argmax on nearly all noisy digits."""
    shape = tuple(mnist.test.x.shape[1:])
    fast = sampling_network(smoothing_classifier, shape, "bfloat16")
    g = torch.Generator().manual_seed(0)
    x = (mnist.test.x[:200].repeat(5, 1, 1, 1) + 0.25 * torch.randn(1000, *shape, generator=g))
    with torch.inference_mode():
        want = smoothing_classifier(x).argmax(1)
        got = fast(x).argmax(1)
        assert torch.equal(fast(x[:10]).argmax(1), got[:10])
    assert float((got == want).float().mean()) > 0.97


def test_batched_certification_matches_one_image_at_a_time(mnist, smoothing_classifier) -> None:
    x = mnist.test.x[:6]
    seeds = [11, 12, 13, 14, 15, 16]
    together = certify_batch_at_radius(smoothing_classifier, x, 0.25, 0.5, 0, 1000, 0.001, seeds, 10,
                                       batch_size=700, forward_batch=300)
    for i in (0, 4):
        sampler = NoiseSampler(smoothing_classifier, 0.25, 10, batch_size=700, forward_batch=300)
        alone, counts = certify_at_radius(sampler, x[i], 0.5, 0, 1000, 0.001, seed=seeds[i])
        assert torch.equal(counts, together[i][1])
        assert (alone.label, alone.certified, alone.samples) == \
            (together[i][0].label, together[i][0].certified, together[i][0].samples)
    for (cert, counts), y in zip(together, mnist.test.y[:6].tolist()):
        assert cert.n == int(counts.sum()) and cert.samples == cert.n  # n0 = 0: c_A from the clean image
        if cert.certified:
            assert cert.radius >= 0.5 and cert.label == y
            assert cert.n < 1000 or cert.p_a_lower > norm.cdf(2)


def test_standard_normal64_calls_from_one_generator_are_independent_streams() -> None:
    # each call keys its own PCG64 stream by a draw of the torch generator: successive draws
    # (the looks of one certificate) must not repeat or correlate
    g = torch.Generator().manual_seed(5)
    a = standard_normal64(torch.empty(200_000, dtype=torch.float64), g).numpy().copy()
    b = standard_normal64(torch.empty(200_000, dtype=torch.float64), g).numpy().copy()
    assert not np.array_equal(a, b)
    assert abs(float(np.corrcoef(a, b)[0, 1])) < 5 / math.sqrt(200_000)
    assert abs(float(np.corrcoef(a[:-1], a[1:])[0, 1])) < 5 / math.sqrt(200_000)  # Box-Muller's pairs too


@pytest.mark.parametrize("batch_size", [100, 8000])  # one image per noise group, or all together
def test_c_a_is_the_answer_on_each_clean_image(batch_size: int) -> None:
    # n0 = 0: c_A is f's answer on the clean image, computed in the first look's forward pass
    # beside the noise; each image must get its own clean answer, never a noisy copy's
    xs = torch.stack([torch.full((1, 28, 28), v) for v in (0.2, 0.5, 0.8)])

    def exact_or_five(x: torch.Tensor) -> torch.Tensor:  # class 1 + i on clean image i exactly
        same = (x.view(len(x), 1, -1) == xs.view(1, 3, -1)).all(2)
        label = torch.where(same.any(1), same.float().argmax(1) + 1, torch.full((len(x),), 5))
        return torch.nn.functional.one_hot(label, 10).float()

    def by_mean(x: torch.Tensor) -> torch.Tensor:  # noise keeps the mean: clean and noisy agree
        return torch.nn.functional.one_hot((x.flatten(1).mean(1) * 10).round().long(), 10).float()

    out = certify_batch_at_radius(exact_or_five, xs, 0.25, 0.5, 0, 1000, 0.001, [1, 2, 3], 10,
                                  batch_size=batch_size)
    assert [c.count for c, _ in out] == [0, 0, 0] and not any(c.certified for c, _ in out)
    assert [int(counts[5]) for _, counts in out] == [c.n for c, _ in out]  # every copy said 5
    out = certify_batch_at_radius(by_mean, xs, 0.25, 0.5, 0, 1000, 0.001, [1, 2, 3], 10, batch_size=batch_size)
    assert [c.label for c, _ in out] == [2, 5, 8] and all(c.certified for c, _ in out)


def _known_pa(p: float, sigma: float):
    """A deterministic f on one-pixel images at 0 whose clean answer, class 0, has probability
    exactly p under the noise: class 0 where |noisy pixel| < sigma * Phi^-1((1 + p) / 2), else 1."""
    band = sigma * float(norm.ppf((1 + p) / 2))

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((x.flatten(1)[:, 0].abs() >= band).long(), 10).float()
    return f


@pytest.mark.parametrize("sigma", [0.25, 0.5])
def test_served_procedure_stays_sound_with_refusals_and_answers(sigma: float) -> None:
    # certify_batch_at_radius end to end (refusals at their loose level, then "pA > 1/2?"):
    # at pA = p* every certificate at r is wrong, and any reported lower bound above the true
    # pA is wrong; both must stay at most alpha. alpha = 0.1 so the check has power.
    alpha, runs = 0.1, 3000
    margin = 3 * math.sqrt(alpha * (1 - alpha) / runs)
    p_star = float(norm.cdf(0.5 / sigma))
    xs = torch.zeros(runs, 1, 1, 1)
    out = certify_batch_at_radius(_known_pa(p_star, sigma), xs, sigma, 0.5, 0, 1000, alpha, list(range(runs)), 10,
                                  sound=False)
    certified = np.mean([c.certified for c, _ in out])
    over = np.mean([c.p_a_lower > p_star for c, _ in out])
    assert certified <= alpha + margin and over <= alpha + margin, (certified, over)


def test_a_refused_image_is_answered_not_abstained_and_stops_early() -> None:
    # pA = 0.7 cannot reach r = 0.5 at sigma 0.5 (p* = 0.84): refused, but pA > 1/2 is soon
    # settled, so it gets its label with a smaller radius, long before the budget; pA = 0.3
    # abstains
    xs = torch.zeros(40, 1, 1, 1)
    for p, answered in ((0.7, True), (0.3, False)):
        out = certify_batch_at_radius(_known_pa(p, 0.5), xs, 0.5, 0.5, 0, 4000, 0.001, list(range(40)), 10)
        assert sum(not c.abstained for c, _ in out) >= (38 if answered else 0)
        assert sum(c.abstained for c, _ in out) >= (0 if answered else 38)
        assert not any(c.certified for c, _ in out)
        assert np.median([c.samples for c, _ in out]) <= 1000
        for c, _ in out:
            if not c.abstained:
                assert c.label == 0 and 0 < c.radius < 0.5


def test_smoothadv_attack_stays_in_its_ball_and_raises_the_smoothed_loss() -> None:
    """SmoothAdv's attack (the training recipe's `adversarial_eps`): every x' lies in [0, 1]
    within L2 eps of x, a step small enough for the first-order term to dominate raises the
    smoothed soft classifier's loss on every digit, the weights get no gradient, the network's
    mode is restored, and eps 0 leaves the digits as they are."""
    import torch.nn.functional as F

    from models.recipes.smoothing import SmoothingCNN, smoothadv_attack

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = SmoothingCNN().train()
    x = torch.rand((16, 1, 28, 28), generator=gen)
    y = torch.randint(0, 10, (16,), generator=gen)
    noise = 0.5 * torch.randn((2 * 16, 1, 28, 28), generator=gen)

    def smoothed_loss(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            p = F.softmax(net(z.repeat(2, 1, 1, 1) + noise), 1).view(2, 16, -1).mean(0)
            return -p.gather(1, y[:, None]).squeeze(1).log()

    assert torch.equal(smoothadv_attack(net, x, y, noise, 0.0, 3), x)
    for eps, steps in ((0.5, 1), (1.0, 4)):
        adv = smoothadv_attack(net, x, y, noise, eps, steps)
        assert adv.min() >= 0 and adv.max() <= 1
        assert float((adv - x).flatten(1).norm(dim=1).max()) <= eps * (1 + 1e-5)
    # inside [0, 1] (no clipping) and a tiny step: the first-order increase dominates
    x_mid = 0.25 + 0.5 * x
    adv = smoothadv_attack(net, x_mid, y, noise, 1e-3, 1)
    assert bool((smoothed_loss(adv) > smoothed_loss(x_mid)).all())
    assert all(p.grad is None for p in net.parameters()) and net.training


def test_noise_classifier_width_is_recorded_in_its_spec(mnist) -> None:
    """The recipe's `width`/`hidden` shape smoothing_cnn and land in the architecture spec, so
    the bundle rebuilds the trained shape; a spec without them (bundles built before the
    fields existed) builds the width-32 network those bundles were trained with."""
    from models.architectures import build_architecture, builtin_spec
    from models.datasets import Dataset
    from models.recipes.smoothing import recipe, train_noise_classifier

    tiny = Dataset("tiny", mnist.train.per_class(3), mnist.val.per_class(2), mnist.test.per_class(2),
                   mnist.class_names)
    r = recipe("default", width=4, hidden=8, epochs=1, batch_size=32, augment=False)
    net, spec, _ = train_noise_classifier(tiny, r, 0.5, seed=0, step="smoothing_sigma50")
    assert spec["kwargs"]["width"] == 4 and spec["kwargs"]["hidden"] == 8
    rebuilt = build_architecture(spec)
    rebuilt.load_state_dict(net.state_dict())  # same shapes, or this raises
    assert net.body[0].out_channels == 4 and net.head[0].out_features == 8
    old = build_architecture(builtin_spec("smoothing_cnn", in_channels=1, num_classes=10, image_size=28))
    assert old.body[0].out_channels == 32 and old.head[0].out_features == 256


def _thresholds_all_counts(n: int, alpha: float, refuse_level: float, target: float) -> tuple[int, int]:
    """The sequential test's thresholds as they were computed before bisection: both bounds
    at every count 0..n, the first count above the target and the last below it."""
    k = np.arange(n + 1)
    above = np.nonzero(lower_bounds(k, n, alpha) > target)[0]
    below = np.nonzero(upper_bounds(k, n, refuse_level) < target)[0]
    return int(above[0]) if above.size else n + 1, int(below[-1]) if below.size else -1


def test_bisected_thresholds_are_those_of_every_count() -> None:
    # the looks of real tests: budgets up to 100,000, alpha from the smallest served up, radii
    # from 0 (p* = 1/2) to beyond what the budget certifies; p* and 1/2 (the label question)
    for n_max, alphas in ((1, (MIN_ALPHA, 0.001)), (200, (MIN_ALPHA, 1e-6, 0.001, 0.1)),
                          (4000, (MIN_ALPHA, 0.001, 0.1)), (100_000, (MIN_ALPHA, 0.001))):
        for alpha in alphas:
            for radius, sigma in ((0.0, 0.5), (0.25, 0.25), (0.5, 0.5), (1.0, 0.5), (1.5, 0.5), (0.9, 0.25)):
                test = SequentialTest(radius, sigma, n_max, alpha)
                last = len(test.schedule) - 1
                looks = range(last + 1) if n_max <= 4000 else ((last,) if radius in (0.5, 1.5) else ())
                for look in looks:
                    n, a = test.schedule[look], test.alphas[look]
                    for target in {test.target, 0.5}:
                        assert threshold_counts(n, a, test.refuse_level, target) == \
                            _thresholds_all_counts(n, a, test.refuse_level, target), (n_max, alpha, radius, look)
                    if test.certifiable:
                        assert test.thresholds(look) == _thresholds_all_counts(n, a, test.refuse_level, test.target)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 3000), log_alpha=st.floats(math.log10(MIN_ALPHA), math.log10(0.4)),
       refuse_level=st.floats(0.01, 0.5), target=st.one_of(st.floats(0.5, 1.0), st.sampled_from([0.5, 1.0])))
def test_bisected_thresholds_match_every_count_on_random_looks(n: int, log_alpha: float, refuse_level: float,
                                                               target: float) -> None:
    alpha = 10 ** log_alpha
    assert threshold_counts(n, alpha, refuse_level, target) == _thresholds_all_counts(n, alpha, refuse_level, target)


def test_alpha_at_the_served_bound_gives_bounds_without_warnings() -> None:
    # scipy warns (and goes wrong) for alpha near 1e-300; at MIN_ALPHA and the per-look shares
    # of it nothing is printed, and the lower bound is monotone in the count
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for n in (16, 1000, 100_000):
            test = SequentialTest(0.5, 0.5, n, MIN_ALPHA)
            for look in range(len(test.schedule)):
                test.thresholds(look), test.answer_verdicts(look, np.array([0, test.schedule[look]]))
            k = np.arange(0, n + 1, max(1, n // 5000))
            assert np.all(np.diff(lower_bounds(k, n, min(test.alphas))) >= 0)


def test_a_radius_no_count_could_certify_asks_only_for_the_label() -> None:
    # r = 3 at sigma 0.5: p* = Phi(6), beyond a unanimous count of 100,000 at alpha = 0.001
    test = SequentialTest(3.0, 0.5, 100_000, 0.001)
    assert not test.certifiable
    # every count refused at r; the schedule is that of "pA > 1/2?" (radius 0's), not one look of n_max
    assert test.schedule == SequentialTest(0.0, 0.5, 100_000, 0.001).schedule and test.schedule[0] == 16
    for look, n in enumerate(test.schedule):
        assert test.verdicts(look, np.array([0, n // 2, n])).tolist() == [REFUSED] * 3
    # the boundary: certifiable exactly when some look of the test's own schedule certifies a
    # unanimous count
    for radius in np.linspace(1.0, 2.0, 21):
        t = SequentialTest(float(radius), 0.5, 4000, 0.001)
        own = SequentialTest(float(radius), 0.5, 4000, 0.001, first=t._first_decisive_look(4000, 1.5, t.target))
        reachable = any(own.thresholds(look)[0] <= n for look, n in enumerate(own.schedule))
        assert t.certifiable == reachable == own.certifiable, radius
    # served: 40 images of pA = 0.7 and 0.3 at r = 3, a budget of 100,000: each stops where its
    # label is settled, certified false, the radius it has
    xs = torch.zeros(40, 1, 1, 1)
    for p, answered in ((0.9, True), (0.1, False)):
        out = certify_batch_at_radius(_known_pa(p, 0.5), xs, 0.5, 3.0, 0, 100_000, 0.001, list(range(40)), 10)
        assert not any(c.certified for c, _ in out) and all(c.target_radius == 3.0 for c, _ in out)
        assert max(c.samples for c, _ in out) <= 500, max(c.samples for c, _ in out)
        if answered:
            assert all(not c.abstained and c.label == 0 and 0 < c.radius < 3.0 for c, _ in out)
        else:
            assert all(c.abstained for c, _ in out)


@pytest.mark.parametrize("per_copy", [1, 2, 7, 784])
def test_copy_noise_is_addressed_by_copy(per_copy: int) -> None:
    """Copy j of a stream is the same values however the copies are cut into draws, and where
    a draw starts: a later look, a chunk, another question's schedule reads the same copies."""
    copies = 300
    whole = CopyNoise(per_copy, torch.Generator().manual_seed(4)).fill(
        torch.empty(copies, per_copy, dtype=torch.float64), 0)
    rng = np.random.default_rng(per_copy)
    for _ in range(4):
        cuts = sorted({0, copies, *(int(c) for c in rng.integers(0, copies + 1, size=5))})
        stream, out = CopyNoise(per_copy, torch.Generator().manual_seed(4)), torch.empty(copies, per_copy,
                                                                                           dtype=torch.float64)
        for a, b in reversed(list(zip(cuts, cuts[1:]))):  # in any order
            stream.fill(out[a:b], a)
        assert torch.equal(out, whole), cuts
    # another seed, or the stream after it from the same generator (the estimation copies after
    # the selection copies: copy_noise), is another draw
    g = torch.Generator().manual_seed(4)
    CopyNoise(per_copy, g)
    second = CopyNoise(per_copy, g).fill(torch.empty(copies, per_copy, dtype=torch.float64), 0)
    assert not torch.equal(second, whole)
    x = whole.numpy().ravel()
    if x.size > 10_000:  # a standard normal, copy after copy (within-copy Box-Muller pairs too)
        se = 1 / math.sqrt(x.size)
        assert abs(x.mean()) < 5 * se and abs(x.var() - 1) < 5 * math.sqrt(2) * se
        assert abs(float(np.corrcoef(x[:-1], x[1:])[0, 1])) < 5 * se
        half = per_copy // 2  # a copy's value i and i + half come from one pair of uniforms
        pairs = whole[:, :half].numpy().ravel(), whole[:, half:2 * half].numpy().ravel()
        assert abs(float(np.corrcoef(*pairs)[0, 1])) < 5 / math.sqrt(pairs[0].size)


def test_a_question_asked_another_way_reads_the_same_copies() -> None:
    """The estimation copies of one seed are the same at another radius, alpha or budget, and
    whatever n0: the counts after the same number of copies agree, so a client varying what it
    asks gets no fresh draw of the noise (image_seeds keys only the image, sigma and f)."""
    from service.defenses.smoothing import copy_noise

    f = _known_pa(0.8, 0.5)
    x = torch.zeros(1, 1, 1, 1)
    runs = [certify_batch_at_radius(f, x, 0.5, r, n0, n, a, [9], 10, batch_size=bs)[0]
            for r, n0, n, a, bs in [(0.25, 0, 2000, 0.001, 8000), (0.3, 0, 2000, 0.001, 64),
                                    (0.25, 50, 2000, 0.01, 8000), (0.6, 100, 5000, 0.001, 8000)]]
    ns = [c.n for c, _ in runs]
    least = min(ns)
    # counts are cumulative over the same copies: compare each run's counts with a direct read
    # of its first n estimation copies
    for (cert, counts), n in zip(runs, ns):
        _, est = copy_noise(9, 1)
        direct = NoiseSampler(f, 0.5, 10, batch_size=997).counts(x[0], n, est)
        assert torch.equal(counts, direct), (cert, n)
    assert least > 0


def test_a_draw_larger_than_batch_size_is_chunked_with_the_same_noise() -> None:
    # n0 and looks above batch_size: at most batch_size (+1 clean) rows at once, ctx.check()
    # between the chunks, and the counts those of the whole draw (the stream is cut, not changed)
    import service.defenses.smoothing as sm
    from service.defenses.base import RunContext

    f = _known_pa(0.75, 0.5)  # p* = Phi(0.5) = 0.69 at r = 0.25: several looks
    xs = torch.zeros(3, 1, 1, 1)
    seeds = [5, 6, 7]
    whole = certify_batch_at_radius(f, xs, 0.5, 0.25, 300, 3000, 0.001, seeds, 10, batch_size=100_000)
    rows, checks = [], [0]
    real_get = sm._Buffers.get

    def get(self, n):  # type: ignore[no-untyped-def]
        rows.append(n)
        return real_get(self, n)

    sm._Buffers.get = get
    try:
        ctx = RunContext(seed=0, between=lambda: checks.__setitem__(0, checks[0] + 1))
        chunked = certify_batch_at_radius(f, xs, 0.5, 0.25, 300, 3000, 0.001, seeds, 10, batch_size=40, ctx=ctx)
    finally:
        sm._Buffers.get = real_get
    assert max(rows) <= 41, max(rows)
    drawn = sum(c.samples for c, _ in chunked)
    assert min(c.n for c, _ in chunked) > 100, [c.n for c, _ in chunked]  # looks above batch_size too
    assert checks[0] >= drawn / 40
    for (a, ca), (b, cb) in zip(whole, chunked):
        assert torch.equal(ca, cb) and (a.label, a.samples, a.p_a_lower) == (b.label, b.samples, b.p_a_lower)


def test_sampling_stops_at_the_deadline_within_a_chunk_and_after_the_last_draw() -> None:
    from service.defenses.base import DeadlineExceeded, RunContext

    seen = [0]

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen[0] += x.shape[0]
        return torch.nn.functional.one_hot(torch.zeros(x.shape[0], dtype=torch.long), 10).float()

    # n0 = 100,000 selection copies, drawn in chunks of 500 (not at once): stops within a chunk
    # of the moment the work is no longer wanted
    xs = torch.zeros(1, 1, 1, 1)
    ctx = RunContext(seed=0, cancelled=lambda: seen[0] >= 1000)
    with pytest.raises(DeadlineExceeded):
        certify_batch_at_radius(counting, xs, 0.5, 1.0, 100_000, 100_000, 0.001, [1], 10, batch_size=500,
                                ctx=ctx)
    assert seen[0] <= 1000 + 500
    # the last look's draw is checked too: work past the deadline is a 504, not an answer
    seen[0] = 0
    ctx = RunContext(seed=0, cancelled=lambda: seen[0] > 0)
    with pytest.raises(DeadlineExceeded):
        certify_batch_at_radius(counting, xs, 0.5, 0.5, 0, 49, 0.001, [1], 10, batch_size=500, ctx=ctx)
