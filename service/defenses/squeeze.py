"""Feature squeezing (Xu et al. 2018) as a detector usable in any pipeline.

Score: the largest L1 distance between the base classifier's softmax on the image and on
its squeezed copies (1-bit depth, 2x2 median); reject above the threshold the bundle's
`squeeze` section was calibrated to on clean validation digits (for that classifier).
No options: the threshold only holds for the calibrated squeezers and classifier.
"""

from __future__ import annotations

from typing import Any

import torch

from models.recipes.squeeze import squeeze_scores
from service.defenses.base import Classify, Component, DefenseEnv, Detection, RunContext


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
