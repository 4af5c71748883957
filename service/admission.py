"""Admission by cost: backpressure that knows a certification with n = 100,000 is not a
prediction.

Every pipeline request is weighed before it is queued, in *sample units*: one forward pass
of the classifier on one image is 1. A request holds its cost from admission until it is
answered (or fails, or its client goes away). Past `admission.max_cost` units, or past
`admission.max_concurrent` requests in flight, a new request is refused at once with 503
`overloaded` and `Retry-After`, before it costs anything. A request that alone weighs more
than the whole budget is admitted only when nothing else is in flight (otherwise a server
configured with a large `certify.max_n` could never answer it).

The weight of one image through a pipeline: `admission.cost_per_image[pipeline]` when the
operator set one; otherwise an estimate from the components' public settings:
    1                                 the classifier (and every cheap detector or purifier)
    + n0 + n                          a certifying decider (randomized smoothing; per request)
    + 3 * steps * restarts            an iterative purifier (Defense-GAN projection)
    + 3 * steps * k                   an adapter fine-tuning on k neighbours (RMC)
(a forward plus a backward pass counts 3). The estimate is an upper bound: early stopping
only makes the work cheaper than it was charged.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from service.batcher import Overloaded
from service.pipeline import Pipeline


def image_cost(pipeline: Pipeline, options: dict[str, Any] | None = None) -> float:
    """The estimated sample units one image costs through `pipeline` with these options."""
    options = options or {}
    cost = 1.0
    for comp in pipeline.components:
        ps = comp.public_settings() or {}
        if comp.role == "decider" and getattr(comp, "certifies", False):
            n = options.get("n", ps.get("n", getattr(comp, "n", 0)))
            n0 = options.get("n0", ps.get("n0", getattr(comp, "n0", 0)))
            cost += float(n) + float(n0)
        elif comp.role == "adapter" and "steps" in ps:
            cost += 3.0 * float(ps["steps"]) * float(ps.get("k", 1))
        elif "steps" in ps:
            cost += 3.0 * float(ps["steps"]) * float(ps.get("restarts", 1) or 1)
        else:
            cost += 1.0
    return cost


class Admission:
    """A per-process budget of sample units and of requests in flight."""

    def __init__(self, max_cost: float, max_concurrent: int, retry_after_s: int = 1,
                 on_change: Any = None) -> None:
        self.max_cost, self.max_concurrent, self.retry_after_s = max_cost, max_concurrent, retry_after_s
        self.cost_in_flight = 0.0
        self.requests_in_flight = 0
        self._on_change = on_change

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.cost_in_flight)

    def admit(self, cost: float, what: str) -> None:
        """Take `cost` units, or raise Overloaded. Runs on the event loop: no lock needed."""
        if self.requests_in_flight >= self.max_concurrent:
            raise Overloaded(f"{self.requests_in_flight} requests are in flight (limit {self.max_concurrent}); "
                             f"retry later", self.retry_after_s)
        if self.requests_in_flight and self.cost_in_flight + cost > self.max_cost:
            raise Overloaded(f"{what} would cost {cost:,.0f} sample units; {self.cost_in_flight:,.0f} of this "
                             f"replica's {self.max_cost:,.0f} are in use; retry later",
                             max(self.retry_after_s, math.ceil(self.retry_after_s * cost / self.max_cost)))
        self.cost_in_flight += cost
        self.requests_in_flight += 1
        self._changed()

    def release(self, cost: float) -> None:
        self.cost_in_flight = max(0.0, self.cost_in_flight - cost)
        self.requests_in_flight = max(0, self.requests_in_flight - 1)
        self._changed()

    @contextmanager
    def hold(self, cost: float, what: str) -> Iterator[None]:
        self.admit(cost, what)
        try:
            yield
        finally:
            self.release(cost)
