"""Admission by cost: backpressure that knows a certification with n = 100,000 is not a
prediction.

Every pipeline request is weighed before it is queued, in *sample units*: one forward pass
of the classifier on one image is 1. A request holds its cost from admission until it is
answered (or fails, or its client goes away), and for as long as work it caused still runs:
one whose client went away while its rows were in a running batch beside live requests holds
its cost until that batch ends (`hold`), so leaving early frees no budget for new work. Past
`admission.max_cost` units, or past `admission.max_concurrent` requests in flight, a new
request is refused at once with 503 `overloaded` and `Retry-After`, before it costs
anything. A new request is weighed at its full estimate against what is held, but it holds
at most half of `max_cost` (min(cost, max_cost / 2)): one request never takes the whole
replica, so while even the heaviest runs, requests worth the other half are still admitted.
A request that alone weighs more than the whole budget is admitted only when nothing else is
in flight (otherwise a server configured with a large `certify.max_n` could never answer
it), and holds half the budget while it runs; a second such request is refused until it is
done.

With `admission.max_client_cost` set, one client (its API key, else its address: the query
monitor's identity) may hold at most that many units at a time, and the same share of the
replica's other limits: f = max_client_cost / max_cost of `max_concurrent` requests and of a
pipeline's queue (`batching.max_queue` images), at least one of each. A request that would take
it past any of them, while it has one in flight, is refused at once with 429 `overloaded` and
`Retry-After`, whatever the rest of the replica holds, so one client sending many requests,
costly or cheap, cannot take the replica's budget, its request slots or a pipeline's queue from
the others. The same rule as the replica's: the new request weighed at its full estimate
against what the client holds, a client's request larger than its whole share admitted when it
has nothing else in flight. Unset (the default), clients share the replica first come, first
served.

The weight of one image through a pipeline: `admission.cost_per_image[pipeline]` when the
operator set one, plus the samples of a certifying decider (below); otherwise an estimate from
the components' public settings:
    1                                 the classifier (and every cheap detector or purifier)
    + (n0 + n) * w                    a certifying decider (randomized smoothing; per request)
    + 3 * steps * restarts            an iterative purifier (Defense-GAN projection)
    + 3 * steps * k                   an adapter fine-tuning on k neighbours (RMC)
(a forward plus a backward pass counts 3). `w` weighs one sample: the FLOPs of the networks
the decider samples (a noise-trained classifier, or a denoiser then the classifier) over the
base classifier's, counted once at start-up on one image (`sample_weights`; 1 where they
cannot be counted). The estimate is an upper bound: early stopping only makes the work
cheaper than it was charged, and FLOPs are the networks' work, not their speed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from service.batcher import Overloaded, outlives
from service.pipeline import Pipeline

log = logging.getLogger(__name__)


def _flops(fn: Any, x: torch.Tensor) -> int:
    """The FLOPs torch's counter sees in one call of `fn` on `x` (0: none counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(x)
    return int(counter.get_total_flops())


def sample_weights(pipeline: Pipeline, shape: tuple[int, ...], device: Any = "cpu") -> dict[int, float]:
    """The weight of one sample of each certifying decider of `pipeline`, by index in its
    components: the FLOPs of the networks it samples (`function(sigma, classifier)`, the
    eager networks, at its heaviest sigma) over the base classifier's, on one zero image of
    `shape`; rounded up to 0.01. One forward pass of each network under torch's FLOP
    counter (milliseconds on MNIST-sized networks). Deciders whose networks cannot be
    counted weigh 1 (the unweighted estimate), with a warning."""
    out: dict[int, float] = {}
    x = torch.zeros(1, *shape, device=device)
    base: int | None = None  # the classifier's FLOPs: counted once, for the first certifying decider
    for i, comp in enumerate(pipeline.components):
        if not (comp.role == "decider" and getattr(comp, "certifies", False) and hasattr(comp, "function")):
            continue
        try:
            if base is None:
                base = _flops(pipeline.classifier, x)
            sampled = max(_flops(comp.function(s, pipeline.classifier, differentiable=True), x)
                          for s in getattr(comp, "sigmas", [getattr(comp, "sigma", None)]))
        except Exception as exc:  # noqa: BLE001 - an estimate: fall back to the unweighted one
            log.warning("pipeline %s: could not count the FLOPs of %s's sampled networks (%s); "
                        "each sample counts 1", pipeline.name, type(comp).__name__, exc)
            continue
        if base <= 0 or sampled <= 0:
            log.warning("pipeline %s: no FLOPs counted for %s's sampled networks; each sample counts 1",
                        pipeline.name, type(comp).__name__)
            continue
        out[i] = math.ceil(100 * sampled / base) / 100
        log.info("pipeline %s: one sample weighs %.2f classifier passes (%d / %d FLOPs)",
                 pipeline.name, out[i], sampled, base)
    return out


def sampling_cost(pipeline: Pipeline, options: dict[str, Any] | None = None,
                  weights: Mapping[int, float] | None = None) -> float:
    """The sample units one image's certifying decider(s) cost: (n0 + n) * w each, with the
    request's n and n0 where it has them, else the decider's."""
    options, weights = options or {}, weights or {}
    cost = 0.0
    for i, comp in enumerate(pipeline.components):
        if comp.role == "decider" and getattr(comp, "certifies", False):
            ps = comp.public_settings() or {}
            n = options.get("n", ps.get("n", getattr(comp, "n", 0)))
            n0 = options.get("n0", ps.get("n0", getattr(comp, "n0", 0)))
            cost += (float(n) + float(n0)) * float(weights.get(i, 1.0))
    return cost


