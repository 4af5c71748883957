"""Everything a running service holds, built from settings by the app factory: the verified
bundle, the pipelines, one batcher per pipeline, the metrics. No module-level state."""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from models.bundle import Bundle, defense_key
from service.admission import Admission, image_cost
from service.batcher import Batcher, BatchReport
from service.defenses.base import DefenseEnv, RunContext, optimize_argmax_decision, optimize_for_cpu
from service.imaging import ImageLimits
from service.metrics import Metrics
from service.pipeline import ImageResult, Pipeline, PipelineConfigError
from service.settings import Settings

log = logging.getLogger("shieldserve")


class UnknownPipeline(KeyError):
    pass


_TORCH_DEFAULT_THREADS: int | None = None


def auto_torch_threads(workers: int = 1) -> int | None:
    """torch's intra-op threads when `torch_threads` is 0: one fewer than torch's own default
    (the CPUs it found) shared among the `workers` processes, at least 1, so each worker's event
    loop keeps a core to itself. With torch's default of 2 on a 2-CPU machine its second thread
    and the loop took turns on one core: /predict at 32 clients ~10% slower (docs/operations.md).
    None (torch's default stands) where OMP_NUM_THREADS is set: the operator chose. Process-wide,
    like torch_threads; the default is read once, so building a second Runtime does not take
    another thread away."""
    global _TORCH_DEFAULT_THREADS
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if _TORCH_DEFAULT_THREADS is None:
        _TORCH_DEFAULT_THREADS = torch.get_num_threads()
    return max(1, _TORCH_DEFAULT_THREADS // max(1, workers) - 1)


class Runtime:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        threads = settings.torch_threads or auto_torch_threads(settings.workers)
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            log.info("torch intra-op threads: %d%s", threads, "" if settings.torch_threads else
                     " (auto: one core left to the event loop; set torch_threads to choose)")
        if settings.gil_switch_interval_ms:  # process-wide, like torch_threads
            sys.setswitchinterval(settings.gil_switch_interval_ms / 1000.0)
        self.device = torch.device(settings.device)
        started = time.monotonic()
        self.bundle = Bundle.load(settings.bundle)  # verifies every sha256; raises BundleError
        self.input_spec = self.bundle.input_spec
        lim = settings.limits
        self.image_limits = ImageLimits(max_bytes=lim.max_image_bytes, max_pixels=lim.max_pixels,
                                        formats=tuple(f.upper() for f in lim.formats), resize=lim.resize)
        self.classifier = self.bundle.classifier(self.device)
        self.inference_classifier = self._inference_copy() if settings.optimize_classifier else None
        self.argmax_decision = (optimize_argmax_decision(self.classifier, tuple(self.input_spec.shape))
                                if self.inference_classifier is not None else None)
        env = DefenseEnv(bundle=self.bundle, classifier=self.classifier, device=self.device, settings=settings,
                         inference_classifier=self.inference_classifier, argmax_decision=self.argmax_decision)
        self.pipelines: dict[str, Pipeline] = {}
        # pipelines left out because a defense they need is unusable on this bundle, and why
        self.unavailable: dict[str, str] = {}
        for name, cfg in settings.pipelines.items():
            reason = self._unusable(cfg.model_dump())
            if reason is not None:
                log.warning("pipeline %s is not served: %s", name, reason)
                self.unavailable[name] = reason
                continue
            self.pipelines[name] = Pipeline.build(name, cfg.model_dump(), env)
        if settings.default_pipeline in self.unavailable and self.pipelines:
            fallback = next((n for n, p in self.pipelines.items() if p.components), next(iter(self.pipelines)))
            log.warning("default pipeline %s is not served (%s); the default is %s instead",
                        settings.default_pipeline, self.unavailable[settings.default_pipeline], fallback)
            self.settings = settings = settings.model_copy(update={"default_pipeline": fallback})
        if settings.default_pipeline not in self.pipelines:
            raise PipelineConfigError(f"default_pipeline {settings.default_pipeline!r} is not configured; "
                                      f"pipelines: {sorted(self.pipelines)}")
        self.metrics = Metrics()
        # Inference runs off the event loop: each pipeline's batches in its batcher's own thread
        # (service/batcher.py); this pool runs the warm-up and GET /certify's sampling. torch
        # parallelises inside each call.
        self.executor = ThreadPoolExecutor(max_workers=max(2, min(8, len(self.pipelines))),
                                           thread_name_prefix="shieldserve-infer")
        b = settings.batching
        self.batchers = {
            name: Batcher(name, pipeline.run, device=self.device, enabled=b.enabled,
                          max_batch_size=b.max_batch_size, max_delay_ms=b.max_delay_ms,
                          max_queue=b.max_queue, retry_after_s=b.retry_after_s,
                          on_batch=lambda report, n=name: self._observe_batch(n, report),
                          on_queue_change=lambda depth, n=name: self.metrics.queue_depth.labels(n).set(depth))
            for name, pipeline in self.pipelines.items()
        }
        a = settings.admission
        self.admission = Admission(a.max_cost, a.max_concurrent, a.retry_after_s,
                                   on_change=self.metrics.cost_in_flight.set)
        self.ready = False
        self.load_seconds = time.monotonic() - started
        log.info("bundle %s (version %s) loaded in %.2fs with pipelines %s", self.bundle.name,
                 self.bundle.version, self.load_seconds, sorted(self.pipelines))

    def _unusable(self, config: dict[str, Any]) -> str | None:
        """Why a configured pipeline cannot be served on this bundle (models.bundle.Bundle.unusable
        for each defense it names), or None."""
        for entry in config.get("defenses", []) or []:
            key = defense_key(entry)
            reason = self.bundle.unusable(key)
            if reason is not None:
                return f"{key}: {reason}"
        return None

    def _inference_copy(self) -> Any:
        """The classifier's TorchScript-frozen copy for decisions without gradients (CPU only):
        about twice the images/s of the eager network at the batcher's batch sizes, and it
        holds the GIL less, which leaves the event loop more of the CPU. None where it cannot
        be made or does not match the eager network (defenses.base.optimize_for_cpu checks)."""
        if self.device.type != "cpu":
            return None
        fast = optimize_for_cpu(self.classifier, tuple(self.input_spec.shape))
        if fast is self.classifier:
            log.warning("the base classifier could not be optimised for inference; serving it as it is")
            return None
        return fast

    # ------------------------------------------------------------------ serving
    def pipeline(self, name: str | None) -> Pipeline:
        name = name or self.settings.default_pipeline
        if name not in self.pipelines:
            raise UnknownPipeline(name)
        return self.pipelines[name]

    def cost(self, pipeline: str, images: int, options: dict[str, Any] | None = None) -> float:
        """What `images` images through `pipeline` weigh, in sample units (service/admission.py)."""
        per_image = self.settings.admission.cost_per_image.get(pipeline)
        if per_image is None:
            per_image = image_cost(self.pipeline(pipeline), options)
        return float(per_image) * images

    async def infer(self, pipeline: str, x: torch.Tensor, *, deadline: float | None = None,
                    options: dict[str, Any] | None = None) -> list[ImageResult]:
        self.pipeline(pipeline)
        images = int(x.shape[0])
        with self.admission.hold(self.cost(pipeline, images, options), f"{images} image(s) on {pipeline!r}"):
            return await self.batchers[pipeline].submit(x, deadline=deadline, options=options)

    async def infer_encoded(self, pipeline: str, decode: Any, images: int, *, deadline: float | None = None,
                            options: dict[str, Any] | None = None) -> tuple[torch.Tensor, list[ImageResult]]:
        """Like infer, for images decoded by `decode()` in the batch's worker thread."""
        self.pipeline(pipeline)
        with self.admission.hold(self.cost(pipeline, images, options), f"{images} image(s) on {pipeline!r}"):
            return await self.batchers[pipeline].submit_encoded(decode, images, deadline=deadline, options=options)

    def warmup(self) -> None:
        """One small run through every pipeline, so the first client does not pay for it."""
        c, h, w = self.input_spec.shape
        x = torch.zeros(1, c, h, w, device=self.device)
        for fast in (self.inference_classifier, self.argmax_decision):
            if fast is not None:  # TorchScript specialises on its first calls
                with torch.no_grad():
                    for n in (1, 2, self.settings.batching.max_batch_size, 1):
                        fast(torch.zeros(n, c, h, w))
        for name, pipeline in self.pipelines.items():
            started = time.monotonic()
            pipeline.run(x, RunContext(device=self.device, seed=0))
            log.info("warmed pipeline %s in %.2fs", name, time.monotonic() - started)

    def _observe_batch(self, pipeline: str, report: BatchReport) -> None:
        m = self.metrics
        m.batch_size.labels(pipeline).observe(report.size)
        for wait in report.queue_waits:
            m.queue_wait.labels(pipeline).observe(wait)
        seen: set[str] = set()
        for r in report.results:
            for stage in r.stages:
                if stage.defense not in seen:
                    seen.add(stage.defense)
                    m.stage_duration.labels(pipeline, stage.defense).observe(stage.seconds)
            for key, score in r.scores.items():
                m.detector_score.labels(pipeline, key.split("/", 1)[0]).observe(score)
            for defense in {rej.defense for rej in r.rejected_by}:
                m.rejections.labels(pipeline, defense).inc()
            if r.status == "abstained":
                m.abstentions.labels(pipeline).inc()
            if r.certified_radius is not None:
                m.certified_radius.labels(pipeline).observe(r.certified_radius)
            m.images.labels(pipeline, r.status).inc()

    async def close(self) -> None:
        for b in self.batchers.values():
            await b.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
