"""Feature squeezing (Xu, Evans & Qi, NDSS 2018): calibrate its threshold on the base classifier.

The score of an image is the largest L1 distance between the classifier's softmax on the
image and on each squeezed copy (1-bit depth reduction, 2x2 median smoothing: the paper's
MNIST squeezers). Legitimate digits barely move under squeezing; adversarial ones, whose
perturbation the squeezers remove, often change prediction. The threshold depends on the
classifier, so it is set here, at build time, on the clean validation split.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

SQUEEZERS = ("bit_depth_1", "median_2x2")
TARGET_FPR = 0.01


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
    from service.defenses.calibration import calibration_record, threshold_for

    rate = float(ctx.options.get("squeeze", {}).get("target_fpr", TARGET_FPR))
    clf = ctx.classifier()
    val = squeeze_scores(ctx.dataset.val.x.to(ctx.device), clf)
    thr = threshold_for(val, rate)
    test = squeeze_scores(ctx.dataset.test.x.to(ctx.device), clf)
    ctx.writer.set_defense("squeeze", {
        "calibration": calibration_record({"squeezing": thr}, rate, float((val > thr).float().mean()), len(val)),
        "squeezers": list(SQUEEZERS),
        "classifier_sha256": ctx.writer.manifest["artifacts"]["classifier"]["sha256"],
        "metrics": {"test_fpr": round(float((test > thr).float().mean()), 6)},
    })