def image_cost(pipeline: Pipeline, options: dict[str, Any] | None = None,
               weights: Mapping[int, float] | None = None) -> float:
    """The estimated sample units one image costs through `pipeline` with these options;
    `weights`: `sample_weights(pipeline, ...)` (without them each sample counts 1)."""
    cost = 1.0 + sampling_cost(pipeline, options, weights)
    for comp in pipeline.components:
        ps = comp.public_settings() or {}
        if comp.role == "decider" and getattr(comp, "certifies", False):
            continue
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
                 on_change: Any = None, max_client_cost: float | None = None, max_queue: int = 1024) -> None:
        self.max_cost, self.max_concurrent, self.retry_after_s = max_cost, max_concurrent, retry_after_s
        self.cost_in_flight = 0.0
        self.max_hold = max_cost / 2  # the most one request holds (module docstring)
        self.requests_in_flight = 0
        self.max_client_cost = max_client_cost
        share = min(1.0, max_client_cost / max_cost) if max_client_cost is not None else 1.0
        self.max_client_requests = max(1, math.floor(share * max_concurrent))
        self.max_client_images = max(1, math.floor(share * max_queue))
        # client -> [units held, requests in flight, images in flight]; an entry goes with its
        # last request, so there are never more than max_concurrent
        self.clients: dict[str, list[float]] = {}
        self._on_change = on_change

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.cost_in_flight)

    def held(self, cost: float) -> float:
        """What a request of `cost` holds while in flight: at most half the budget."""
        return min(cost, self.max_hold)

    def admit(self, cost: float, what: str, client: str | None = None, images: int = 1) -> None:
        """Weigh `cost` (the full estimate) against the units in flight, and the client's
        request of `images` against its share, and take `held(cost)` of them, or raise
        Overloaded. Runs on the event loop: no lock needed."""
        mine = self.clients.get(client) if client is not None and self.max_client_cost is not None else None
        if mine is not None:
            over = []
            if mine[0] + cost > self.max_client_cost:
                over.append(f"{mine[0]:,.0f} of its {self.max_client_cost:,.0f} sample units (this request: {cost:,.0f})")
            if mine[1] + 1 > self.max_client_requests:
                over.append(f"{mine[1]:.0f} of its {self.max_client_requests} requests")
            if mine[2] + images > self.max_client_images:
                over.append(f"{mine[2]:.0f} of its {self.max_client_images} images (this request: {images})")
            if over:
                # the client's identity stays out of the message: it may be an API key's name
                raise Overloaded(f"{what}: this client has {' and '.join(over)} in flight on this replica; retry later",
                                 max(self.retry_after_s, math.ceil(self.retry_after_s * cost / self.max_client_cost)),
                                 status=429)
        if self.requests_in_flight >= self.max_concurrent:
            raise Overloaded(f"{self.requests_in_flight} requests are in flight (limit {self.max_concurrent}); "
                             f"retry later", self.retry_after_s)
        if self.requests_in_flight and self.cost_in_flight + cost > self.max_cost:
            raise Overloaded(f"{what} would cost {cost:,.0f} sample units; {self.cost_in_flight:,.0f} of this "
                             f"replica's {self.max_cost:,.0f} are in use; retry later",
                             max(self.retry_after_s, math.ceil(self.retry_after_s * cost / self.max_cost)))
        self.cost_in_flight += self.held(cost)
        self.requests_in_flight += 1
        if client is not None and self.max_client_cost is not None:
            mine = self.clients.setdefault(client, [0.0, 0, 0])
            mine[0] += self.held(cost)
            mine[1] += 1
            mine[2] += images
        self._changed()

    def release(self, cost: float, client: str | None = None, images: int = 1) -> None:
        """Give back what `admit(cost, client=client, images=images)` took (the same values)."""
        self.requests_in_flight = max(0, self.requests_in_flight - 1)
        # fractional costs (sample weights) leave rounding behind: none is held by no request
        self.cost_in_flight = max(0.0, self.cost_in_flight - self.held(cost)) if self.requests_in_flight else 0.0
        mine = self.clients.get(client) if client is not None else None
        if mine is not None:
            mine[0] -= self.held(cost)
            mine[1] -= 1
            mine[2] -= images
            if mine[1] <= 0:
                del self.clients[client]
        self._changed()

    @contextmanager
    def hold(self, cost: float, what: str, client: str | None = None, images: int = 1) -> Iterator[None]:
        """`admit(cost, client=client, images=images)` for the block, and past it while a
        batch still computes the rows of the request that left it (service.batcher.outlives):
        released once all have ended."""
        self.admit(cost, what, client, images)
        holders = [1]  # this block, and each batch still running for the request after it left

        def let_go() -> None:
            holders[0] -= 1
            if holders[0] == 0:
                self.release(cost, client, images)

        def keep() -> Callable[[], None]:
            if holders[0] == 0:  # released already: nothing left to hold on to
                return lambda: None
            holders[0] += 1
            return let_go

        token = outlives.set(keep)
        try:
            yield
        finally:
            outlives.reset(token)
            let_go()
