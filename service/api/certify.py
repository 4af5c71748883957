"""GET /certify and POST /certify: a randomized-smoothing certificate for one image.

GET certifies an image recently posted to /predict or /certify (found by the sha256 of its
bytes in the bounded store: in memory, or on Redis shared by every replica, when a Redis that
cannot be reached answers 503 `store_unavailable`); POST takes the image itself and works
without the store. Certification is expensive, so it
runs on the runtime's compute thread, off the event loop, and stops at the request's deadline.
Certificates are cached by (image, pipeline, bundle version, sigma, n0, n, alpha, radius, seed).
A seed the client passed is marked in the answer (`seed_chosen_by_client`): the alpha of a
certificate holds over the service's own noise, not over seeds a client may pick and retry.
With `api_keys` set, images and certificates are each key-holder's own (service.store.image_key):
another key's GET of the same sha256 is a 404 `unknown_image`, as for an image never posted.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from models.bundle import defense_key
from service.api.clients import client_of, require_api_key
from service.api.errors import ApiError, echo
from service.api.predict import (
    Deadline, attack_suspected_error, check_uploads, decode_uploads, overloaded_error, read_images,
    remember_within, request_deadline, store_call, tracked,
)
from service.api.render import rejection_out, render
from service.api.schemas import ErrorBody, RejectionOut
from service.batcher import Overloaded, outlives
from service.defenses.base import DeadlineExceeded, RunContext
from service.defenses.query_monitor import AttackSuspected
from service.defenses.smoothing import MAX_RADIUS, MIN_ALPHA
from service.runtime import Runtime, monitor_result
from service.store import StoreUnavailable, image_key, image_owner

router = APIRouter(tags=["certify"])

_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)}
_HEX64 = re.compile(r"[0-9a-f]{64}")


class CertifyResponse(BaseModel):
    image_sha256: str
    pipeline: str
    model_version: str
    status: str = Field(description="accepted | abstained | rejected (by a detector before smoothing)")
    label: int | None
    class_name: str | None = None
    abstained: bool = Field(description="true when no certified label is given: abstained, or rejected before "
                                        "smoothing (`status` says which)")
    radius: float | None = Field(description="certified L2 radius; null when abstained or rejected")
    p_a_lower: float | None
    sigma: float
    n0: int = Field(description="selection samples drawn (0 when rejected before smoothing)")
    n: int = Field(description="estimation samples drawn (fewer than asked with radius=)")
    alpha: float
    samples: int = Field(description="all noise samples drawn: n0 + n")
    seconds: float
    seed: int | None = Field(description="the noise seed: pass it back as seed= to reproduce this certificate")
    seed_chosen_by_client: bool = Field(
        False, description="true when the request passed seed=: the certificate reproduces the one that seed "
                           "gives, and its alpha holds only if the seed was not chosen after seeing results "
                           "(false: the service drew the seed, and alpha holds over its noise)")
    batch_size: int | None = None
    target_radius: float | None = None
    certified: bool | None = Field(None, description="with radius=: is the label certified at that radius")
    cached: bool = False
    rejected_by: list[RejectionOut] = Field(default_factory=list)


def _default_pipeline(runtime: Runtime) -> str:
    """/certify's pipeline without pipeline=: certify.pipeline where served, else the default one."""
    cfg = runtime.settings.certify
    return cfg.pipeline if cfg.pipeline in runtime.pipelines else runtime.settings.default_pipeline


