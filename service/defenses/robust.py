"""Adversarial training (Madry et al. 2018 and successors): the defense lives in the weights.

The `robust` pipeline classifies with the bundle's adversarially trained network
(`robust_classifier`, built by models/recipes/robust.py: PGD-AT, TRADES or FGSM with a random
start) instead of the base classifier. Nothing runs at request time besides that network:
no detector, no randomness, so it is deterministic and differentiable end to end, and
`shieldserve export` hands users exactly the function the service answers with.

The bundle's `robust` section names the artifact and the threat model it was trained for
(L-inf eps); a bundle without it cannot serve this pipeline and says how to add it.
"""

from __future__ import annotations

from typing import Any

from models.bundle import BundleError, Classifier
from service.defenses.base import Classify, Component, DefenseEnv, RunContext

OPTIONS: set[str] = set()


class RobustClassifierAdapter(Component):
    """Classify with the adversarially trained network instead of the base classifier."""

    role = "adapter"
    defense = "robust"

    def __init__(self, network: Classifier, artifact: str, threat_model: dict[str, Any],
                 metrics: dict[str, Any]) -> None:
        self.network, self.artifact = network, artifact
        self.threat_model, self.metrics = threat_model, metrics

    def adapt(self, x: Any, classifier: Classifier, ctx: RunContext) -> Classify:
        return self.network

    def public_settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"classifier": self.artifact, "trained_against": self.threat_model}
        if "method" in self.metrics:
            out["method"] = self.metrics["method"]
        return out


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"the robust defense takes no options, got {sorted(unknown)}")
    try:
        section = env.bundle.defense("robust")
    except BundleError:
        raise BundleError(f"bundle {env.bundle.path} has no adversarially trained classifier; add one with "
                          f"`shieldserve train --out {env.bundle.path} --steps robust`, or remove the "
                          f"`robust` pipeline from the configuration") from None
    artifact = section.get("classifier", "robust_classifier")
    network = env.bundle.classifier(env.device, artifact=artifact)
    return [RobustClassifierAdapter(network, artifact, dict(section.get("threat_model", {})),
                                    dict(env.bundle.artifact(artifact).get("metrics", {})))]
