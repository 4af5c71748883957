"""Feature squeezing (Xu, Evans & Qi, NDSS 2018): calibrate its threshold on the base classifier.

The score of an image is the largest L1 distance between the classifier's softmax on the
image and on each squeezed copy (1-bit depth reduction, 2x2 median smoothing: the paper's
MNIST squeezers). Legitimate digits barely move under squeezing; adversarial ones, whose
perturbation the squeezers remove, often change prediction. The threshold depends on the
classifier, so it is set here, at build time.

Calibration: on the training and validation digits (4,000 for mnist5k; no other digits exist
outside the test split), the loosest threshold for which the one-sided 95% Clopper-Pearson
upper bound of the clean false-rejection rate is <= `bound` (default 0.5%, half the 1% target).
The margin is there because the classifier has seen every calibration digit (it trained on
one part and picked its epoch on the other) and is more confident on them than on new digits,
and the squeezing score is the classifier's own softmax: the previous calibration, 1% on the
500 validation digits, rejected 3.0% of the test digits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SQUEEZERS = ("bit_depth_1", "median_2x2")
TARGET_FPR = 0.01
BOUND = 0.005          # the calibration's upper confidence bound must be <= this (see above)
CONFIDENCE = 0.95


def bit_depth(x: torch.Tensor, bits: int) -> torch.Tensor:
    levels = 2 ** bits - 1
    return torch.round(x * levels) / levels


def median_smooth(x: torch.Tensor, size: int = 2) -> torch.Tensor:
    """Median over a size x size window anchored like scipy.ndimage.median_filter (for an even
    size the upper of the two middle values), with reflected borders."""
    pad_lo = size // 2
    pad_hi = size - 1 - pad_lo
    xp = F.pad(x, (pad_lo, pad_hi, pad_lo, pad_hi), mode="reflect")
    b, c, h, w = x.shape
    windows = F.unfold(xp, size).view(b, c, size * size, h, w)
    return windows.sort(dim=2).values[:, :, (size * size) // 2]


def squeeze(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "bit_depth_1":
        return bit_depth(x, 1)
    if name == "median_2x2":
        return median_smooth(x, 2)
    raise ValueError(f"unknown squeezer {name!r}; known: {list(SQUEEZERS)}")


@torch.no_grad()
def squeeze_scores(x: torch.Tensor, classify: Any, squeezers: tuple[str, ...] = SQUEEZERS,
                   batch_size: int = 500) -> torch.Tensor:
    """max over squeezers of ||softmax(f(x)) - softmax(f(squeeze(x)))||_1, one per image."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        p = torch.softmax(classify(xb).float(), dim=1)
        d = torch.stack([(p - torch.softmax(classify(squeeze(xb, s)).float(), dim=1)).abs().sum(1)
                         for s in squeezers])
        out.append(d.max(dim=0).values)
    return torch.cat(out)


def build_step(ctx: "BuildContext") -> None:  # noqa: F821 - models.train.BuildContext
    from models.recipes.magnet import one_thread

    with one_thread():
        _build(ctx)


def _build(ctx: "BuildContext") -> None:  # noqa: F821
    from service.defenses.calibration import bounded_calibration_record, bounded_joint_thresholds

    opts = dict(ctx.options.get("squeeze", {}))
    unknown = set(opts) - {"target_fpr", "bound", "confidence"}
    if unknown:
        raise ValueError(f"unknown squeeze options {sorted(unknown)}")
    rate = float(opts.get("target_fpr", TARGET_FPR))
    bound = float(opts.get("bound", min(BOUND, rate)))
    confidence = float(opts.get("confidence", CONFIDENCE))
    clf = ctx.classifier()
    ds = ctx.dataset
    val = squeeze_scores(ds.val.x.to(ctx.device), clf)
    cal = {"squeezing": torch.cat([val, squeeze_scores(ds.train.x.to(ctx.device), clf)])}
    thresholds, _, _ = bounded_joint_thresholds(cal, bound, confidence)
    record = bounded_calibration_record(thresholds, rate, confidence, cal,
                                        {"validation": len(ds.val), "train": len(ds.train)},
                                        val_scores={"squeezing": val}, bound=bound)
    thr = thresholds["squeezing"]
    test = squeeze_scores(ds.test.x.to(ctx.device), clf)
    ctx.writer.set_defense("squeeze", {
        "calibration": record,
        "squeezers": list(SQUEEZERS),
        "classifier_sha256": ctx.writer.manifest["artifacts"]["classifier"]["sha256"],
        "metrics": {"test_fpr": round(float((test > thr).float().mean()), 6)},
    })