def _params(runtime: Runtime, pipeline: str | None, sigma: float | None, n: int | None, n0: int | None,
            alpha: float | None, radius: float | None, seed: int | None) -> tuple[str, dict[str, Any]]:
    cfg = runtime.settings.certify
    name = pipeline or _default_pipeline(runtime)
    if name not in runtime.pipelines:
        raise ApiError(404, "unknown_pipeline", f"no pipeline {echo(name)}; configured: {', '.join(sorted(runtime.pipelines))}")
    decider = runtime.pipelines[name].decider
    if not getattr(decider, "certifies", False):
        if pipeline is None:  # certify.pipeline is not served or does not certify, and no served pipeline certifies
            why = ("does not certify" if cfg.pipeline in runtime.pipelines
                   else f"is not served ({runtime.unavailable.get(cfg.pipeline, 'not configured')})")
            raise ApiError(422, "invalid_parameter", f"certify.pipeline {cfg.pipeline!r} {why} and no served "
                           f"pipeline certifies")
        raise ApiError(422, "invalid_parameter", f"pipeline {name!r} does not certify; use a smoothing pipeline")
    n = cfg.default_n if n is None else n
    n0 = cfg.default_n0 if n0 is None else n0
    if n > cfg.max_n:
        raise ApiError(422, "invalid_parameter", f"n={n} is above this server's maximum of {cfg.max_n}")
    if n0 > cfg.max_n0:
        raise ApiError(422, "invalid_parameter", f"n0={n0} is above this server's maximum of {cfg.max_n0}")
    sigma = float(decider.sigma) if sigma is None else float(sigma)  # type: ignore[attr-defined]
    # each sigma's network has its own quality-gate verdict (models.bundle.defense_key): one the
    # gate found ruins clean accuracy, or did not measure where it is enforced, is not served here
    # either (the pipeline's own sigma passed it, or the pipeline would not be served)
    denoiser = bool(getattr(decider, "use_denoiser", False))

    def refused(s: float) -> str | None:
        return runtime.bundle.unusable(defense_key({"defense": "smoothing", "sigma": s, "denoiser": denoiser}))

    if sigma not in decider.sigmas:  # type: ignore[attr-defined]
        served = [float(s) for s in decider.sigmas if refused(float(s)) is None]  # type: ignore[attr-defined]
        raise ApiError(422, "invalid_parameter", f"sigma={sigma:g} is not available on pipeline {name!r}; "
                       f"choose from {served}")
    unusable = refused(sigma)
    if unusable is None and sigma != float(decider.sigma):  # type: ignore[attr-defined]
        # and the pipeline as a whole at that sigma (MagNet's rejections with its abstentions):
        # its gate record is of the configured sigma, so its parts' bound speaks for it
        config = runtime.settings.pipelines.get(name)
        entries = [{**e, "sigma": sigma} if isinstance(e, dict) and e.get("defense") == "smoothing" else e
                   for e in (config.model_dump().get("defenses", []) if config is not None else [])]
        unusable = runtime.bundle.composition_refusal(entries)
    if unusable is not None:
        raise ApiError(422, "invalid_parameter", f"sigma={sigma:g} is not served on pipeline {name!r}: {unusable}")
    opts: dict[str, Any] = {"sigma": sigma, "n": n, "n0": n0, "alpha": cfg.alpha if alpha is None else alpha}
    if radius is not None:
        opts["radius"] = radius + 0.0  # -0.0 as 0.0: echoed, and cached, as one radius
    else:
        opts["certify"] = True  # the full CERTIFY for the largest radius, not the pipeline's target
    if seed is not None:
        opts["seed"] = seed
    return name, opts


