"""POST /predict: one or many images through a named pipeline."""

from __future__ import annotations

import asyncio
import hashlib
import time

import torch
from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from service.api.errors import ApiError
from service.api.schemas import ErrorBody, ImageResultOut, PredictResponse, RejectionOut, StageOut
from service.batcher import Overloaded
from service.defenses.base import DeadlineExceeded
from service.imaging import ImageError, check_content_type, decode_batch
from service.pipeline import ImageResult
from service.runtime import Runtime
from service.store import StoreUnavailable

router = APIRouter(tags=["predict"])

_ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)}


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def read_images(request: Request, runtime: Runtime) -> list[tuple[bytes, str | None]]:
    """The uploaded images: every `file` part of a multipart body, or the raw body."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    limits = runtime.settings.limits
    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=limits.max_images_per_request + 1, max_fields=64)
        except Exception as exc:  # malformed multipart, too many parts
            raise ApiError(400, "invalid_image", f"could not read the multipart body: {exc}") from None
        items = []
        for value in form.getlist("file"):
            if isinstance(value, str):
                raise ApiError(400, "invalid_image", "the 'file' part must be a file upload, not a text field")
            items.append((await value.read(), value.content_type))
        await form.close()
        if not items:
            raise ApiError(400, "invalid_image", "the multipart body has no 'file' part")
        return items
    body = await request.body()
    if not content_type:
        content_type = None  # type: ignore[assignment]
    elif not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with 'file' parts, or an image/png or image/jpeg body; "
                       f"got {content_type}")
    return [(body, content_type)]


# Below this many encoded bytes, decoding on the event loop costs less than a thread hop.
INLINE_DECODE_BYTES = 64 * 1024


async def decode_request(request: Request, runtime: Runtime) -> tuple[torch.Tensor, list[str]]:
    items = await read_images(request, runtime)
    limits = runtime.image_limits
    max_images = runtime.settings.limits.max_images_per_request
    try:
        for _, ctype in items:
            check_content_type(ctype, limits)
        if sum(len(data) for data, _ in items) <= INLINE_DECODE_BYTES:
            x = decode_batch(items, runtime.input_spec, limits, max_images)
        else:
            x = await run_in_threadpool(decode_batch, items, runtime.input_spec, limits, max_images)
    except ImageError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return x, [hashlib.sha256(data).hexdigest() for data, _ in items]


def result_out(digest: str, r: ImageResult) -> ImageResultOut:
    return ImageResultOut(
        image_sha256=digest, status=r.status, label=r.label, class_name=r.class_name,
        confidence=round(r.confidence, 6) if r.confidence is not None else None,
        certified_radius=round(r.certified_radius, 6) if r.certified_radius is not None else None,
        rejected_by=[RejectionOut(defense=j.defense, detector=j.detector, score=j.score, threshold=j.threshold)
                     for j in r.rejected_by],
        stages=[StageOut(defense=s.defense, seconds=round(s.seconds, 6), **s.details) for s in r.stages])


class tracked:
    """Counts one request in requests_total{pipeline,endpoint,outcome} and its duration.

    Set `outcome` (and `pipeline`, once known) inside the block; an ApiError sets the outcome
    to its code when that is `overloaded` or `deadline_exceeded`, any other failure to `error`.
    A pipeline that is not configured is counted as `unknown`, so clients cannot create labels.
    """

    def __init__(self, runtime: Runtime, endpoint: str, pipeline: str | None) -> None:
        self.runtime, self.endpoint, self.pipeline = runtime, endpoint, pipeline
        self.outcome = "error"

    def __enter__(self) -> "tracked":
        self.started = time.perf_counter()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.outcome = exc.code if isinstance(exc, ApiError) and exc.code in (
                "overloaded", "deadline_exceeded") else "error"
        label = self.pipeline if self.pipeline in self.runtime.pipelines else "unknown"
        m = self.runtime.metrics
        m.requests.labels(label, self.endpoint, self.outcome).inc()
        m.request_duration.labels(label, self.endpoint).observe(time.perf_counter() - self.started)


def outcome_of(results: list[ImageResult]) -> str:
    statuses = {r.status for r in results}
    return statuses.pop() if len(statuses) == 1 else "mixed"


async def run_pipeline(request: Request, runtime: Runtime, pipeline: str, x: torch.Tensor,
                       options: dict | None = None) -> list[ImageResult]:
    """Submit to the batcher, mapping overload and deadline to the contract's errors."""
    deadline = time.monotonic() + runtime.settings.request_timeout_s
    try:
        return await runtime.infer(pipeline, x, deadline=deadline, options=options)
    except Overloaded as exc:
        raise ApiError(503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except (DeadlineExceeded, asyncio.TimeoutError):
        raise ApiError(504, "deadline_exceeded",
                       f"the request did not finish within {runtime.settings.request_timeout_s:g} s") from None


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS,
             summary="Classify one or more images through a defended pipeline",
             openapi_extra={"requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                 "image/png": {"schema": {"type": "string", "format": "binary"}},
                 "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
async def predict(request: Request,
                  pipeline: str | None = Query(None, description="pipeline name; default: the configured default")
                  ) -> PredictResponse:
    runtime = runtime_of(request)
    name = pipeline or runtime.settings.default_pipeline
    with tracked(runtime, "predict", name) as t:
        if name not in runtime.pipelines:
            raise ApiError(404, "unknown_pipeline",
                           f"no pipeline {name!r}; configured: {', '.join(sorted(runtime.pipelines))}")
        x, digests = await decode_request(request, runtime)
        try:  # so GET /certify?image_sha256= can find them; a store that is down costs no prediction
            for digest, image in zip(digests, x):
                request.app.state.store.put_image(digest, image)
        except StoreUnavailable:
            pass  # logged by the store; GET /certify for these images answers 404 or 503
        results = await run_pipeline(request, runtime, name, x)
        t.outcome = outcome_of(results)
        return PredictResponse(request_id=request.state.request_id, pipeline=name,
                               model_version=runtime.bundle.version,
                               results=[result_out(d, r) for d, r in zip(digests, results)])
