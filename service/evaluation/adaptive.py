"""Adaptive attacks' models: torch modules that ART (or our own PGD) can differentiate.

  BPDA            forward = the real purifier, backward = identity (Athalye et al. 2018):
                  Defense-GAN's projection (an inner optimisation), and optionally MagNet's
                  reformer (an autoencoder, so it can also be differentiated exactly).
  EOT             smoothing's noise: the logits are log E_e[softmax f(x + e)], estimated with
                  `draws` fresh Gaussian draws on every call, so a gradient step averages the
                  gradient over the noise (Athalye et al. 2018; Salman et al. 2019's SmoothAdv).
  detector-aware  K + 1 outputs: the K class logits and a "rejected" logit
                  max_j z_j + beta * log(max_d score_d / threshold_d); a targeted attack must
                  then raise its target above the rejected logit too, i.e. keep every detector's
                  score under its threshold (Carlini & Wagner 2017, "not easily detected").
  GMSA            RMC: see service.evaluation.attacks.gmsa_rmc.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from service.defenses.base import RunContext
from service.defenses.magnet import DETECTORS, js_divergence, reconstruction_error
from service.defenses.neuralfp import fingerprint_distances, match_score
from service.evaluation.targets import Anatomy

Fn = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------- BPDA
class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, purified: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return purified

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def bpda(purify: Fn, x: torch.Tensor) -> torch.Tensor:
    """purify(x) on the way forward; the identity's gradient on the way back."""
    with torch.no_grad():
        out = purify(x.detach())
    return _StraightThrough.apply(x, out.to(x.dtype))


def purifier_fn(component: Any, *, exact: bool, seed: int = 0) -> Fn:
    """A purifier component as a function of x: exact (differentiable) when the component is
    a plain network (MagNet's reformer) and exact=True, else BPDA around the real purifier."""
    if exact and hasattr(component, "autoencoder"):
        ae = component.autoencoder
        return lambda x: ae(x).clamp(0.0, 1.0)
    counter = {"calls": 0}

    def real(x: torch.Tensor) -> torch.Tensor:
        counter["calls"] += 1  # a fresh RunContext per call: Defense-GAN's restarts are random
        return component.purify(x, None, RunContext(seed=seed + counter["calls"])).x

    return lambda x: bpda(real, x)


# ---------------------------------------------------------------------- detector scores, differentiable
def detector_ratios(component: Any, classify: Fn) -> Fn:
    """x -> (B, D) score / threshold for every detector of a detector component, with gradients.

    MagNet: reconstruction errors and JS divergences of its autoencoders (the same formulas
    as service.defenses.magnet.detector_scores). NeuralFP: min_k D_k with the real (secret)
    fingerprints (the served score: min, predicted-class or either): the white-box attacker
    knows them. Squeezing: its score (service.defenses.squeeze.squeeze_scores) with the
    squeezers passed straight through (BPDA): evaluate failed every pipeline holding it."""
    if component.defense == "magnet":
        names, thr, aes = component.names, component.thresholds, component.autoencoders

        def magnet(x: torch.Tensor) -> torch.Tensor:
            recon = {ae: aes[ae](x) for ae in {DETECTORS[n]["autoencoder"] for n in names}}
            cols = []
            for n in names:
                d = DETECTORS[n]
                r = recon[d["autoencoder"]]
                if d["kind"] == "reconstruction":
                    s = reconstruction_error(x, r, d["p"])
                else:
                    s = js_divergence(classify(x), classify(r), d["temperature"])
                cols.append(s / thr[n])
            return torch.stack(cols, dim=1)

        return magnet
    if component.defense == "neuralfp":
        net, dx, dy, thr_fp = component.network, component._dx, component._dy, component.threshold
        match, taus = getattr(component, "match", "min"), getattr(component, "taus", None)

        def neuralfp(x: torch.Tensor) -> torch.Tensor:
            logits, dist = fingerprint_distances(net, x, dx, dy)
            return (match_score(logits, dist, match, taus) / thr_fp).unsqueeze(1)

        return neuralfp
    if component.defense == "squeeze":
        from service.defenses.squeeze import squeeze

        squeezers, thr_sq = component.squeezers, component.threshold

        def squeezed(x: torch.Tensor, name: str) -> torch.Tensor:
            # BPDA (straight-through): the 1-bit rounding has no gradient, the median's is sparse
            return x + (squeeze(x, name) - x).detach()

        def squeezing(x: torch.Tensor) -> torch.Tensor:
            p = torch.softmax(classify(x).float(), dim=1)
            d = torch.stack([(p - torch.softmax(classify(squeezed(x, n)).float(), dim=1)).abs().sum(1)
                             for n in squeezers])
            return (d.max(dim=0).values / thr_sq).unsqueeze(1)

        return squeezing
    raise ValueError(f"no differentiable score for the {component.defense} detector")