async def _certify(request: Request, digest: str, owner: str | None, x, name: str, opts: dict[str, Any],
                   deadline: Deadline, client: str) -> CertifyResponse:
    runtime: Runtime = request.app.state.runtime
    store = request.app.state.store
    pipeline = runtime.pipelines[name]
    # the image's store key, not its bare digest: a certificate is scoped as its image is, so no
    # key-holder is answered (or shown `cached`) from another's certificate. Without API keys the
    # images are shared, but each client gets its own certificates (the requester last; the
    # store still counts them in one shared pool): shared, one client could evict and re-draw the
    # cached certificate another is served, choosing its noise, which alpha assumes nobody does
    key = (image_key(owner, digest), name, pipeline.settings_digest, runtime.bundle.version, opts["sigma"],
           opts["n0"], opts["n"], opts["alpha"], opts.get("radius"), opts.get("seed"),
           client if owner is None else None)
    try:  # the store is a cache here: one that is down costs the caching, not the answer
        cached = await store_call(runtime, store, lambda: store.get_certificate(key))
    except StoreUnavailable:
        cached, store = None, None
    if cached is not None:  # the key holds the seed or None: whose seed it was is the request's
        return CertifyResponse(**{**cached, "cached": True, "seed_chosen_by_client": "seed" in opts})
    gone = threading.Event()  # set when the client disconnects: the sampling loop stops
    # on the compute thread, letting the batches queued behind it run between its noise batches
    # without seed=, the image's noise comes from a keyed hash of it and of what it is asked
    # (RunContext.noise_key), as on /predict: a certificate the cache no longer holds is
    # computed again from the same noise, not redrawn
    ctx = RunContext(device=runtime.device, seed=int(opts.get("seed", secrets.randbits(63))),
                     deadline=deadline.at, cancelled=gone.is_set, options=dict(opts),
                     between=runtime.compute.between, noise_key=runtime.noise_key)
    cost = runtime.cost(name, 1, opts)
    try:
        with runtime.admission.hold(cost, f"certifying with n0={opts['n0']}, n={opts['n']}", client):
            work = asyncio.wrap_future(runtime.compute.submit(pipeline.run, x.unsqueeze(0).to(runtime.device), ctx,
                                                               long=True))
            try:
                # answered at the deadline, not when the sampling loop next looks at it (between
                # chunks of batch_size copies: ~2 s on `denoised`): the loop is stopped, and
                # the cost held until it has (admission.hold's outlives)
                async with asyncio.timeout(max(0.0, deadline.remaining())):
                    [result] = await asyncio.shield(work)
            except TimeoutError:
                gone.set()
                let_go = outlives.get()()  # type: ignore[misc]  # set by admission.hold
                work.add_done_callback(lambda done: (done.cancelled() or done.exception(), let_go()))
                raise DeadlineExceeded("the request's deadline passed") from None
            except asyncio.CancelledError:
                # the client went away: stop the sampling loop, and hold the cost until it has
                gone.set()
                try:
                    await work
                except Exception:  # noqa: BLE001 - DeadlineExceeded("client disconnected")
                    pass
                raise
    except Overloaded as exc:
        raise overloaded_error(exc) from None
    except DeadlineExceeded:
        err = deadline.error()
        err.message += "; ask for a smaller n"
        raise err from None
    # the metrics a batch's results move (stage durations, detector scores, rejections,
    # abstentions, radii) move for this unbatched run too, from the same code: a /certify that
    # MagNet rejects counts as a /predict one does (batch_size stays the batcher's)
    runtime.observe_results(name, [result])
    cert = result.details.get("certificate") or {}
    out = render(result)
    body = CertifyResponse(
        image_sha256=digest, pipeline=name, model_version=runtime.bundle.version, status=out.status,
        label=out.label, class_name=out.class_name, abstained=out.status != "accepted",
        radius=out.certified_radius, p_a_lower=cert.get("p_a_lower"), sigma=opts["sigma"],
        # rejected before any sample (no certificate): none drawn, so n0 + n = samples = 0
        n0=cert.get("n0", 0), n=cert.get("n", 0), alpha=opts["alpha"], samples=cert.get("samples", 0),
        seconds=round(float(cert.get("seconds", 0.0)), 4), seed=cert.get("seed"),
        seed_chosen_by_client="seed" in opts, batch_size=cert.get("batch_size"),
        target_radius=cert.get("target_radius"), certified=cert.get("certified"), rejected_by=out.rejected_by)
    if store is not None:
        try:
            dump = body.model_dump(exclude={"cached"})
            await store_call(runtime, store, lambda: store.put_certificate(key, dump))
        except StoreUnavailable:
            pass  # logged by the store
    return body


async def _monitor_rejection(runtime: Runtime, digest: str, x, name: str, opts: dict[str, Any],
                             client: str) -> CertifyResponse | None:
    """The query monitor's rejection of a posted image (a certificate is an oracle too), or None."""
    try:
        verdict = await runtime.screen(runtime.pipelines[name], x.unsqueeze(0), client)
    except AttackSuspected as exc:
        raise attack_suspected_error(exc) from None
    if verdict is None or not (verdict.reject and verdict.flagged[0]):
        return None
    # counted as the batch screen's rejection on /predict is (images_total, rejections_total,
    # the monitor's stage time), so the rejected share of images holds for /certify too
    result = monitor_result(verdict, 0)
    runtime.observe_results(name, [result])
    return CertifyResponse(
        image_sha256=digest, pipeline=name, model_version=runtime.bundle.version, status="rejected", label=None,
        abstained=True, radius=None, p_a_lower=None, sigma=opts["sigma"], n0=0, n=0, alpha=opts["alpha"],
        samples=0, seconds=0.0, seed=None, seed_chosen_by_client="seed" in opts,
        rejected_by=[rejection_out(rejection) for rejection in result.rejected_by])


async def _observed(request: Request, name_hint: str | None, work) -> CertifyResponse:
    runtime: Runtime = request.app.state.runtime
    # the pipeline _params picks without pipeline=: its failures are counted under its name too
    name_hint = name_hint or _default_pipeline(runtime)
    with tracked(runtime, "certify", name_hint, request) as t:
        body = await work()
        t.pipeline, t.outcome = body.pipeline, body.status
        return body


