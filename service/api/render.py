"""The one renderer: a pipeline's ImageResult as every route shows it.

/predict lists each image's rendered result, /certify adds the certificate's numbers to the
same fields, and /v2 lays the same fields out as tensors (label -1 and radius -1 where these
are null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.api.schemas import ImageResultOut, RejectionOut, StageOut
from service.pipeline import ImageResult, Rejection


@dataclass(frozen=True)
class Rendered:
    status: str  # accepted | rejected | abstained
    label: int | None  # null unless accepted
    class_name: str | None
    confidence: float | None
    certified_radius: float | None
    probabilities: list[float] | None
    rejected_by: list[RejectionOut]
    stages: list[StageOut]
    # a smoothing decider's sequential test: the radius it aimed at, whether it got there, samples used
    target_radius: float | None = None
    certified: bool | None = None
    samples: int | None = None
    # the certificate's bound: the radius holds with probability >= 1 - alpha over the noise
    # at this sigma
    alpha: float | None = None
    sigma: float | None = None

    def image_out(self, image_sha256: str) -> ImageResultOut:
        """/predict's entry for one image."""
        return ImageResultOut(image_sha256=image_sha256, status=self.status, label=self.label,  # type: ignore[arg-type]
                              class_name=self.class_name, confidence=self.confidence,
                              certified_radius=self.certified_radius, rejected_by=self.rejected_by,
                              stages=self.stages, target_radius=self.target_radius, certified=self.certified,
                              samples=self.samples, alpha=self.alpha, sigma=self.sigma)


def rejection_out(j: Rejection) -> RejectionOut:
    return RejectionOut(defense=j.defense, detector=j.detector, score=j.score, threshold=j.threshold)


def round_down(value: float, places: int = 6) -> float:
    """`value` cut to `places` decimals, never above it: a certificate's radius and lower bound
    shown shorter must not claim more than was shown (round() goes up half the time)."""
    # on doubles, not decimals: the double nearest 0.3 lies just below 3/10, and an exact decimal
    # floor would show it as 0.299999; the double shown is never above the one computed
    scaled = math.floor(value * 10 ** places)
    out = scaled / 10 ** places
    return out if out <= value else (scaled - 1) / 10 ** places


def shown_radius(radius: float | None, cert: dict | None) -> float | None:
    """The certified radius as answered: cut to 6 decimals, but never below a target radius it
    was certified at (`certified` is true exactly when the radius shown is >= the target: a
    radius of 0.506110966 cut to 0.50611 fell below a target of 0.5061109658)."""
    if radius is None:
        return None
    shown = round_down(radius)
    target = cert.get("target_radius") if cert else None
    if cert and cert.get("certified") and target is not None and shown < target <= radius:
        return float(target)
    return shown


def render(r: ImageResult) -> Rendered:
    cert = r.details.get("certificate") if r.details else None  # a smoothing decider's, for this image
    return Rendered(
        target_radius=cert.get("target_radius") if cert else None,
        certified=cert.get("certified") if cert else None, samples=cert.get("samples") if cert else None,
        alpha=cert.get("alpha") if cert else None, sigma=cert.get("sigma") if cert else None,
        status=r.status, label=r.label, class_name=r.class_name,  # the pipeline sets these only when accepted
        # with a certificate, the confidence is its lower bound on pA
        confidence=None if r.confidence is None else round_down(r.confidence) if cert else round(r.confidence, 6),
        certified_radius=shown_radius(r.certified_radius, cert),
        probabilities=r.probabilities,
        rejected_by=[rejection_out(j) for j in r.rejected_by],
        stages=[StageOut(defense=s.defense, seconds=round(s.seconds, 6), **s.details) for s in r.stages])
