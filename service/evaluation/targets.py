"""Running a pipeline on a batch, and reaching into its components for the attacker.

Nothing here changes a defense: the hooks read the component objects a built pipeline holds
(autoencoders, fingerprints, the generator, the smoothing function, RMC's fine-tuner).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.defenses.base import Component, RunContext
from service.pipeline import Pipeline


@dataclass
class Outcome:
    """What a pipeline answered for each image of a batch."""

    status: np.ndarray          # "accepted" | "rejected" | "abstained"
    labels: np.ndarray          # -1 unless accepted
    confidence: np.ndarray      # nan unless accepted
    score: np.ndarray           # max over detectors of score / threshold (nan: no detector)
    seconds: float              # wall time for the whole batch

    @property
    def rejected(self) -> np.ndarray:
        return self.status == "rejected"

    @property
    def abstained(self) -> np.ndarray:
        return self.status == "abstained"

    def correct(self, y: np.ndarray) -> np.ndarray:
        return (self.status == "accepted") & (self.labels == y)

    def wrong(self, y: np.ndarray) -> np.ndarray:
        """Accepted with a wrong label: the only answer that hurts a client."""
        return (self.status == "accepted") & (self.labels != y)


def thresholds(pipe: Pipeline) -> dict[str, float]:
    """"defense/detector" -> threshold, for every detector component of the pipeline."""
    out: dict[str, float] = {}
    for c in pipe.components:
        if c.role != "detector":
            continue
        if isinstance(getattr(c, "thresholds", None), dict):
            out.update({f"{c.defense}/{n}": float(t) for n, t in c.thresholds.items()})
        elif getattr(c, "threshold", None) is not None:
            name = "fingerprint" if c.defense == "neuralfp" else "reconstruction_error"
            out[f"{c.defense}/{name}"] = float(c.threshold)
    return out


def has_detector(pipe: Pipeline) -> bool:
    return any(c.role == "detector" for c in pipe.components)


def run(pipe: Pipeline, x: torch.Tensor, *, batch: int = 100, seed: int = 0,
        options: dict[str, Any] | None = None, bar: Any = None) -> Outcome:
    """Run the real pipeline on x (batches of `batch`); one RunContext per batch."""
    thr = thresholds(pipe)
    status, labels, conf, score = [], [], [], []
    started = time.perf_counter()
    for i in range(0, len(x), batch):
        ctx = RunContext(seed=seed + i, options=dict(options or {}))
        with torch.no_grad():
            results = pipe.run(x[i:i + batch], ctx)
        for r in results:
            status.append(r.status)
            labels.append(r.label if r.label is not None else -1)
            conf.append(r.confidence if r.confidence is not None else float("nan"))
            ratios = [s / thr[k] for k, s in r.scores.items() if k in thr and thr[k] > 0]
            score.append(max(ratios) if ratios else float("nan"))
        if bar is not None:
            bar.update(len(results))
    return Outcome(np.array(status), np.array(labels, dtype=np.int64), np.array(conf, dtype=np.float64),
                   np.array(score, dtype=np.float64), time.perf_counter() - started)


# ---------------------------------------------------------------------- component access
def components(pipe: Pipeline, role: str, defense: str | None = None) -> list[Component]:
    return [c for c in pipe.components if c.role == role and (defense is None or c.defense == defense)]


def one(pipe: Pipeline, role: str, defense: str | None = None) -> Component | None:
    found = components(pipe, role, defense)
    return found[0] if found else None


@dataclass
class Anatomy:
    """The parts of a pipeline an attacker reasons about."""

    name: str
    defenses: list[str]
    labeler: torch.nn.Module | Any              # the network whose logits decide (before smoothing)
    detectors: list[Component] = field(default_factory=list)
    purifiers: list[Component] = field(default_factory=list)
    smoothing: Component | None = None
    rmc: Component | None = None

    @property
    def randomized(self) -> bool:
        return self.smoothing is not None


def anatomy(pipe: Pipeline) -> Anatomy:
    adapter = one(pipe, "adapter")
    labeler: Any = pipe.classifier
    rmc = None
    if adapter is not None and adapter.defense in ("neuralfp", "robust"):
        labeler = adapter.network  # type: ignore[attr-defined]
    elif adapter is not None and adapter.defense == "rmc":
        rmc = adapter
    decider = one(pipe, "decider")
    smoothing = decider if decider is not None and decider.defense == "smoothing" else None
    roles = [c.role for c in pipe.components]
    at = roles.index("decider") if "decider" in roles else len(roles)
    purifiers = [c for c in pipe.components[:at] if c.role == "purifier"]
    return Anatomy(name=pipe.name, defenses=sorted({c.defense for c in pipe.components}), labeler=labeler,
                   detectors=components(pipe, "detector"), purifiers=purifiers, smoothing=smoothing, rmc=rmc)


def load_pipelines(bundle: Any, names: list[str] | None = None, config: str | None = None) -> tuple[Any, dict[str, Pipeline]]:
    """(base classifier, {name: Pipeline}) built from a bundle directory and the packaged
    configuration (optionally merged with `config`), exactly as the service builds them."""
    from models.bundle import Bundle
    from service.defenses.base import DefenseEnv
    from service.settings import load_settings

    settings = load_settings(config, bundle=bundle)
    b = Bundle.load(settings.bundle, trusted_imports=settings.trusted_imports)
    b.require_finished()
    base = b.classifier()
    env = DefenseEnv(bundle=b, classifier=base, device=torch.device("cpu"), settings=settings)
    names = names or list(settings.pipelines)
    unknown = [n for n in names if n not in settings.pipelines]
    if unknown:
        raise ValueError(f"unknown pipelines {unknown}; configured: {sorted(settings.pipelines)}")
    return base, {n: Pipeline.build(n, settings.pipelines[n].model_dump(), env) for n in names}
