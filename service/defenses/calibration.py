"""Calibrating detector thresholds on clean validation data to a target false-rejection rate.

Every detector in shieldserve rejects when its score is above its threshold. The threshold
is the (1 - rate) quantile of the detector's scores on clean validation images, so that at
most `rate` of clean images score above it. A set of detectors that rejects when *any* of
them fires shares the budget: each gets rate / len(set) (a union bound), so the whole set
rejects at most `rate` of clean images.
"""

from __future__ import annotations

import math

import torch


def threshold_for(scores: torch.Tensor, rate: float) -> float:
    """Smallest threshold with at most floor(rate * n) clean scores strictly above it."""
    if not 0.0 <= rate < 1.0:
        raise ValueError("rate must be in [0, 1)")
    s = torch.sort(scores.detach().double().flatten()).values
    n = s.numel()
    if n == 0:
        raise ValueError("no calibration scores")
    allowed = math.floor(rate * n)  # this many may lie above the threshold
    return float(s[n - 1 - allowed])


def joint_thresholds(scores: dict[str, torch.Tensor], rate: float) -> dict[str, float]:
    """Thresholds for detectors that reject together (any fires), sharing `rate` equally."""
    share = rate / max(len(scores), 1)
    return {name: threshold_for(s, share) for name, s in scores.items()}


def rejection_rate(scores: dict[str, torch.Tensor], thresholds: dict[str, float]) -> float:
    """Share of images that at least one detector rejects."""
    rejected = None
    for name, s in scores.items():
        r = s > thresholds[name]
        rejected = r if rejected is None else rejected | r
    return float(rejected.float().mean()) if rejected is not None else 0.0


def calibration_record(thresholds: dict[str, float], rate: float, measured: float, n: int) -> dict:
    """How a bundle's manifest stores a calibration: thresholds and the rate they were set for."""
    return {"thresholds": {k: float(v) for k, v in thresholds.items()}, "target_fpr": rate,
            "measured_val_fpr": round(measured, 6), "calibration_images": n}


# ---------------------------------------------------------------------- with a confidence margin
# A threshold set to exactly `rate` on n calibration digits rejects about `rate` of them, and
# the share it rejects of *new* digits is a binomial estimate away from that: on 500 digits a
# 1% calibration routinely measures 1.5-2% on the test split. The bounded rule below picks the
# loosest thresholds whose false-rejection rate is still <= the target with the stated
# confidence: the one-sided Clopper-Pearson upper bound of k rejected out of n is <= target.


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper confidence bound of a binomial proportion after k successes in n trials."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError("need 0 <= k <= n and n > 0")
    if k == n:
        return 1.0
    alpha = 1.0 - confidence

    def cdf(p: float) -> float:  # P(X <= k | n, p), summed in log space
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return 0.0
        lp, lq = math.log(p), math.log1p(-p)
        terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
                 for i in range(k + 1)]
        m = max(terms)
        return math.exp(m) * sum(math.exp(t - m) for t in terms)

    lo, hi = k / n, 1.0  # cdf falls from >= 1 - alpha at p = k/n (roughly) to 0 at 1
    for _ in range(100):
        mid = (lo + hi) / 2
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def bounded_joint_thresholds(scores: dict[str, torch.Tensor], target: float,
                             confidence: float = 0.95) -> tuple[dict[str, float], float, int]:
    """Thresholds for detectors that reject together (any fires), each given an equal share of a
    rate r as in `joint_thresholds`, with r the largest (a multiple of 1/n) for which the
    Clopper-Pearson upper bound of the set's measured false-rejection rate is <= target.
    Returns (thresholds, the rate r used, the number of calibration digits rejected)."""
    n = len(next(iter(scores.values())))
    best: tuple[dict[str, float], float, int] | None = None
    for allowed in range(math.floor(target * n), -1, -1):
        rate = allowed / n
        thresholds = joint_thresholds(scores, rate)
        k = round(rejection_rate(scores, thresholds) * n)
        if clopper_pearson_upper(k, n, confidence) <= target:
            best = (thresholds, rate, k)
            break
    if best is None:  # even the strictest thresholds (the largest scores) leave too few digits
        raise ValueError(f"{n} calibration digits cannot show a false-rejection rate <= {target} "
                         f"with confidence {confidence}; use more calibration digits")
    return best


def bounded_calibration_record(thresholds: dict[str, float], target: float, confidence: float,
                               scores: dict[str, torch.Tensor], parts: dict[str, int],
                               val_scores: dict[str, torch.Tensor] | None = None,
                               bound: float | None = None) -> dict:
    """The manifest's record of a bounded calibration: `target_fpr` is the rate the detector set
    is meant to stay under, `bound_target` the value the upper confidence bound was held to
    (target_fpr itself, or less where the calibration digits are known to be easier than new
    ones), `fpr_upper_bound` the bound shown on the calibration digits, `calibration_set` where
    those digits came from."""
    n = len(next(iter(scores.values())))
    measured = rejection_rate(scores, thresholds)
    k = round(measured * n)
    record = {"thresholds": {k_: float(v) for k_, v in thresholds.items()}, "target_fpr": target,
              "bound_target": target if bound is None else bound,
              "rule": "one-sided Clopper-Pearson upper bound of the calibration false-rejection rate <= bound_target",
              "confidence": confidence, "calibration_images": n, "calibration_set": dict(parts),
              "measured_calibration_fpr": round(measured, 6),
              "fpr_upper_bound": round(clopper_pearson_upper(k, n, confidence), 6)}
    if val_scores is not None:
        record["measured_val_fpr"] = round(rejection_rate(val_scores, thresholds), 6)
    return record
