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


import torch

from service.defenses.squeeze import (  # noqa: F401 - the scores the service serves, re-exported
    SQUEEZERS, bit_depth, median_smooth, squeeze, squeeze_scores,
)

TARGET_FPR = 0.01
BOUND = 0.005          # the calibration's upper confidence bound must be <= this (see above)
CONFIDENCE = 0.95


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
