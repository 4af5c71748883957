"""Feature squeezing (Xu et al. 2018) as a detector usable in any pipeline.

Score: the largest L1 distance between the base classifier's softmax on the image and on
its squeezed copies (1-bit depth, 2x2 median); reject above the threshold the bundle's
`squeeze` section was calibrated to on clean validation digits (for that classifier).
No options: the threshold only holds for the calibrated squeezers and classifier.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from service.defenses.base import Classify, Component, DefenseEnv, Detection, RunContext

SQUEEZERS = ("bit_depth_1", "median_2x2")


# ---------------------------------------------------------------------- scores (the recipe calibrates on these)
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


class SqueezeDetector(Component):
    role = "detector"
    defense = "squeeze"

    def __init__(self, squeezers: tuple[str, ...], threshold: float, target_fpr: float) -> None:
        self.squeezers = squeezers
        self.threshold = threshold
        self.target_fpr = target_fpr

    def detect(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> list[Detection]:
        return [Detection("squeezing", squeeze_scores(x, classify, self.squeezers), self.threshold)]

    def public_settings(self) -> dict[str, Any]:
        return {"squeezers": list(self.squeezers), "threshold": self.threshold,
                "calibrated_target_fpr": self.target_fpr}


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    if options:
        raise ValueError(f"squeeze takes no options, got {sorted(options)}")
    section = env.bundle.defense("squeeze")
    if section.get("classifier_sha256") not in (None, env.bundle.artifact("classifier")["sha256"]):
        raise ValueError("the squeeze threshold was calibrated for another classifier; "
                         "rebuild it with `shieldserve train --steps squeeze`")
    cal = section["calibration"]
    return [SqueezeDetector(tuple(section["squeezers"]), float(cal["thresholds"]["squeezing"]),
                            float(cal["target_fpr"]))]
