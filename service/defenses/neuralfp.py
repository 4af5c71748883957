"""Neural Fingerprinting (Dathathri et al. 2018): reject an input whose responses to the secret
fingerprint perturbations match no class's expected responses.

Score: the minimum over k of mean_i ||F(x, dx_i) - dy_i,k|| (`match: min`, what a section
without `match` means), that distance for k = the predicted class (`match: predicted`), or
max(min / tau_min, predicted / tau_pred) with threshold 1 (`match: either`: fires when either
score is above its own jointly calibrated threshold), as the bundle's section says; with F(x, dx) = phi(x + dx) - phi(x) and
phi = normalised logits of the *fingerprinted* network (the math below); reject
above tau, calibrated on clean validation digits (the bundle's `neuralfp` section).

Components: a detector (the fingerprint check, on the fingerprinted network) and, by
default, an adapter that hands the pipeline's decider the same fingerprinted network, so
the label comes from the network whose fingerprints were checked. With
`classify_with: base` the adapter is left out and the base classifier answers.

The fingerprints are secret: they stay in this module's tensors. Public settings name
their number and the threshold only; scores are distances, never fingerprint values.
"""

from __future__ import annotations

from typing import Any

import torch

from models.bundle import Bundle, BundleError, Classifier, finite_number
from service.defenses.base import Classify, Component, DefenseEnv, Detection, RunContext

OPTIONS = {"classify_with"}
# a score costs one forward pass per fingerprint and image: the recipe trains 10 by default; far more
# is a broken or hostile artifact whose warm-up would exhaust memory rather than a setting
MAX_FINGERPRINTS = 1000


# ---------------------------------------------------------------------- scores (the recipe calibrates on these)
def fingerprint_responses(model: Any, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of x, F(x, dx_i) for every i) with one batched forward pass: shapes (B, K), (B, N, K)."""
    b, n = x.shape[0], dx.shape[0]
    probe = torch.cat([x, (x.unsqueeze(1) + dx.unsqueeze(0)).flatten(0, 1)])
    logits = model(probe)
    phi = logits / logits.norm(dim=1, keepdim=True).clamp_min(1e-12)
    phi_x = phi[:b]
    return logits[:b], phi[b:].view(b, n, -1) - phi_x.unsqueeze(1)


def fingerprint_distances(model: Any, x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, D) where D[b, k] = mean_i ||F(x_b, dx_i) - dy_i,k||."""
    logits, resp = fingerprint_responses(model, x, dx)       # (B, K), (B, N, K)
    diff = resp.unsqueeze(2) - dy.unsqueeze(0)                 # (B, N, K_class, K_out)
    return logits, diff.norm(dim=3).mean(dim=1)


MATCHES = ("predicted", "min", "either")


@torch.no_grad()
def fingerprint_scores(model: Any, x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                       batch_size: int = 250, match: str = "min",
                       taus: dict[str, float] | None = None) -> torch.Tensor:
    """One score per image (higher = less like a clean digit): `min` = min_k D_k(x) (the
    closest class's fingerprints), `predicted` = D_k(x) for k = the network's own prediction
    (the fingerprints of the class it answers must match), `either` = max(min / taus["min"],
    predicted / taus["predicted"]): above 1 when either score is above its own threshold."""
    if match not in MATCHES:
        raise ValueError(f"neuralfp match must be one of {MATCHES}, got {match!r}")
    if match == "either" and (taus is None or set(taus) != {"min", "predicted"}):
        raise ValueError("neuralfp match 'either' needs taus {'min': ..., 'predicted': ...}")
    out = []
    for i in range(0, len(x), batch_size):
        logits, d = fingerprint_distances(model, x[i:i + batch_size], dx, dy)
        out.append(match_score(logits, d, match, taus))
    return torch.cat(out)


def match_score(logits: torch.Tensor, d: torch.Tensor, match: str,
                taus: dict[str, float] | None = None) -> torch.Tensor:
    """The score `match` names from fingerprint_distances' (logits, D); differentiable (the
    adaptive evaluation attacks it)."""
    s_min = d.min(dim=1).values
    if match == "min":
        return s_min
    s_pred = d.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
    if match == "predicted":
        return s_pred
    assert taus is not None
    return torch.maximum(s_min / taus["min"], s_pred / taus["predicted"])


class NeuralFPDetector(Component):
    role = "detector"
    defense = "neuralfp"

    def __init__(self, network: Classifier, dx: torch.Tensor, dy: torch.Tensor, threshold: float,
                 target_fpr: float, match: str = "min", taus: dict[str, float] | None = None) -> None:
        self.network = network
        self.match = match
        self.taus = taus  # for `either`: the min and predicted thresholds the score is scaled by
        self._dx, self._dy = dx, dy  # secret
        self.threshold = threshold
        self.target_fpr = target_fpr

    def detect(self, x: torch.Tensor, classify: Classify, ctx: RunContext) -> list[Detection]:
        return [Detection("fingerprint", fingerprint_scores(self.network, x, self._dx, self._dy, match=self.match,
                                                                 taus=self.taus),
                          self.threshold)]

    def public_settings(self) -> dict[str, Any]:
        out = {"fingerprints": int(self._dx.shape[0]), "threshold": self.threshold,
               "calibrated_target_fpr": self.target_fpr, "match": self.match}
        if self.taus is not None:
            out["score_thresholds"] = dict(self.taus)
        return out

    def __repr__(self) -> str:  # never print the tensors
        return f"NeuralFPDetector(fingerprints={int(self._dx.shape[0])}, threshold={self.threshold:.4g})"


