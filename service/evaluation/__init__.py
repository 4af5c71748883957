"""Security evaluation of shieldserve's pipelines: `shieldserve evaluate`.

Threat models (each a section of the report):
  oblivious   adversarial digits computed on the base classifier alone, then sent through
              every pipeline (the defense is unknown to the attacker);
  transfer    computed on an ensemble of surrogates the attacker trained on the training
              split (MI-FGSM with input diversity), without the bundle's weights;
  gray-box    computed on the network that labels the input in that pipeline (the
              fingerprinted network, the noise-trained classifier, ...), without the defense's
              secrets (fingerprints, noise draws) and without its detectors;
  adaptive    white-box: BPDA through purifiers, EOT over smoothing's noise, detector-aware
              losses (MagNet, NeuralFP), GMSA against RMC's per-image adaptation;
  black-box   score-only (Square) and label-only (HopSkipJump) attacks that see only what
              /predict answers, with a query budget; in process or over HTTP.

Modules: `targets` (running a pipeline, reaching into its components), `adaptive` (the
differentiable torch modules ART attacks), `attacks` (ART attacks and GMSA), `transfer` (surrogates, MI-FGSM), `blackbox`
(query-budgeted oracles), `metrics`, `report` (report.json, report.md, plots), `harness`.
"""

from service.evaluation.harness import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
