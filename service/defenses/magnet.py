"""MagNet (Meng & Chen 2017): detectors that reject inputs far from the data manifold, and a
reformer that moves accepted inputs toward it.

Detectors (scores computed here, thresholds from the bundle's manifest):
  reconstruction_l1 / reconstruction_l2   mean |x - AE_I(x)|^p
  divergence_t10 / divergence_t40         JS(softmax(f(x)/T) || softmax(f(AE_II(x))/T)),
                                          f = the base classifier's logits
Reformer: x -> clip(AE(x), 0, 1), AE = the autoencoder the bundle's `magnet.reformer` names
(the recipe picks the one that keeps the most clean validation accuracy).

Options (pipeline config):
  detectors: list of detector names (default: all four) — [] for the reformer alone
  reform:    true (default) | false — false yields the detector alone, so it composes with
             another decider (the `default` pipeline: MagNet detection, then smoothing)
The thresholds and their target rate come from the bundle; they are not a runtime option.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from service.defenses.base import Classify, Component, DefenseEnv, Detection, Purified, RunContext

OPTIONS = {"detectors", "reform"}

DETECTORS: dict[str, dict[str, Any]] = {
    # name -> how it scores; the reference's MNIST detectors plus the CIFAR divergence pair
    "reconstruction_l1": {"kind": "reconstruction", "p": 1, "autoencoder": "magnet_ae_i"},
    "reconstruction_l2": {"kind": "reconstruction", "p": 2, "autoencoder": "magnet_ae_i"},
    "divergence_t10": {"kind": "divergence", "temperature": 10.0, "autoencoder": "magnet_ae_ii"},
    "divergence_t40": {"kind": "divergence", "temperature": 40.0, "autoencoder": "magnet_ae_ii"},
}
REFORMER_AE = "magnet_ae_i"


# ---------------------------------------------------------------------- scores (the recipe calibrates on these)
def reconstruction_error(x: torch.Tensor, recon: torch.Tensor, p: int) -> torch.Tensor:
    """Mean over pixels of |x - AE(x)|^p, one score per image."""
    return (x - recon).abs().pow(p).flatten(1).mean(dim=1)


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Jensen-Shannon divergence between softmax(a/T) and softmax(b/T), one score per image."""
    p = torch.softmax(logits_a.float() / temperature, dim=1)
    q = torch.softmax(logits_b.float() / temperature, dim=1)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * (a.clamp_min(1e-12).log() - b.clamp_min(1e-12).log())).sum(dim=1)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def detector_scores(x: torch.Tensor, autoencoders: dict[str, nn.Module], classify: Any,
                    names: list[str], batch_size: int = 500) -> dict[str, torch.Tensor]:
    """Every named detector's scores on x (batched), as used by calibration and the service."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        recon = {ae: autoencoders[ae](xb) for ae in {DETECTORS[n]["autoencoder"] for n in names}}
        logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for n in names:
            d = DETECTORS[n]
            r = recon[d["autoencoder"]]
            if d["kind"] == "reconstruction":
                out[n].append(reconstruction_error(xb, r, d["p"]))
            else:
                if d["autoencoder"] not in logits:
                    # x and AE(x) in one forward pass: at the service's small batches a pass
                    # costs mostly its fixed overhead, so two of them cost nearly twice one
                    both = classify(torch.cat([xb, r]))
                    logits[d["autoencoder"]] = (both[:len(xb)], both[len(xb):])
                a, b = logits[d["autoencoder"]]
                out[n].append(js_divergence(a, b, d["temperature"]))
    return {n: torch.cat(v) for n, v in out.items()}




class MagnetDetector(Component):
    role = "detector"
    defense = "magnet"

    def __init__(self, autoencoders: dict[str, nn.Module], names: list[str], thresholds: dict[str, float],
                 target_fpr: float) -> None:
        self.autoencoders = autoencoders
        self.names = names
        self.thresholds = {n: float(thresholds[n]) for n in names}
        self.target_fpr = target_fpr

    def detect(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> list[Detection]:
        scores = detector_scores(x, self.autoencoders, classify, self.names)
        return [Detection(n, scores[n], self.thresholds[n]) for n in self.names]

    def public_settings(self) -> dict[str, Any]:
        return {"detectors": self.names, "thresholds": self.thresholds,
                "calibrated_target_fpr": self.target_fpr}


class MagnetReformer(Component):
    role = "purifier"
    defense = "magnet"

    def __init__(self, autoencoder: nn.Module, name: str = REFORMER_AE) -> None:
        self.autoencoder = autoencoder
        self.name = name

    def purify(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> Purified:
        with torch.no_grad():
            out = self.autoencoder(x).clamp(0.0, 1.0)
        return Purified(out)

    def public_settings(self) -> dict[str, Any]:
        return {"reformer": self.name}


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown magnet options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    section = env.bundle.defense("magnet")
    calibration = section["calibration"]
    names = options.get("detectors", list(DETECTORS))
    if not isinstance(names, list) or any(n not in calibration["thresholds"] for n in names):
        raise ValueError(f"magnet detectors must be a list drawn from {sorted(calibration['thresholds'])}, "
                         f"got {names!r}")
    reform = options.get("reform", True)
    if not isinstance(reform, bool):
        raise ValueError(f"magnet reform must be true or false, got {reform!r}")
    if not names and not reform:
        raise ValueError("magnet with no detectors and reform: false does nothing")
    components: list[Component] = []
    built_for = section.get("classifier_sha256")  # absent in bundles built before it was recorded
    if names and built_for not in (None, env.bundle.artifact("classifier")["sha256"]):
        raise ValueError("the magnet thresholds were calibrated jointly with another classifier (its divergence "
                         "detectors read the classifier): rebuild them with `shieldserve train --steps magnet`")
    if names:
        needed = {DETECTORS[n]["autoencoder"] for n in names}
        aes = {ae: env.bundle.module(ae, env.device) for ae in sorted(needed)}
        components.append(MagnetDetector(aes, list(names), calibration["thresholds"],
                                         float(calibration["target_fpr"])))
    if reform:
        reformer_ae = section.get("reformer", {}).get("autoencoder", REFORMER_AE)
        components.append(MagnetReformer(env.bundle.module(reformer_ae, env.device), reformer_ae))
    return components
