"""The measures: accuracy with rejection, AUC-ROC, certified accuracy, the certificate invariant.

Conventions (the report states them too):
  clean accuracy        accepted with the right label (a rejected or abstained clean digit is an error)
  false-rejection rate  clean digits rejected by a detector
  robust accuracy       clean digit accepted and right AND its adversarial version rejected,
                        abstained on, or labelled right (a refusal is a defended attack; only a
                        wrong label served to the client is a success for the attacker)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.evaluation.targets import Outcome


def accuracy(o: Outcome, y: np.ndarray) -> float:
    return float(o.correct(y).mean()) if len(y) else float("nan")


def robust_accuracy(clean: Outcome, adv: Outcome, y: np.ndarray) -> float:
    return float((clean.correct(y) & ~adv.wrong(y)).mean()) if len(y) else float("nan")


def clopper_pearson(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact (Clopper-Pearson) two-sided 1 - alpha confidence interval of a proportion:
    `successes` of `n` (e.g. digits robust to an attack). (nan, nan) when n is 0."""
    from scipy.stats import beta

    if n <= 0:
        return float("nan"), float("nan")
    k = min(max(int(successes), 0), int(n))
    lo = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def attack_success(adv: Outcome, y: np.ndarray) -> float:
    """Share of digits whose adversarial version was accepted with a wrong label."""
    return float(adv.wrong(y).mean()) if len(y) else float("nan")


def norms(x: torch.Tensor, adv: torch.Tensor) -> dict[str, float]:
    d = (adv - x).flatten(1)
    return {"mean_l2": float(d.norm(dim=1).mean()), "mean_linf": float(d.abs().max(dim=1).values.mean())}


def auc_roc(negative: np.ndarray, positive: np.ndarray) -> float:
    """P(score of an adversarial > score of a clean digit) + half the ties (Mann-Whitney)."""
    from scipy.stats import rankdata

    neg, pos = np.asarray(negative, float), np.asarray(positive, float)
    neg, pos = neg[~np.isnan(neg)], pos[~np.isnan(pos)]
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([neg, pos]))
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_curve(negative: np.ndarray, positive: np.ndarray) -> tuple[list[float], list[float]]:
    neg, pos = np.asarray(negative, float), np.asarray(positive, float)
    neg, pos = neg[~np.isnan(neg)], pos[~np.isnan(pos)]
    if len(neg) == 0 or len(pos) == 0:
        return [], []
    cuts = np.unique(np.concatenate([neg, pos, [np.inf]]))[::-1]
    fpr = [float((neg >= c).mean()) for c in cuts] + [1.0]
    tpr = [float((pos >= c).mean()) for c in cuts] + [1.0]
    return fpr, tpr


def certified_accuracy(labels: Sequence[int], radii: Sequence[float], y: Sequence[int],
                       radii_grid: Sequence[float], accepted: Sequence[bool] | None = None) -> dict[str, float]:
    """Share certified with the right label at radius >= r (and accepted, when a detector
    runs before the smoothing: the certificate does not cover it)."""
    lab, rad, yy = np.asarray(labels), np.asarray(radii, float), np.asarray(y)
    ok = np.ones(len(yy), bool) if accepted is None else np.asarray(accepted, bool)
    return {f"{r:g}": float((ok & (lab == yy) & (rad >= r)).mean()) if len(yy) else float("nan") for r in radii_grid}


# ---------------------------------------------------------------------- the certificate invariant
@dataclass
class Finding:
    """One adversarial example that fooled a pipeline, as the invariant check sees it."""

    digit: int
    attack: str
    l2: float
    label: int          # the (wrong) label the pipeline gave it


def empirical_robust_accuracy(clean_wrong: np.ndarray, findings: list[Finding], n: int,
                              radii_grid: Sequence[float]) -> dict[str, float]:
    """Upper bound on robust accuracy at L2 radius r from every attack run: a digit counts as
    robust at r unless its clean answer is a wrong label or some attack fooled the pipeline
    (a wrong label accepted) within L2 <= r. Abstentions are not errors here, as the
    certificate promises only that g's answer does not change to another label."""
    smallest = np.full(n, np.inf)
    for f in findings:
        smallest[f.digit] = min(smallest[f.digit], f.l2)
    return {f"{r:g}": float((~np.asarray(clean_wrong, bool) & (smallest > r)).mean()) if n else float("nan")
            for r in radii_grid}


def invariant_check(cert_labels: Sequence[int], cert_radii: Sequence[float], y: Sequence[int],
                    findings: list[Finding], *, radii_grid: Sequence[float], clean_wrong: np.ndarray,
                    recheck: Callable[[Finding], dict[str, Any]] | None = None) -> dict[str, Any]:
    """No attack may find an adversarial example inside a certificate.

    A violation: digit certified with its true label y at radius R, and an adversarial x' with
    ||x' - x||_2 < R that the pipeline labelled with a class other than y. Each candidate is
    re-checked with `recheck` (e.g. PREDICT again with more samples and another seed): a
    confirmed one is a bug. Also: empirical robust accuracy at r >= certified accuracy at r
    for every r of the grid."""
    labels, radii, yy = np.asarray(cert_labels), np.asarray(cert_radii, float), np.asarray(y)
    candidates = []
    for f in findings:
        if labels[f.digit] == yy[f.digit] and f.l2 < radii[f.digit] and f.label != yy[f.digit]:
            row = {"digit": f.digit, "attack": f.attack, "l2": round(f.l2, 4), "radius": round(float(radii[f.digit]), 4),
                   "certified_label": int(labels[f.digit]), "adversarial_label": int(f.label)}
            if recheck is not None:
                row["recheck"] = recheck(f)
                row["confirmed"] = bool(row["recheck"].get("confirmed", True))
            else:
                row["confirmed"] = True
            candidates.append(row)
    cert = certified_accuracy(labels, radii, yy, radii_grid)
    emp = empirical_robust_accuracy(clean_wrong, findings, len(yy), radii_grid)
    order = [{"radius": float(k), "certified": cert[k], "empirical_upper_bound": emp[k], "holds": emp[k] >= cert[k]}
             for k in cert]
    confirmed = [c for c in candidates if c["confirmed"]]
    return {"violations": confirmed, "unconfirmed_candidates": [c for c in candidates if not c["confirmed"]],
            "empirical_vs_certified": order,
            "holds": not confirmed and all(o["holds"] for o in order)}
