"""A pipeline: a named, ordered list of defense components, checked when it is built.

Order: detectors, then purifiers, then at most one adapter, then at most one decider.
Purifiers placed *after* a certifying decider (randomized smoothing) become part of the
function the decider samples: the certificate then covers them too (denoised smoothing).
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from models.bundle import Classifier
from service.defenses import build_defense
from service.defenses.base import (
    ArgmaxDecider, ArgmaxDecision, Classify, Component, Decision, DefenseEnv, Detection, RunContext,
)
from service.defenses.query_monitor import MonitorPolicy, policy_from_config

_ORDER = {"detector": 0, "purifier": 1, "adapter": 2, "decider": 3}
_ARGMAX = ArgmaxDecider()  # the decision of a pipeline without a decider (it holds no state)


class PipelineConfigError(ValueError):
    """A pipeline whose configuration cannot be built; raised at start-up."""


@dataclass
class Rejection:
    defense: str
    detector: str
    score: float
    threshold: float


@dataclass
class Stage:
    defense: str
    role: str
    seconds: float
    details: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult:
    """The pipeline's answer for one image."""

    status: str                      # accepted | rejected | abstained
    label: int | None = None
    class_name: str | None = None
    confidence: float | None = None
    certified_radius: float | None = None
    probabilities: list[float] | None = None
    rejected_by: list[Rejection] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)  # "defense/detector" -> score
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pipeline:
    name: str
    components: list[Component]
    classifier: Classifier
    class_names: tuple[str, ...]
    description: str = ""
    # the base classifier's inference-only copy (Runtime: `optimize_classifier`), used by the
    # default argmax decision when no adapter replaced the classifier; None: the classifier itself
    inference_classifier: Classify | None = None
    # the same copy's argmax decision compiled into one call (defenses.base.optimize_argmax_decision)
    argmax_decision: ArgmaxDecision | None = None
    # the query monitor's policy for this pipeline (None: not monitored); the runtime screens
    # each request's images with it before they reach the batcher (it needs the client)
    monitor: MonitorPolicy | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, name: str, config: dict[str, Any], env: DefenseEnv) -> "Pipeline":
        entries = config.get("defenses", []) or []
        components: list[Component] = []
        for entry in entries:
            if isinstance(entry, str):
                defense, options = entry, {}
            elif isinstance(entry, dict) and "defense" in entry:
                options = {k: v for k, v in entry.items() if k != "defense"}
                defense = entry["defense"]
            else:
                raise PipelineConfigError(f"pipeline {name!r}: each defense is a name or a mapping "
                                          f"with a 'defense' key, got {entry!r}")
            try:
                components.extend(build_defense(defense, options, env))
            except PipelineConfigError:
                raise
            except Exception as exc:
                raise PipelineConfigError(f"pipeline {name!r}: defense {defense!r}: {exc}") from exc
        cls._check_order(name, components)
        qm = getattr(env.settings, "query_monitor", None)
        defaults = MonitorPolicy(**qm.policy.model_dump()) if qm is not None else MonitorPolicy()
        try:
            monitor = policy_from_config(name, config.get("query_monitor"), defaults)
        except ValueError as exc:
            raise PipelineConfigError(str(exc)) from None
        return cls(name, components, env.classifier, env.bundle.input_spec.class_names,
                   str(config.get("description", "")), env.inference_classifier, env.argmax_decision, monitor)

    @staticmethod
    def _check_order(name: str, components: list[Component]) -> None:
        roles = [c.role for c in components]
        for r in roles:
            if r not in _ORDER:
                raise PipelineConfigError(f"pipeline {name!r}: unknown role {r!r}")
        if roles.count("adapter") > 1 or roles.count("decider") > 1:
            raise PipelineConfigError(f"pipeline {name!r}: at most one adapter and one decider")
        decider_at = roles.index("decider") if "decider" in roles else len(roles)
        head, tail = roles[:decider_at], roles[decider_at + 1:]
        if any(_ORDER[a] > _ORDER[b] for a, b in zip(head, head[1:])):
            raise PipelineConfigError(f"pipeline {name!r}: order must be detectors, purifiers, "
                                      f"adapter, decider; got {roles}")
        if tail and (any(r != "purifier" for r in tail) or not getattr(components[decider_at], "certifies", False)):
            raise PipelineConfigError(f"pipeline {name!r}: only purifiers may follow the decider, "
                                      f"and only a certifying one (smoothing)")
        if decider_at < len(roles) and getattr(components[decider_at], "certifies", False):
            # the radius is a statement about the image the decider receives: a purifier or an
            # adapter before it would make it one about the purified image (or an input-dependent
            # classifier), not about what the client sent
            changes = [c for c in components[:decider_at] if c.role != "detector"]
            if changes:
                raise PipelineConfigError(
                    f"pipeline {name!r}: only detectors may come before {components[decider_at].defense}: "
                    f"{changes[0].defense} ({changes[0].role}) would change the image or the classifier "
                    f"the certificate is about, so its radius would not hold around the input; a purifier "
                    f"belongs after it, inside the noisy classifier (smoothing with denoiser: true)")
            if tail and not getattr(components[decider_at], "composes_followers", True):
                raise PipelineConfigError(
                    f"pipeline {name!r}: the purifiers after {components[decider_at].defense} would never run: "
                    f"only with denoiser: true does its noisy classifier include what follows it")

    # ------------------------------------------------------------------ describing
    @property
    def decider(self) -> Component:
        for c in self.components:
            if c.role == "decider":
                return c
        return ArgmaxDecider()

    @property
    def certifies(self) -> bool:
        return bool(getattr(self.decider, "certifies", False))

    @functools.cached_property
    def settings_digest(self) -> str:
        """A digest of what decides this pipeline's answers: its defenses and their public
        settings. With the bundle version it tells apart two pipelines of one name configured
        differently (replicas sharing /certify's certificate cache, one of them sampling in
        bfloat16 or without sound noise)."""
        return hashlib.sha256(json.dumps(self._defenses(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _defenses(self) -> list[dict[str, Any]]:
        return [{"defense": c.defense, "role": c.role, "settings": c.public_settings()} for c in self.components]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "certifies": self.certifies,
                "defenses": self._defenses(),
                "query_monitor": self.monitor.public() if self.monitor is not None else None}

    # ------------------------------------------------------------------ running
    def run(self, x: torch.Tensor, ctx: RunContext) -> list[ImageResult]:
        """Run the whole batch through every stage; rejected images skip later stages."""
        b = x.shape[0]
        results = [ImageResult(status="accepted") for _ in range(b)]
        roles = [c.role for c in self.components]
        decider_at = roles.index("decider") if "decider" in roles else len(roles)
        before, after = self.components[:decider_at], self.components[decider_at + 1:]
        decider = self.components[decider_at] if decider_at < len(roles) else _ARGMAX
        classify: Classify = self.classifier
        current = x
        if not before:  # nothing can reject an image: no mask, no indexing (no torch call at all)
            return self._decide(results, decider, after, classify, current, range(b), ctx)
        alive = torch.ones(b, dtype=torch.bool)

        for comp in before:
            ctx.check()
            idx = alive.nonzero().flatten()
            if idx.numel() == 0:
                break
            start = time.perf_counter()
            if comp.role == "detector":
                # detection runs without gradients: the bundle classifier's inference copy
                # (TorchScript, the same logits up to float rounding, checked when it was made)
                # answers for it, at a fraction of the eager network's per-call overhead
                score_with = (self.inference_classifier if classify is self.classifier
                              and self.inference_classifier is not None else classify)
                with torch.no_grad():
                    detections: list[Detection] = comp.detect(current[idx], score_with, ctx)  # type: ignore[attr-defined]
                seconds = time.perf_counter() - start
                for det in detections:
                    scores = det.scores.detach().float().cpu()
                    for j, i in enumerate(idx.tolist()):
                        results[i].scores[f"{comp.defense}/{det.detector}"] = float(scores[j])
                        if scores[j] > det.threshold:
                            results[i].rejected_by.append(
                                Rejection(comp.defense, det.detector, float(scores[j]), float(det.threshold)))
                self._stage(results, idx, comp, seconds)
                for i in idx.tolist():
                    if results[i].rejected_by:
                        alive[i] = False
                        results[i].status = "rejected"
            elif comp.role == "purifier":
                out = comp.purify(current[idx], classify, ctx)  # type: ignore[attr-defined]
                current = current.clone()
                current[idx] = out.x.to(current.dtype)
                self._stage(results, idx, comp, time.perf_counter() - start, out.details)
            elif comp.role == "adapter":
                # the adapted classifier answers for exactly these rows: no detector follows it
                classify = comp.adapt(current[idx], self.classifier, ctx)  # type: ignore[attr-defined]
                self._stage(results, idx, comp, time.perf_counter() - start)

        idx = alive.nonzero().flatten()
        if idx.numel() == 0:
            return results
        return self._decide(results, decider, after, classify, current[idx], idx.tolist(), ctx)

    def _decide(self, results: list[ImageResult], decider: Component, after: list[Component],
                classify: Classify, x: torch.Tensor, idx: Sequence[int], ctx: RunContext) -> list[ImageResult]:
        ctx.check()
        if after:
            classify = _compose(after, classify, ctx)
        elif classify is self.classifier and isinstance(decider, ArgmaxDecider):
            if self.argmax_decision is not None:  # the whole decision in one call (see its docstring)
                with torch.no_grad():
                    probs_t, conf_t, labels_t = self.argmax_decision(x)
                return self._fill(results, idx, probs_t.tolist(), labels_t.tolist(), conf_t.tolist(),
                                  None, None, {})
            if self.inference_classifier is not None:
                classify = self.inference_classifier  # same logits up to float rounding, no autograd
        start = time.perf_counter()
        decision: Decision = decider.decide(x, classify, ctx)  # type: ignore[attr-defined]
        if decider.defense != "argmax":
            self._stage(results, idx, decider, time.perf_counter() - start)
        # one conversion to Python numbers per tensor, not one per element (this loop runs in
        # the inference thread, and every Python step there competes with the event loop)
        probs = decision.probabilities.detach().float().cpu().tolist()
        labels = decision.labels.detach().cpu().tolist()
        # double, not float: a certificate's radius and bound must reach the renderer as computed
        # (a float32 copy rounds to nearest, up as often as down)
        conf = decision.confidence.detach().double().cpu().tolist()
        abst = decision.abstained.detach().cpu().tolist()
        radius = decision.radius.detach().double().cpu().tolist() if decision.radius is not None else None
        n = len(labels)
        details = {}
        for key, value in decision.details.items():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
                details[key] = value.detach().cpu().tolist()
            elif isinstance(value, list) and len(value) == n:
                details[key] = value
        return self._fill(results, idx, probs, labels, conf, abst, radius, details)

    def _fill(self, results: list[ImageResult], idx: Sequence[int], probs: list[list[float]], labels: list[int],
              conf: list[float], abst: list[bool] | None, radius: list[float] | None,
              details: dict[str, list[Any]]) -> list[ImageResult]:
        """The decision's Python numbers into the results of rows `idx`."""
        names, classes = self.class_names, len(self.class_names)
        for j, i in enumerate(idx):
            r = results[i]
            r.probabilities = [round(p, 6) for p in probs[j]]
            for key, values in details.items():
                r.details[key] = values[j]
            if abst is not None and abst[j]:
                r.status = "abstained"
                continue
            r.label = label = labels[j]
            r.class_name = names[label] if 0 <= label < classes else str(label)
            r.confidence = conf[j]
            if radius is not None:
                r.certified_radius = radius[j]
        return results

    @staticmethod
    def _stage(results: list[ImageResult], idx: torch.Tensor | Sequence[int], comp: Component, seconds: float,
               details: dict[str, torch.Tensor] | None = None) -> None:
        for j, i in enumerate(idx.tolist() if isinstance(idx, torch.Tensor) else idx):
            extra = {k: float(v[j]) for k, v in (details or {}).items()}
            results[i].stages.append(Stage(comp.defense, comp.role, seconds, extra))


def _compose(purifiers: list[Component], classify: Classify, ctx: RunContext) -> Classify:
    """The function a certifying decider samples: purifiers after the noise, then the classifier."""

    def composed(x: torch.Tensor) -> torch.Tensor:
        for p in purifiers:
            x = p.purify(x, classify, ctx).x  # type: ignore[attr-defined]
        return classify(x)

    return composed