# ---------------------------------------------------------------------- the attacked model
class AdaptiveModel(nn.Module):
    """The pipeline as the white-box attacker models it; outputs logits (B, K) or (B, K + 1).

    purifiers   functions applied in order (exact or BPDA);
    labeler     the network whose logits decide;
    eot         (sigma, draws): log of the mean softmax over `draws` Gaussian draws;
    detectors   functions x -> (B, D) score/threshold ratios: adds the "rejected" logit.
    """

    def __init__(self, labeler: Fn, *, purifiers: list[Fn] | None = None, eot: tuple[float, int] | None = None,
                 detectors: list[Fn] | None = None, beta: float = 10.0, seed: int = 0) -> None:
        super().__init__()
        self.labeler = labeler
        self.purifiers = purifiers or []
        self.eot = eot
        self.detectors = detectors or []
        self.beta = beta
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def rejects(self) -> bool:
        return bool(self.detectors)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        z = x
        for p in self.purifiers:
            z = p(z)
        if self.eot is None:
            return self.labeler(z)
        sigma, draws = self.eot
        b = z.shape[0]
        noise = torch.randn((draws, *z.shape), generator=self.generator).to(z.dtype) * sigma
        noisy = (z.unsqueeze(0) + noise).flatten(0, 1)
        probs = torch.softmax(self.labeler(noisy).float(), dim=1).view(draws, b, -1).mean(0)
        return probs.clamp_min(1e-12).log()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.class_logits(x)
        if not self.detectors:
            return logits
        ratio = torch.cat([d(x) for d in self.detectors], dim=1).max(dim=1).values
        reject = logits.max(dim=1).values + self.beta * ratio.clamp_min(1e-6).log()
        return torch.cat([logits, reject.unsqueeze(1)], dim=1)


def adaptive_model(a: Anatomy, *, eot_draws: int = 8, exact_reformer: bool = True, beta: float = 10.0,
                   detector_aware: bool = True, seed: int = 0) -> AdaptiveModel:
    """The white-box model of a pipeline (everything known, secrets included); RMC excluded
    (its per-image adaptation is attacked by GMSA instead)."""
    base = a.labeler
    purifiers = [purifier_fn(p, exact=exact_reformer, seed=seed) for p in a.purifiers]
    eot = None
    labeler: Fn = base
    if a.smoothing is not None:
        s = a.smoothing
        labeler = s.function(s.sigma, base, differentiable=True)  # type: ignore[attr-defined]
        eot = (float(s.sigma), int(eot_draws))  # type: ignore[attr-defined]
    detectors = [detector_ratios(d, base) for d in a.detectors] if detector_aware else []
    return AdaptiveModel(labeler, purifiers=purifiers, eot=eot, detectors=detectors, beta=beta, seed=seed)


def graybox_model(a: Anatomy) -> Fn | None:
    """The labeling network without the defense's secrets, detectors, purifiers or noise;
    None where it is the base classifier (then gray-box equals oblivious)."""
    if a.smoothing is not None:
        s = a.smoothing
        return s.function(s.sigma, a.labeler, differentiable=True)  # type: ignore[attr-defined]
    if any(d.defense == "neuralfp" for d in a.detectors):
        return a.labeler
    return None
