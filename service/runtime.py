"""Everything a running service holds, built from settings by the app factory: the verified
bundle, the pipelines, one batcher per pipeline, the metrics. No module-level state."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import torch
from pydantic_settings import PydanticBaseSettingsSource, SettingsConfigDict

from models.bundle import TRAINED_DEFENSES, Bundle, canonical_defenses, defense_key, defense_name
from service.admission import Admission, image_cost, sample_weights, sampling_cost
from service.batcher import Batcher, BatchReport, Screen
from service.compute import ComputeThread
from service.defenses.base import DefenseEnv, RunContext, optimize_argmax_decision, optimize_for_cpu
from service.defenses.query_monitor import GATE_KEY, NEAR_GATE_KEY, QueryMonitor, Verdict, fingerprint_width
from service.imaging import ImageLimits
from service.metrics import Metrics, multiprocess_dir
from service.pipeline import ImageResult, Pipeline, PipelineConfigError, Rejection, Stage
from service.settings import Settings, read_config_file

T = TypeVar("T")
log = logging.getLogger("shieldserve")


class UnknownPipeline(KeyError):
    pass


def monitor_rejection(verdict: Verdict, i: int) -> Rejection:
    """The query monitor's rejection of image i of a screened request: its shared hashes, or
    (an image the hashes let through) the pixel check: a suspect's by its L-inf distance to the
    client's nearest remembered image, rejected at or below `suspect_linf`; any other client's
    by how many of its remembered images are that close, rejected at `near_matches`."""
    if verdict.by_hashes(i) or not verdict.near:
        return Rejection("query_monitor", "fingerprint_match", verdict.score(i), verdict.threshold / verdict.top_n)
    if verdict.suspect:
        return Rejection("query_monitor", "suspect_near", float(verdict.near[i] or 0.0), verdict.suspect_linf)
    return Rejection("query_monitor", "near_queries", float(verdict.near_counts[i]), float(verdict.near_needed))


def monitor_result(verdict: Verdict, i: int) -> ImageResult:
    """The answer to image i of a screened request that the query monitor rejects (on /predict's
    batches and on /certify alike, so the two count it alike)."""
    return ImageResult(status="rejected", rejected_by=[monitor_rejection(verdict, i)],
                       stages=[Stage("query_monitor", "monitor", verdict.seconds)])


class _PackagedSettings(Settings):
    """Settings from their init values alone: no environment, no .env (packaged_settings)."""

    model_config = SettingsConfigDict(**{**Settings.model_config, "title": "settings"})

    @classmethod
    def settings_customise_sources(cls, settings_cls: Any, init_settings: PydanticBaseSettingsSource,
                                   **others: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


def packaged_settings(bundle: Any) -> Settings:
    """The settings of the packaged configuration alone (service/default_config.yaml), with no
    config file, SHIELDSERVE_CONFIG or SHIELDSERVE_* variable: the ones the quality gate measures
    each defense with (models.recipes.quality.GATED), and builds its pipeline with again wherever a
    verdict's digest is matched on another machine (`gated_digests`). Read from the environment, a
    variable set while training (SHIELDSERVE_CERTIFY__PREDICT_N) would have the gate measure, and
    `gated_digests` rebuild, another pipeline than the packaged one. Here, not in the gate's module:
    serving never imports a training recipe."""
    return _PackagedSettings(**{**read_config_file(None), "bundle": str(bundle)})


def gated_digests(bundle: Bundle, classifier: Any, device: torch.device) -> Callable[[list[Any]], str | None]:
    """The `here` of models.bundle.Bundle.composition: a function giving the `settings_digest` a
    verdict's pipeline (its recorded `pipeline` entries) has when built on this machine with the
    packaged settings, or None where it does not build. A digest also records what the machine
    decides (smoothing's bfloat16 on a CPU that has it natively, RMC's parallel images and faiss
    index on a GPU): a bundle gated on a GPU and served on a CPU differs from the verdict's digest
    in its packaged pipelines too, and is not refused them for it. Each pipeline is built once,
    when first asked (RMC's takes seconds), and only where the recorded digest differs."""
    cache: dict[str, str | None] = {}
    envs: list[DefenseEnv] = []  # the packaged settings' environment, made at the first pipeline built

    def digest(entries: list[Any]) -> str | None:
        key = canonical_defenses(entries)
        if key not in cache:
            try:
                if not envs:
                    envs.append(DefenseEnv(bundle=bundle, classifier=classifier, device=device,
                                           settings=packaged_settings(bundle.path)))
                env = envs[0]
                cache[key] = Pipeline.build("quality:gated", {"defenses": list(entries)}, env).settings_digest
            except Exception as exc:  # noqa: BLE001 - unknown is not "the same": the pipeline stays unmeasured
                log.warning("the quality gate's pipeline %s does not build here: %s", key, exc)
                cache[key] = None
        return cache[key]

    return digest


def serving_device(spec: str) -> torch.device:
    """The torch device of the `device` setting, or a ValueError that names it: torch's own
    error (a traceback and exit 1) for `tpu`, `cuda:x`, or `cuda` where torch sees no GPU."""
    hint = "use cpu, cuda, cuda:N or auto"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"device {spec!r} is not a device torch knows: {hint}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: torch sees no CUDA GPU here (torch {torch.__version__}); {hint}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type != "cpu":
        raise ValueError(f"device {spec!r}: shieldserve serves on the CPU or a CUDA GPU; {hint}")
    return device


class Runtime:
    def __init__(self, settings: Settings) -> None:
        # Every torch call of this runtime runs on one thread, loading included (service/compute.py)
        self.compute = ComputeThread()
        try:
            self.compute.call(self._load, settings)
        except BaseException:
            self.compute.close()
            raise

    def _load(self, settings: Settings) -> None:
        self.settings = settings
        self.device = serving_device(settings.device)
        started = time.monotonic()
        self.bundle = Bundle.load(settings.bundle, trusted_imports=settings.trusted_imports)  # verifies every sha256; raises BundleError
        self.bundle.require_finished()
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
        # each served pipeline's own gate verdict as a whole (None: its one trained defense's verdict,
        # or none, speaks for it; models.bundle.Bundle.composition)
        together: dict[str, dict[str, Any] | None] = {}
        # the digests the gate's own pipelines have here, with the packaged settings: asked only of
        # a pipeline whose one defense's verdict records another digest than it has (another
        # machine, or other settings), each built once
        here = gated_digests(self.bundle, self.classifier, self.device)
        for name, cfg in settings.pipelines.items():
            config = cfg.model_dump()
            reason = self._unusable(config)
            if reason is None:
                pipeline = Pipeline.build(name, config, env)  # a config error fails start-up
                # its parts pass one by one; together? (built first: a pipeline that does not build
                # is a configuration error, not a gate verdict)
                together[name] = self.bundle.composition(config.get("defenses", []), pipeline.settings_digest, here)
                if together[name] is None or together[name].get("usable", True):
                    self.pipelines[name] = pipeline
                    continue
                reason = str(together[name].get("reason", "marked unusable by the quality gate"))
            log.warning("pipeline %s is not served: %s", name, reason)
            self.unavailable[name] = reason
        if settings.default_pipeline in self.unavailable and self.pipelines:
            fallback = next((n for n, p in self.pipelines.items() if p.components), next(iter(self.pipelines)))
            log.warning("default pipeline %s is not served (%s); the default is %s instead",
                        settings.default_pipeline, self.unavailable[settings.default_pipeline], fallback)
            self.settings = settings = settings.model_copy(update={"default_pipeline": fallback})
        certify_with = settings.certify.pipeline
        if certify_with not in self.pipelines or not self.pipelines[certify_with].certifies:
            # /certify without pipeline= would fall back to the default pipeline quietly, which
            # need not certify: say which pipeline it uses instead, or that none certifies. A
            # served one without a certificate (a config that gave it other defenses) too: it
            # answered a 422 saying it was not served
            why = ("served, but it does not certify" if certify_with in self.pipelines
                   else self.unavailable.get(certify_with, "not configured"))
            certifying = [n for n, p in self.pipelines.items() if p.certifies]
            instead = (settings.default_pipeline if settings.default_pipeline in certifying
                       else certifying[0] if certifying else None)
            if instead is not None:
                log.warning("certify.pipeline %s is not used (%s); /certify without pipeline= uses %s instead",
                            certify_with, why, instead)
                self.settings = settings = settings.model_copy(
                    update={"certify": settings.certify.model_copy(update={"pipeline": instead})})
            else:
                log.warning("certify.pipeline %s is not used (%s) and no served pipeline certifies: /certify "
                            "answers 422", certify_with, why)
        unknown_costs = sorted(set(settings.admission.cost_per_image) - set(settings.pipelines))
        if unknown_costs:  # a misspelt name was never used, silently
            raise PipelineConfigError(f"admission.cost_per_image names pipelines that are not configured: "
                                      f"{unknown_costs}; pipelines: {sorted(settings.pipelines)}")
        if settings.default_pipeline not in self.pipelines:
            raise PipelineConfigError(f"default_pipeline {settings.default_pipeline!r} is not configured; "
                                      f"pipelines: {sorted(self.pipelines)}")
        # served defenses the quality gate did not vouch for (measured below it but not enforced,
        # or never measured): served, since the bundle says so, but never silently
        self.quality_status: dict[str, tuple[str | None, str | None]] = self._gate_warnings(settings, together)
        # the quality gate found the monitor flags too many of this bundle's own benign images
        # (near-duplicate data): every pipeline runs without it, and /pipelines says why
        self.monitor_off: str | None = self.bundle.unusable(GATE_KEY)
        if self.monitor_off is not None and any(p.monitor for p in self.pipelines.values()):
            log.warning("the query monitor is off on this bundle: %s", self.monitor_off)
            for p in self.pipelines.values():
                p.monitor = None
        # the suspect pixel check would reject many of a suspect's benign images on this data
        # (low resolution, few levels): the monitor runs without it, and /pipelines says so
        self.suspect_linf_off: str | None = self.bundle.unusable(NEAR_GATE_KEY) if self.monitor_off is None else None
        if self.suspect_linf_off is not None and any(p.monitor for p in self.pipelines.values()):
            log.warning("the query monitor's suspect pixel check is off on this bundle: %s", self.suspect_linf_off)
            for p in self.pipelines.values():
                if p.monitor is not None:
                    p.monitor = replace(p.monitor, suspect_linf=0.0)
        values = math.prod(self.input_spec.shape)
        if any(p.monitor for p in self.pipelines.values()) and settings.query_monitor.window > values:
            # it hashes windows of the flattened image: every monitored request would be a 500
            raise PipelineConfigError(f"query_monitor.window ({settings.query_monitor.window}) is larger than this "
                                      f"bundle's images ({values} values): lower it, or turn the monitor off "
                                      f"(query_monitor: false on each pipeline)")
        width = fingerprint_width(tuple(self.input_spec.shape), settings.query_monitor.top_n)
        too_high = {n: p.monitor.threshold for n, p in self.pipelines.items()
                    if p.monitor is not None and p.monitor.threshold > width}
        if too_high:
            # a query shares at most `width` hashes with a remembered one: a higher threshold
            # could never be met (it was once lowered to the width unsaid, flagging exact copies only)
            raise PipelineConfigError(f"query_monitor threshold {too_high} is above the {width} hashes a query of "
                                      f"this bundle has (top_n {settings.query_monitor.top_n} and one per column): "
                                      f"set it to at most {width}")
        self.metrics = Metrics(shared_monitor=settings.query_monitor.store == "redis")
        self.monitor = self._build_monitor() if any(p.monitor for p in self.pipelines.values()) else None
        # exposed at 0 from the first scrape (QueryAttackSuspected)
        self.metrics.declare_monitored_pipelines(n for n, p in self.pipelines.items() if p.monitor)
        # Inference runs off the event loop, on the compute thread: each pipeline's batcher
        # forms its batches in its own thread and hands each to it (service/batcher.py), as
        # do the warm-up and GET /certify. torch parallelises inside each call. This pool runs
        # what is not torch: the uploads' decode (Pillow) and the query monitor's screening
        # (numpy, maybe Redis); bounded, so a flood of costly uploads takes at most its threads.
        self.executor = ThreadPoolExecutor(max_workers=max(2, min(8, len(self.pipelines))),
                                           thread_name_prefix="shieldserve-infer")
        # smoothing's noise (and Defense-GAN's restarts) per image from a keyed hash of it
        # (RunContext.noise_key): the same image gets the same answer. Derived from the query monitor's
        # secret where one is set (docker-compose sets it), else from the key the monitor's
        # replicas share through Redis, so every worker and replica sharing either answers from
        # the same noise (a resend to another one draws nothing new); else per process
        qm_secret = settings.query_monitor.secret
        purpose = b"shieldserve smoothing noise"
        shared = self.monitor.shared_derived_key(purpose) if self.monitor is not None else None
        self.noise_key = (hashlib.sha256(purpose + qm_secret.get_secret_value().encode()).digest() if qm_secret
                          else shared or os.urandom(32))
        # Defense-GAN's restarts are drawn with the same key (per image, since stop 47): a
        # pipeline with one draws afresh in another process too, certifying or not
        noisy = [n for n, p in self.pipelines.items() if p.certifies or any(
            defense_name(defense_key(e)) == "defensegan" for e in settings.pipelines[n].defenses)]
        if not qm_secret and shared is None and (settings.workers > 1 or settings.query_monitor.store == "redis") \
                and noisy:
            log.warning("the noise key (smoothing's samples, Defense-GAN's restarts) is this process's own (no "
                        "query_monitor.secret%s): each of the %s answers a resent image from its own noise draw, "
                        "so a client resending an image to another one gets a fresh try at its answer or "
                        "certificate; set query_monitor.secret, the same everywhere",
                        "" if settings.query_monitor.store == "memory" else
                        ", and no key shared through Redis at start: it keeps its own until restarted",
                        "workers" if settings.workers > 1 else "replicas")
        b = settings.batching
        self.batchers = {
            name: Batcher(name, pipeline.run, device=self.device, enabled=b.enabled,
                          execute=lambda work, n=name: self.compute.call(work, threads=self._threads(n)),
                          max_batch_size=b.max_batch_size, max_delay_ms=b.max_delay_ms,
                          company_wait_ms=b.company_wait_ms,
                          max_queue=b.max_queue, retry_after_s=b.retry_after_s,
                          on_batch=lambda report, n=name: self._observe_batch(n, report),
                          on_queue_change=lambda depth, n=name: self.metrics.queue_depth.labels(n).set(depth),
                          screen=self._batch_screen(pipeline) if self.monitor and pipeline.monitor else None,
                          noise_key=self.noise_key)
            for name, pipeline in self.pipelines.items()
        }
        a = settings.admission
        self.admission = Admission(a.max_cost, a.max_concurrent, a.retry_after_s,
                                   on_change=self.metrics.cost_in_flight.set, max_client_cost=a.max_client_cost,
                                   max_queue=settings.batching.max_queue)
        # what one sample of each certifying decider weighs, in classifier passes (FLOPs)
        self.sample_weights = {name: sample_weights(p, tuple(self.input_spec.shape), self.device)
                               for name, p in self.pipelines.items()}
        self.ready = False
        self.load_seconds = time.monotonic() - started
        # the device named: a GPU image whose environment says `cpu` serves on the CPU, and
        # nothing else at start-up says so
        log.info("bundle %s (version %s) loaded on %s in %.2fs with pipelines %s", self.bundle.name,
                 self.bundle.version, self.device, self.load_seconds, sorted(self.pipelines))

    def _build_monitor(self) -> QueryMonitor:
        qm = self.settings.query_monitor
        m = self.metrics

        def degraded(down: bool) -> None:
            m.monitor_degraded.set(1 if down else 0)
            if down:
                m.monitor_store_errors.inc()

        monitor = QueryMonitor.from_settings(qm, on_degraded=degraded)
        # the count at scrape time: a block ends without a request, by its cooldown alone
        m.before_scrape(self._count_blocked)
        return monitor

    def _count_blocked(self) -> None:
        """Set `blocked_clients` from the monitor's count (it may ask Redis: off the loop)."""
        if self.monitor is not None:
            self.metrics.blocked_clients.set(self.monitor.blocked_count())

    def _refresh_blocked(self) -> None:
        """`_count_blocked` in a worker thread."""
        try:
            self.executor.submit(self._count_blocked)
        except RuntimeError:  # the runtime is closing: its executor takes no more work
            pass

    async def offload(self, fn: Callable[[], T]) -> T:
        """`fn()` in this runtime's worker threads (a decode, a parse, a screen): never on the
        event loop. A plain executor hop: anyio's to_thread (Starlette's run_in_threadpool)
        cost the loop about 0.1 ms more per call (bench/request_overhead.py). In the caller's
        context, so that what `fn` logs carries the request's id."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, contextvars.copy_context().run, fn)

    async def screen(self, pipeline: Pipeline, x: torch.Tensor, client: str | None) -> Verdict | None:
        """The query monitor's verdict on a request's images (None: not monitored). Raises
        AttackSuspected for a blocked client. Runs in a worker thread: numpy, maybe Redis."""
        if not self._monitors(pipeline, client):
            return None
        verdict = await self.offload(lambda: self.monitor.screen(pipeline.monitor, x, client))  # type: ignore[union-attr,arg-type]
        return self._observe(pipeline, verdict)

    def _monitors(self, pipeline: Pipeline, client: str | None) -> bool:
        return self.monitor is not None and pipeline.monitor is not None and client is not None

    def _observe(self, pipeline: Pipeline, verdict: Verdict) -> Verdict:
        """On the event loop: the verdict's metrics."""
        m = self.metrics
        m.monitor_seconds.observe(verdict.seconds)
        for i in range(len(verdict.matches)):
            m.monitor_distance.labels(pipeline.name).observe(1.0 - verdict.score(i))
        flagged = sum(verdict.flagged)
        if flagged:
            m.monitor_flags.labels(pipeline.name).inc(flagged)
        if verdict.blocked_now:
            m.monitor_blocks.labels(pipeline.name).inc()
            # With --workers a scrape reaches one process, which refreshes only its own value:
            # this one's count rises now and, since the others' scrapes never refresh it, falls
            # again when the block ends (1 s late: the block ends by the wall clock, the timer
            # runs on the monotonic one)
            self._refresh_blocked()
            if multiprocess_dir() and pipeline.monitor is not None:
                self._refresh_blocked_after(pipeline.monitor.cooldown_s + 1.0)
        return verdict

    def _refresh_blocked_after(self, seconds: float) -> None:
        try:  # a timer of the event loop (it runs there): no thread per block
            asyncio.get_running_loop().call_later(seconds, self._refresh_blocked)
        except RuntimeError:
            log.warning("blocked_clients: no event loop to refresh it when a block ends")

    def _batch_screen(self, pipeline: Pipeline) -> Screen:
        """The query monitor as the pipeline's batcher sees it (service/batcher.Screen): one
        fingerprinting of the whole batch on the compute thread, then each request judged in
        queue order; a flagged image is answered with the monitor's rejection (reject and
        block modes), a blocked client's request with AttackSuspected (429)."""
        def screen(x: torch.Tensor, parts: list[tuple[str | None, int]]
                   ) -> tuple[list[ImageResult | None], list[BaseException | None], list[Any]]:
            answered: list[ImageResult | None] = [None] * int(x.shape[0])
            errors: list[BaseException | None] = [None] * len(parts)
            starts = [0]
            for _, n in parts:
                starts.append(starts[-1] + n)
            judged = [i for i, (client, _) in enumerate(parts) if client is not None]
            rows = [r for i in judged for r in range(starts[i], starts[i + 1])]
            verdicts = self.monitor.screen_parts(  # type: ignore[union-attr]
                pipeline.monitor, x if len(rows) == len(answered) else x[rows],  # type: ignore[arg-type]
                [parts[i] for i in judged])  # type: ignore[misc]
            report: list[Verdict] = []
            for i, verdict in zip(judged, verdicts):
                if isinstance(verdict, BaseException):  # AttackSuspected, or this request's failure alone
                    errors[i] = verdict
                    continue
                report.append(verdict)
                for k, flagged in enumerate(verdict.flagged):
                    if flagged and verdict.reject:
                        answered[starts[i] + k] = monitor_result(verdict, k)
            return answered, errors, report

        return screen

    async def infer(self, pipeline: str, x: torch.Tensor, *, deadline: float | None = None,
                    options: dict[str, Any] | None = None, client: str | None = None) -> list[ImageResult]:
        """Run `x` through `pipeline`; with `client`, the query monitor screens it first and
        admission weighs it against the client's share too (`admission.max_client_cost`)."""
        p = self.pipeline(pipeline)
        images = int(x.shape[0])
        with self.admission.hold(self.cost(pipeline, images, options), f"{images} image(s) on {pipeline!r}", client,
                                 images):
            # the batcher of a monitored pipeline screens the batch first (_batch_screen)
            return await self.batchers[p.name].submit(x, deadline=deadline, options=options, client=client)

    def _threads(self, pipeline: str) -> int | None:
        """Intra-op threads for a batch (None: all): the pipeline's own `threads:`, else one
        where an image weighs less than `parallel_min_cost` sample units (2 by default: the
        undefended classifier alone; service/compute.py)."""
        cfg = self.settings.pipelines.get(pipeline)
        if cfg is not None and cfg.threads is not None:
            return cfg.threads
        return 1 if self.cost(pipeline, 1) < self.settings.parallel_min_cost else None

    def _unusable(self, config: dict[str, Any]) -> str | None:
        """Why a configured pipeline cannot be served on this bundle (models.bundle.Bundle.unusable
        for each defense it names), or None."""
        for entry in config.get("defenses", []) or []:
            key = defense_key(entry)
            reason = self.bundle.unusable(key)
            if reason is not None:
                return f"{key}: {reason}"
        return None

    def _gate_warnings(self, settings: Settings, together: dict[str, dict[str, Any] | None]
                       ) -> dict[str, tuple[str | None, str | None]]:
        """Each served pipeline's quality-gate status, and one WARNING per served defense the
        gate did not pass: "below_gate_not_enforced" (measured below it on a bundle whose gate
        does not enforce, e.g. the quick preset) or "unmeasured" (no verdict: the gate was off,
        `quality.images` 0), and per pipeline its verdict as a whole (`together`, computed as it was
        built). Returns {pipeline: (status, note)}: the worst status of its
        trained defenses ("passed" when all passed; None when it has none; "below_gate_not_enforced"
        for every pipeline when the gate's check of the base classifier failed) and the warnings."""
        gate = self.bundle.manifest.get("quality", {})
        dataset = self.bundle.manifest.get("build", {}).get("dataset", "DATASET")

        def fix_with(bundle: str, data: str) -> str:
            return (f"to measure and enforce it: `shieldserve train --out {bundle} --dataset {data} --steps quality "
                    f"--options '{{\"quality\": {{\"images\": 300, \"enforce\": true}}}}'` (the default preset "
                    f"measures and enforces without --options)")

        # GET /pipelines answers anyone: its notes name no path of this machine (the bundle's,
        # the dataset's); the operator's log has the command with them
        fix, fix_here = fix_with("BUNDLE", "DATASET"), fix_with(str(settings.bundle), str(dataset))
        base_note = (gate.get("base") or {}).get("reason")
        if base_note:  # the gate's check of the base classifier, recorded but not enforced (quick preset)
            log.warning("the quality gate's check of the base classifier failed: %s", base_note)
        users: dict[str, list[str]] = {}  # defense key -> the served pipelines that run it
        for name in self.pipelines:
            for entry in settings.pipelines[name].model_dump().get("defenses", []) or []:
                key = defense_key(entry)
                if defense_name(key) in TRAINED_DEFENSES and name not in users.setdefault(key, []):
                    users[key].append(name)
        status: dict[str, str] = {}
        notes: dict[str, str] = {}
        for key, names in users.items():
            q = self.bundle.quality(key)
            served = f"pipelines {', '.join(names)}"
            if q is not None and q.get("passes") is True:
                status[key] = "passed"
                continue
            if q is not None and q.get("passes") is False:
                status[key] = "below_gate_not_enforced"
                notes[key] = (f"defense {key} is served below the quality gate ({served}): clean validation accuracy "
                              f"{q.get('val_accuracy')} vs the base classifier's {q.get('base_val_accuracy')} on "
                              f"{q.get('images')} images (drop {q.get('accuracy_drop')}, allowed "
                              f"{gate.get('max_accuracy_drop')}); quality.enforce is false on this bundle; {fix}")
            else:
                status[key] = "unmeasured"
                why = ("the quality gate has no verdict on it" if gate else "the bundle was built without the "
                       "quality gate (the quick preset, or quality.images 0)")
                notes[key] = (f"defense {key} is served unmeasured ({served}): {why}, so nothing checked its clean "
                              f"accuracy; {fix}")
            log.warning("%s", notes[key].replace(fix, fix_here))
        worst = ("below_gate_not_enforced", "unmeasured", "passed")
        out: dict[str, tuple[str | None, str | None]] = {}
        for name in self.pipelines:
            keys = [k for k, names in users.items() if name in names]
            found = [status[k] for k in keys]
            said = [notes[k] for k in keys if k in notes]
            whole = together.get(name)  # the pipeline's own verdict (models.bundle.Bundle.composition)
            if whole is not None and whole.get("passes") is not True:
                below = whole.get("passes") is False
                found.append("below_gate_not_enforced" if below else "unmeasured")
                why = str(whole.get("reason"))
                if "not enforced" not in why:
                    why += "; quality.enforce is false on this bundle"
                # one trained defense: its verdict passed, but with other settings than these
                what = "as a whole" if len(keys) > 1 else "with its own settings"
                note = f"pipeline {name} is served {'below the quality gate' if below else 'unmeasured'} {what}: {why}"
                log.warning("%s", note)
                said.append(note)
            if base_note:  # every pipeline serves the base classifier (or is measured against it)
                found.append("below_gate_not_enforced")
                said.append(f"the quality gate's check of the base classifier failed (not enforced on this "
                            f"bundle): {base_note}")
            pick = next((w for w in worst if w in found), None)
            out[name] = (pick, "; ".join(said) or None)
        return out

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
        p = self.pipeline(pipeline)
        weights = getattr(self, "sample_weights", {}).get(p.name)
        per_image = self.settings.admission.cost_per_image.get(p.name)
        if per_image is None:
            per_image = image_cost(p, options, weights)
        else:  # the operator's figure, plus a certifying decider's samples (settings: "adds n0 + n")
            per_image = float(per_image) + sampling_cost(p, options, weights)
        return float(per_image) * images

    async def classify(self, pipeline: str, images: int, decode: Callable[[], torch.Tensor], *,
                       deadline: float | None = None, options: dict[str, Any] | None = None,
                       client: str | None = None) -> tuple[torch.Tensor, list[ImageResult]]:
        """An upload's way through the service: admission (Overloaded at once when over
        budget, before anything is decoded), then `decode()` in a worker thread (an image
        decode never runs on the event loop), then the pipeline's batch, which the query
        monitor screens first (with `client`, which admission also weighs against its share).
        Returns the decoded images with their results."""
        p = self.pipeline(pipeline)

        def decoded() -> torch.Tensor:
            x = decode()
            if int(x.shape[0]) != images:
                raise ValueError(f"decoded {int(x.shape[0])} images, expected {images}")
            return x

        batcher = self.batchers[p.name]
        with self.admission.hold(self.cost(pipeline, images, options), f"{images} image(s) on {pipeline!r}", client,
                                 images):
            with batcher.expecting(images) as on_its_way:
                x = await self.offload(decoded)
                return x, await batcher.submit(x, deadline=deadline, options=options, client=client,
                                               expected=on_its_way)

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
        for verdict in report.screened:
            self._observe(self.pipelines[pipeline], verdict)
        m.batch_size.labels(pipeline).observe(report.size)
        for wait in report.queue_waits:
            m.queue_wait.labels(pipeline).observe(wait)
        self.observe_results(pipeline, report.results)

    def observe_results(self, pipeline: str, results: Sequence[ImageResult]) -> None:
        """The per-image metrics of a pipeline's answers (stages, detector scores, rejections,
        abstentions, radii, images): a batch's, and an unbatched /certify run's."""
        m = self.metrics
        seen: set[str] = set()
        for r in results:
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
        if self.monitor is not None:
            self.monitor.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.compute.close(timeout=0)
