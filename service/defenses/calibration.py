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