class NeuralFPAdapter(Component):
    """Classify with the fingerprinted network instead of the base classifier."""

    role = "adapter"
    defense = "neuralfp"

    def __init__(self, network: Classifier) -> None:
        self.network = network

    def adapt(self, x: torch.Tensor, classifier: Classifier, ctx: RunContext) -> Classify:
        return self.network

    def public_settings(self) -> dict[str, Any]:
        return {"classifier": "neuralfp_classifier"}


def _checked_fingerprints(bundle: Bundle, artifact: str,
                          device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """The artifact's (dx, dy), refused (BundleError) unless they fit what the score computes:
    dx (M, *input shape) is added to each image, dy (M, K, K) is compared with the responses of
    the K-logit network (Bundle.classifier refused one of another class count), indexed by its
    predicted class. A misfit otherwise surfaces as a torch
    broadcasting error naming no artifact, at the warm-up or (warm-up off) on every request.
    Messages name keys, dtypes and shapes only: the values are secret."""
    fp = bundle.tensors(artifact, device)
    where = f"bundle {bundle.path}: artifact {artifact!r} (neuralfp fingerprints)"
    missing = sorted({"dx", "dy"} - set(fp))
    if missing:
        raise BundleError(f"{where} has no {' or '.join(missing)}; it holds {sorted(fp)}")
    dx, dy = fp["dx"], fp["dy"]
    shape = tuple(int(d) for d in bundle.input_spec.shape)
    k = bundle.input_spec.num_classes
    m = int(dx.shape[0]) if dx.dim() else 0
    for key, t, expected in (("dx", dx, (m, *shape)), ("dy", dy, (m, k, k))):
        if not t.is_floating_point():
            raise BundleError(f"{where}: {key} must be floating point, got {t.dtype}")
        if tuple(t.shape) != expected:
            raise BundleError(f"{where}: {key} must have shape {expected} (M fingerprints, M = dx's first "
                              f"dimension), got {tuple(t.shape)}")
    if not 1 <= m <= MAX_FINGERPRINTS:
        raise BundleError(f"{where}: {m} fingerprints; expected 1 to {MAX_FINGERPRINTS}")
    for key, t in (("dx", dx), ("dy", dy)):
        if not bool(torch.isfinite(t).all()):
            raise BundleError(f"{where}: {key} holds non-finite values (NaN or infinity)")
    # the networks compute in float32: a float64 dx would promote every probe and fail there
    return dx.float(), dy.float()


def _finite(bundle: Bundle, value: Any, key: str, *, positive: bool = False) -> float:
    """A calibration number from the manifest (a threshold, the target rate), refused unless
    finite: no score is ever above a NaN or infinite threshold, so the detector would accept
    everything without a word. Scores are distances (>= 0); the `either` taus divide
    them (> 0)."""
    where = f"bundle {bundle.path}: defenses.neuralfp.calibration.{key}"
    if not finite_number(value) and not isinstance(value, float):  # NaN and infinities are floats
        raise BundleError(f"{where} must be a number, got {value!r}")
    if not finite_number(value) or value < 0 or (positive and value == 0):
        raise BundleError(f"{where} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def build(options: dict[str, Any], env: DefenseEnv) -> list[Component]:
    unknown = set(options) - OPTIONS
    if unknown:
        raise ValueError(f"unknown neuralfp options {sorted(unknown)}; known: {sorted(OPTIONS)}")
    classify_with = options.get("classify_with", "fingerprinted")
    if classify_with not in ("fingerprinted", "base"):
        raise ValueError(f"neuralfp classify_with must be 'fingerprinted' or 'base', got {classify_with!r}")
    section = env.bundle.defense("neuralfp")
    cal = section["calibration"]
    network = env.bundle.classifier(env.device, artifact=section["classifier"])
    dx, dy = _checked_fingerprints(env.bundle, section["fingerprints"], env.device)
    match = section.get("match", "min")
    if match not in MATCHES:
        raise BundleError(f"bundle {env.bundle.path}: defenses.neuralfp.match must be one of {MATCHES}, got {match!r}")
    thresholds = cal["thresholds"]
    taus = None
    if match == "either":
        taus = {k: _finite(env.bundle, thresholds.get(k), f"thresholds.{k}", positive=True)
                for k in ("min", "predicted")}
    target_fpr = _finite(env.bundle, cal.get("target_fpr"), "target_fpr")
    if target_fpr > 1:
        raise BundleError(f"bundle {env.bundle.path}: defenses.neuralfp.calibration.target_fpr must be a rate "
                          f"in [0, 1], got {target_fpr!r}")
    components: list[Component] = [
        NeuralFPDetector(network, dx, dy, _finite(env.bundle, thresholds.get("fingerprint"), "thresholds.fingerprint"),
                         target_fpr, match, taus)]
    if classify_with == "fingerprinted":
        components.append(NeuralFPAdapter(network))
    return components