@router.get("/certify", response_model=CertifyResponse, responses=_ERRORS,
            dependencies=[Depends(require_api_key)],
            summary="Certify an image recently posted to /predict or /certify")
async def certify_get(
        request: Request,
        image_sha256: str = Query(..., description="hex sha256 of the image bytes posted earlier"),
        pipeline: str | None = Query(None, description="a certifying pipeline; default: settings.certify.pipeline"),
        sigma: float | None = Query(None, gt=0, description="noise level; one the pipeline has"),
        n: int | None = Query(None, ge=1, description="estimation samples (the maximum is configured)"),
        n0: int | None = Query(None, ge=1, description="selection samples"),
        alpha: float | None = Query(None, ge=MIN_ALPHA, lt=0.5,
                                    description=f"failure probability, in [{MIN_ALPHA:g}, 0.5)"),
        radius: float | None = Query(None, ge=0, le=MAX_RADIUS, description="only decide: certified at this radius?"),
        seed: int | None = Query(None, ge=0, lt=2**63,
                                 description="noise seed, to reproduce a certificate (the answer then says "
                                             "seed_chosen_by_client: true)"),
        deadline: Deadline = Depends(request_deadline),
) -> CertifyResponse:
    runtime: Runtime = request.app.state.runtime

    async def work() -> CertifyResponse:
        client = client_of(request)  # inside the count: a 401 is a request too
        digest = image_sha256.strip().lower()
        if not _HEX64.fullmatch(digest):
            raise ApiError(422, "invalid_parameter", "image_sha256 must be 64 hex digits")
        name, opts = _params(runtime, pipeline, sigma, n, n0, alpha, radius, seed)
        store = request.app.state.store
        owner = image_owner(runtime.settings, client)
        x = await store_call(runtime, store, lambda: store.get_image(image_key(owner, digest)))
        if x is None:
            raise ApiError(404, "unknown_image", f"no recently posted image has sha256 {digest}; "
                           f"POST it to /certify or /predict first")
        # a certificate is an answer too: screened as POST /certify's image is (the monitor
        # leaves a query's own earlier copies out, so asking again about one's own image
        # matches nothing new), and a client blocked in block mode gets its 429 here too
        rejected = await _monitor_rejection(runtime, digest, x, name, opts, client)
        if rejected is not None:
            return rejected
        return await _certify(request, digest, owner, x, name, opts, deadline, client)

    return await _observed(request, pipeline, work)


@router.post("/certify", response_model=CertifyResponse, responses=_ERRORS,
             dependencies=[Depends(require_api_key)],
             summary="Certify one posted image",
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "file": {"type": "string", "format": "binary"}}}},
                 "image/png": {"schema": {"type": "string", "format": "binary"}},
                 "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
async def certify_post(
        request: Request,
        pipeline: str | None = Query(None), sigma: float | None = Query(None, gt=0),
        n: int | None = Query(None, ge=1), n0: int | None = Query(None, ge=1),
        alpha: float | None = Query(None, ge=MIN_ALPHA, lt=0.5),
        radius: float | None = Query(None, ge=0, le=MAX_RADIUS),
        seed: int | None = Query(None, ge=0, lt=2**63),
        deadline: Deadline = Depends(request_deadline),
) -> CertifyResponse:
    runtime: Runtime = request.app.state.runtime

    async def work() -> CertifyResponse:
        client = client_of(request)  # inside the count: a 401 is a request too
        name, opts = _params(runtime, pipeline, sigma, n, n0, alpha, radius, seed)
        items = await read_images(request, runtime)
        check_uploads(items, runtime)
        if len(items) != 1:
            raise ApiError(422, "invalid_parameter", f"POST /certify takes one image, got {len(items)}")
        x, (digest,) = await decode_uploads(items, runtime)  # hashed off the loop, as on /predict
        rejected = await _monitor_rejection(runtime, digest, x[0], name, opts, client)
        if rejected is not None:
            return rejected
        store = request.app.state.store
        owner = image_owner(runtime.settings, client)
        await remember_within(runtime, store, [image_key(owner, digest)], x, deadline)
        return await _certify(request, digest, owner, x[0], name, opts, deadline, client)

    return await _observed(request, pipeline, work)
