"""POST /predict: one or many images through a named pipeline."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
import time
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from service.api.errors import ApiError, api_error_response, internal_error_response
from service.api.multipart import split_multipart
from service.api.schemas import ErrorBody, ImageResultOut, PredictResponse, RejectionOut, StageOut
from service.batcher import Overloaded
from service.defenses.base import DeadlineExceeded
from service.defenses.smoothing import MAX_RADIUS
from service.imaging import ImageError, check_content_type, decode_batch, png_header_pixels
from service.pipeline import ImageResult
from service.runtime import Runtime
from service.store import StoreUnavailable


class DirectRoute(APIRoute):
    """A route whose endpoint takes the Request and returns a Response itself: FastAPI still
    documents it (the OpenAPI schema comes from the decorator), but it does not solve
    dependencies or validate a response model per request (~0.1 ms of the hot path)."""

    def get_route_handler(self) -> Any:
        return self.endpoint


router = APIRouter(tags=["predict"], route_class=DirectRoute)

_ERRORS = {code: {"model": ErrorBody} for code in (400, 404, 413, 415, 422, 503, 504)}


def runtime_of(request: Request) -> Runtime:
    return request.app.state.runtime


async def read_images(request: Request, runtime: Runtime) -> list[tuple[bytes, str | None]]:
    """The uploaded images: every `file` part of a multipart body, or the raw body."""
    content_type = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    limits = runtime.settings.limits
    if content_type == "multipart/form-data":
        max_files = limits.max_images_per_request + 1
        parts = split_multipart(await request.body(), request.headers["content-type"], max_files, 64)
        if parts is not None:  # the common, well-formed body: no temporary files, no per-byte callbacks
            items = []
            for part in parts:
                if part.name != "file":
                    continue
                if not part.is_file:
                    raise ApiError(400, "invalid_image", "the 'file' part must be a file upload, not a text field")
                items.append((part.data, part.content_type))
            if not items:
                raise ApiError(400, "invalid_image", "the multipart body has no 'file' part")
            return items
        try:  # anything else: Starlette's parser, and its errors
            form = await request.form(max_files=max_files, max_fields=64)
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


# Where a request's images are decoded:
# - small PNGs (at most INLINE_DECODE_BYTES in all, each at most INLINE_DECODE_PIXELS by its
#   header): right away on the event loop, ~0.1 ms for an MNIST digit. Decoding them in the
#   inference thread instead made that thread, the batch's critical path, compete with the
#   event loop for the GIL (16 digits took 6 ms there instead of 2);
# - other uploads up to INLINE_DECODE_BYTES: in the batch's worker thread, with the batch (one
#   thread hop per batch; their size in pixels is not known without parsing them);
# - larger uploads: in the thread pool before they are queued, so one slow decode does not
#   hold up everyone's batch.
INLINE_DECODE_BYTES = 64 * 1024
INLINE_DECODE_PIXELS = 128 * 128


def decode_on_loop(items: list[tuple[bytes, str | None]]) -> bool:
    """Every image a PNG small enough by its header to decode on the event loop without holding
    it up (see above); the caller has already held the upload to INLINE_DECODE_BYTES."""
    for data, _ in items:
        pixels = png_header_pixels(data)
        if pixels is None or pixels > INLINE_DECODE_PIXELS:
            return False
    return True


def _check_items(items: list[tuple[bytes, str | None]], runtime: Runtime) -> None:
    """What can be refused without decoding: the count and the declared content types."""
    try:
        if not items:
            raise ImageError(400, "invalid_image", "the request contains no image")
        max_images = runtime.settings.limits.max_images_per_request
        if len(items) > max_images:
            raise ImageError(413, "payload_too_large",
                             f"the request contains {len(items)} images; the limit is {max_images} per request")
        for _, ctype in items:
            check_content_type(ctype, runtime.image_limits)
    except ImageError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


def _decoder(items: list[tuple[bytes, str | None]], runtime: Runtime) -> Any:
    return functools.partial(decode_batch, items, runtime.input_spec, runtime.image_limits,
                             runtime.settings.limits.max_images_per_request)


async def decode_request(request: Request, runtime: Runtime) -> tuple[torch.Tensor, list[str]]:
    """Read and decode the uploaded images now (for /certify)."""
    items = await read_images(request, runtime)
    _check_items(items, runtime)
    try:
        x = await run_in_threadpool(_decoder(items, runtime))
    except ImageError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None
    return x, [hashlib.sha256(data).hexdigest() for data, _ in items]


def result_out(digest: str, r: ImageResult) -> ImageResultOut:
    cert = r.details.get("certificate") if r.details else None  # a smoothing decider's, for this image
    return ImageResultOut(
        target_radius=cert.get("target_radius") if cert else None,
        certified=cert.get("certified") if cert else None, samples=cert.get("samples") if cert else None,
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
        if isinstance(exc, asyncio.CancelledError):
            self.outcome = "client_closed"  # the client went away; its work was stopped
        elif exc is not None:
            self.outcome = exc.code if isinstance(exc, ApiError) and exc.code in (
                "overloaded", "deadline_exceeded") else "error"
        label = self.pipeline if self.pipeline in self.runtime.pipelines else "unknown"
        m = self.runtime.metrics
        m.requests.labels(label, self.endpoint, self.outcome).inc()
        m.request_duration.labels(label, self.endpoint).observe(time.perf_counter() - self.started)


def outcome_of(results: list[ImageResult]) -> str:
    statuses = {r.status for r in results}
    return statuses.pop() if len(statuses) == 1 else "mixed"


TIMEOUT_HEADER = "X-Request-Timeout"


# Documented in the schema, read by deadline_of (not a FastAPI parameter: one dependency less
# to solve per request on the hot path).
TIMEOUT_PARAM = {"name": TIMEOUT_HEADER, "in": "header", "required": False, "schema": {"type": "string"},
                 "description": "this request's deadline: seconds (2.5) or milliseconds (2500ms), at most "
                                "the server's max_request_timeout_s; past it the answer is 504 "
                                "deadline_exceeded and the work stops"}


def parse_timeout(value: str) -> float:
    """`X-Request-Timeout`: seconds ("2.5", "2.5s") or milliseconds ("2500ms"); ValueError if not."""
    v = value.strip().lower()
    scale = 1.0
    if v.endswith("ms"):
        v, scale = v[:-2], 0.001
    elif v.endswith("s"):
        v = v[:-1]
    seconds = float(v.strip()) * scale
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("the timeout must be a positive number")
    return seconds


def deadline_of(request: Request, runtime: Runtime) -> tuple[float, float]:
    """(deadline as time.monotonic(), its length in seconds) of this request.

    The clock starts when the request arrived (the middleware stamps it), so decoding and
    queueing count. `X-Request-Timeout` sets the length, clamped to `max_request_timeout_s`;
    without it `request_timeout_s` applies.
    """
    settings = runtime.settings
    seconds = settings.request_timeout_s
    given = request.headers.get(TIMEOUT_HEADER)
    if given is not None:
        try:
            seconds = parse_timeout(given)
        except ValueError:
            raise ApiError(422 if not request.url.path.startswith("/v2") else 400, "invalid_parameter",
                           f"{TIMEOUT_HEADER} must be a positive number of seconds (e.g. 2.5) or "
                           f"milliseconds (e.g. 2500ms), got {given[:40]!r}") from None
    seconds = min(seconds, settings.max_request_timeout_s)
    started = getattr(request.state, "received_at", None) or time.monotonic()
    return started + seconds, seconds


def deadline_error(seconds: float) -> ApiError:
    return ApiError(504, "deadline_exceeded", f"the request did not finish within its deadline of {seconds:g} s")


def overloaded_error(exc: Overloaded) -> ApiError:
    return ApiError(503, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)})


async def run_pipeline(request: Request, runtime: Runtime, pipeline: str, x: torch.Tensor | None,
                       options: dict | None = None, *, decode: Any = None, images: int = 0) -> Any:
    """Admit, submit to the batcher and wait at most until the deadline, mapping overload
    and deadline to the contract's errors. Waiting out the deadline cancels this request's
    job: a batch whose every request is gone stops at its next ctx.check()."""
    deadline, seconds = deadline_of(request, runtime)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise deadline_error(seconds)
    try:
        async with asyncio.timeout(remaining):  # a timer on this task; wait_for would add a task
            if decode is not None:  # (x, results), decoded in the batch's worker thread
                return await runtime.infer_encoded(pipeline, decode, images, deadline=deadline, options=options)
            return await runtime.infer(pipeline, x, deadline=deadline, options=options)
    except Overloaded as exc:
        raise overloaded_error(exc) from None
    except (DeadlineExceeded, asyncio.TimeoutError):
        raise deadline_error(seconds) from None


_PLAIN_PIPELINE_QUERY = re.compile(rb"pipeline=([A-Za-z0-9._-]{1,128})")


def pipeline_param(request: Request) -> str | None:
    """?pipeline=NAME. Read directly, not as a FastAPI Query parameter (solving it costs ~0.1 ms
    a request); the usual plain query string is matched without building Starlette's
    QueryParams (percent-decoding, a multidict), anything else goes through it."""
    m = _PLAIN_PIPELINE_QUERY.fullmatch(request.scope.get("query_string", b""))
    if m is not None:
        return m.group(1).decode("ascii")
    return request.query_params.get("pipeline")


PIPELINE_PARAM = {"name": "pipeline", "in": "query", "required": False, "schema": {"type": "string"},
                  "description": "pipeline name; default: the configured default"}
RADIUS_PARAM = {"name": "radius", "in": "query", "required": False,
                "schema": {"type": "number", "minimum": 0, "maximum": MAX_RADIUS},
                "description": "smoothing pipelines: certify at this L2 radius instead of the pipeline's "
                               "target_radius (the answer reports the radius certified and the samples used)"}


def radius_options(request: Request, runtime: Runtime, name: str) -> dict[str, Any] | None:
    """?radius=R as the smoothing decider's `radius` option (None without it); 422 when it is
    not a number in [0, MAX_RADIUS] or the pipeline does not certify."""
    qs = request.scope.get("query_string", b"")
    # Starlette's QueryParams only when the query may name it (percent-encoded names included)
    given = request.query_params.get("radius") if b"radius" in qs or b"%" in qs else None
    if given is None:
        return None
    try:
        radius = float(given)
    except ValueError:
        radius = math.nan
    if not 0 <= radius <= MAX_RADIUS:
        raise ApiError(422, "invalid_parameter", f"radius must be a number in [0, {MAX_RADIUS:g}], got {given[:40]!r}")
    if not runtime.pipelines[name].certifies:
        raise ApiError(422, "invalid_parameter", f"pipeline {name!r} does not certify; radius= needs a smoothing pipeline")
    return {"radius": radius}


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS,
             summary="Classify one or more images through a defended pipeline",
             openapi_extra={"parameters": [PIPELINE_PARAM, RADIUS_PARAM, TIMEOUT_PARAM], "requestBody": {"content": {
                 "multipart/form-data": {"schema": {"type": "object", "properties": {
                     "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                 "image/png": {"schema": {"type": "string", "format": "binary"}},
                 "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
async def predict(request: Request) -> PredictResponse:
    runtime = runtime_of(request)
    name = pipeline_param(request) or runtime.settings.default_pipeline
    with tracked(runtime, "predict", name) as t:
        if name not in runtime.pipelines:
            raise ApiError(404, "unknown_pipeline",
                           f"no pipeline {name!r}; configured: {', '.join(sorted(runtime.pipelines))}")
        options = radius_options(request, runtime, name)
        items = await read_images(request, runtime)
        _check_items(items, runtime)
        digests = [hashlib.sha256(data).hexdigest() for data, _ in items]
        decode = _decoder(items, runtime)
        try:
            if sum(len(data) for data, _ in items) > INLINE_DECODE_BYTES:
                x = await run_in_threadpool(decode)
                results = await run_pipeline(request, runtime, name, x, options)
            elif decode_on_loop(items):
                x = decode()
                results = await run_pipeline(request, runtime, name, x, options)
            else:
                x, results = await run_pipeline(request, runtime, name, None, options, decode=decode,
                                                images=len(items))
        except ImageError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        try:  # so GET /certify?image_sha256= can find them; a store that is down costs no prediction
            store = request.app.state.store
            for i, digest in enumerate(digests):  # x[i], not iter(x): no unbind per request
                store.put_image(digest, x[i])
        except StoreUnavailable:
            pass  # logged by the store; GET /certify for these images answers 404 or 503
        t.outcome = outcome_of(results)
        body = PredictResponse(request_id=request.state.request_id, pipeline=name,
                               model_version=runtime.bundle.version,
                               results=[result_out(d, r) for d, r in zip(digests, results)])
        # Serialised here, once: returning the model would have FastAPI validate it again
        # against response_model and encode it in two more passes (the documented schema is
        # the same; this is the hot path of issue 2's throughput goal).
        return Response(body.model_dump_json(), media_type="application/json")  # type: ignore[return-value]


class DirectPredictMiddleware:
    """POST /predict straight to its handler, past Starlette's exception middleware, the router's
    matching and FastAPI's request/response wrappers (~0.05 ms a request on the hot path of
    issue 2's throughput goal; the route stays registered, so OpenAPI documents it and any other
    method on /predict gets the router's 405). The answers are the same: the handler is the same
    function, its ApiError becomes the same JSON body, anything else the same logged 500.
    Sits inside the request-id, in-flight and body-limit middleware, so those still apply."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/predict" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        try:
            response = await predict(request)
        except ApiError as exc:
            response = api_error_response("/predict", exc)
        except Exception:  # noqa: BLE001 - what the app's handler of last resort answers
            response = internal_error_response("POST", "/predict")
        await response(scope, receive, send)
