"""POST /predict: one or many images through a named pipeline.

An image's way through the service:

    route (here: the body read by Starlette's own multipart parser, count and types checked)
    -> admission (Runtime.classify: refused at once with 503 when over budget)
    -> decode (Pillow, in a worker thread, bounded by ImageLimits and, for the request's images
       together, by limits.max_request_pixels; the same thread hashes the uploads)
    -> batch (the pipeline's batcher; on a monitored pipeline the query monitor screens the
       batch first, on the compute thread) -> pipeline
    -> response (service/api/render.py, the one renderer every route shares).

/v2 takes the same way, except that its tensor is decoded in the worker-thread call that
parses its body (the image count admission weighs is known only then), before admission;
POST /certify decodes the same way and runs its certification itself, unbatched.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from fastapi import APIRouter, Depends, Header, Query, Request
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

from service.api.clients import client_of, require_api_key
from service.api.errors import ApiError, echo, is_oip
from service.api.render import render
from service.api.schemas import ErrorBody, PredictResponse
from service.batcher import Overloaded
from service.defenses.base import DeadlineExceeded
from service.defenses.query_monitor import AttackSuspected
from service.defenses.smoothing import MAX_RADIUS
from service.imaging import ImageError, check_content_type, decode_batch
from service.pipeline import ImageResult
from service.runtime import Runtime
from service.store import Store, StoreUnavailable, image_key, image_owner

router = APIRouter(tags=["predict"])
T = TypeVar("T")
log = logging.getLogger("shieldserve")

_ERRORS = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 415, 422, 429, 503, 504)}
# multipart text fields a /predict body may carry besides its files (Starlette's max_fields)
MAX_FORM_FIELDS = 64
# the largest such text field (Starlette's max_part_size, which file parts are not held to;
# past it 413): /predict reads no text field, and Starlette buffers each one in memory and
# decodes it to a str, so a bound well under the 8 MiB body limit. Starlette's default, stated
# here so that an upgrade cannot change it unseen.
MAX_FORM_FIELD_BYTES = 1024 * 1024
# What python-multipart (0.0.27 and later) allows a part's headers: 8 lines of up to 4,224
# bytes each (past them 400). Starlette has no way to pass these, so tests/test_edge.py pins the
# library's values to these; without them a part's headers could fill the body limit, one
# Python list entry per line.
MULTIPART_MAX_HEADER_COUNT = 8
MULTIPART_MAX_HEADER_SIZE = 4096 + 128

Upload = tuple[bytes, str | None]  # an uploaded image's bytes and declared content type


async def runtime_of(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a hop per request
    return request.app.state.runtime


# ------------------------------------------------------------------ deadlines
TIMEOUT_HEADER = "X-Request-Timeout"
TIMEOUT_DESCRIPTION = ("this request's deadline: seconds (2.5) or milliseconds (2500ms), at most the "
                       "server's max_request_timeout_s; past it the answer is 504 deadline_exceeded "
                       "and the work stops")


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


CLIENT_DEADLINE_SHARE = 0.5


def client_deadline(seconds: float, server: float) -> bool:
    """Whether a deadline of `seconds` is the client's doing: at most half the server's."""
    return seconds <= CLIENT_DEADLINE_SHARE * server


@dataclass(frozen=True)
class Deadline:
    at: float  # time.monotonic() when the request must be answered
    seconds: float  # its length, for the 504's message
    server: float = 0.0  # the server's own deadline (request_timeout_s, clamped), 0: not known
    # at most CLIENT_DEADLINE_SHARE of the server's because the client asked (X-Request-Timeout,
    # /v2's timeout): its 504 is counted as outcome `client_deadline`, not as the server's
    # `deadline_exceeded` (one client sending 1 ms deadlines fired the critical
    # ShieldserveServerErrorRate). A deadline nearer the server's is the server's: a client that
    # always sends one just under it would otherwise hide real overload from that alert
    client_set: bool = False

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def error(self) -> ApiError:
        err = ApiError(504, "deadline_exceeded",
                       f"the request did not finish within its deadline of {self.seconds:g} s")
        err.client_deadline = self.client_set  # type: ignore[attr-defined]
        return err


async def request_deadline(request: Request,
                           timeout: str | None = Header(None, alias=TIMEOUT_HEADER, description=TIMEOUT_DESCRIPTION),
                           ) -> Deadline:
    """This request's deadline. The clock starts when the request arrived (the body limit
    middleware stamps it), so reading, decoding and queueing count. `X-Request-Timeout` sets
    the length, clamped to `max_request_timeout_s`; without it `request_timeout_s` applies."""
    settings = request.app.state.runtime.settings
    seconds = server = min(settings.request_timeout_s, settings.max_request_timeout_s)
    if timeout is not None:
        try:
            seconds = parse_timeout(timeout)
        except ValueError:
            raise ApiError(400 if is_oip(request.url.path) else 422, "invalid_parameter",
                           f"{TIMEOUT_HEADER} must be a positive number of seconds (e.g. 2.5) or "
                           f"milliseconds (e.g. 2500ms), got {timeout[:40]!r}") from None
    seconds = min(seconds, settings.max_request_timeout_s)
    started = getattr(request.state, "received_at", None) or time.monotonic()
    return Deadline(started + seconds, seconds, server, client_set=client_deadline(seconds, server))


def overloaded_error(exc: Overloaded) -> ApiError:
    return ApiError(exc.status, "overloaded", str(exc), {"Retry-After": str(exc.retry_after)})


def attack_suspected_error(exc: AttackSuspected) -> ApiError:
    return ApiError(429, "attack_suspected", str(exc), {"Retry-After": str(exc.retry_after)})


# ------------------------------------------------------------------ the image's way
async def read_images(request: Request, runtime: Runtime) -> list[Upload]:
    """The uploaded images, as sent: every `file` part of a multipart body (Starlette's parser),
    or the raw body. Nothing is decoded here."""
    check_identity_encoding(request)
    declared = request.headers.getlist("content-type")
    if len(declared) > 1:
        # the first was read and the others not: `text/plain` then `image/png` was a 415 and
        # the same two lines the other way round a 200
        raise ApiError(400, "bad_request", f"the request has {len(declared)} Content-Type header lines; "
                       f"send one")
    content_type = (declared[0] if declared else "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        max_files = runtime.settings.limits.max_images_per_request + 1  # one more: the 413 says how many
        try:
            form = await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS,
                                      max_part_size=MAX_FORM_FIELD_BYTES)
        except (HTTPException, MultiPartException, ValueError) as exc:  # python-multipart's are ValueErrors
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or str(exc) or type(exc).__name__
            if str(detail).startswith("Too many files"):  # Starlette stops reading past max_files
                raise ApiError(413, "payload_too_large", f"the request contains more than {max_files - 1} images; "
                               f"the limit is {max_files - 1} per request") from None
            if "exceeded maximum size" in str(detail):  # a text field past max_part_size
                raise ApiError(413, "payload_too_large", f"a text field of the multipart body is larger than "
                               f"{MAX_FORM_FIELD_BYTES} bytes; /predict reads only 'file' parts") from None
            reason = _root_cause(exc)  # python-multipart's words behind Starlette's "Invalid multipart data."
            raise ApiError(400, "invalid_image", f"could not read the multipart body: {detail}"
                           + (f" ({reason})" if reason and reason not in str(detail) else "")) from None
        try:
            items = []
            for value in form.getlist("file"):
                if isinstance(value, str):
                    raise ApiError(400, "invalid_image", "the 'file' part must be a file upload, not a text field")
                items.append((await value.read(), value.content_type))
        finally:
            await form.close()
        if not items:
            # python-multipart drops a part cut short, so a truncated upload ends up here too
            raise ApiError(400, "invalid_image", "the multipart body has no complete 'file' part (is it cut short, "
                                                 "before its closing boundary?)")
        return items
    if content_type and not (content_type.startswith("image/") or content_type == "application/octet-stream"):
        raise ApiError(415, "unsupported_media_type",
                       f"send multipart/form-data with 'file' parts, or an image/png or image/jpeg body; "
                       f"got {content_type[:80]}")
    return [(await request.body(), content_type or None)]


def check_identity_encoding(request: Request) -> None:
    """415 for a body declared compressed (any `Content-Encoding` but identity, on any of the
    header's lines): /predict and /certify inflate nothing (PNG and JPEG are compressed already),
    and one read as if it were not would be decoded as the wrong bytes (a real gzipped PNG was a
    400 `invalid_image`, a PNG labelled `br` a 200)."""
    # every line, as one comma-separated list (RFC 9110 5.3), as api.clients.forwarded_for reads
    # X-Forwarded-For: a second line must not go unread
    declared = ", ".join(request.headers.getlist("content-encoding"))
    if any(coding.strip().lower() not in ("", "identity") for coding in declared.split(",")):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Encoding {echo(declared)} is not supported here; send the image bytes "
                       f"uncompressed (identity)")


def _root_cause(exc: BaseException) -> str:
    """The message of the exception at the bottom of `exc`'s chain ("" if none), shortened."""
    inner, seen = exc, 0
    while (inner.__cause__ or inner.__context__) is not None and seen < 8:
        inner, seen = inner.__cause__ or inner.__context__, seen + 1  # type: ignore[assignment]
    return str(inner)[:100] if inner is not exc else ""


def check_uploads(items: list[Upload], runtime: Runtime) -> None:
    """What is refused before admission, without decoding: the count and the declared types."""
    try:
        if not items:
            raise ImageError(400, "invalid_image", "the request contains no image")
        max_images = runtime.settings.limits.max_images_per_request
        if len(items) > max_images:
            raise ImageError(413, "payload_too_large",
                             f"the request contains {len(items)} images; the limit is {max_images} per request")
        for i, (_, ctype) in enumerate(items):
            try:
                check_content_type(ctype, runtime.image_limits)
            except ImageError as exc:  # named by its index, as every error about one file is
                raise ImageError(exc.status, exc.code, f"file {i}: {exc.message}") from None
    except ImageError as exc:
        raise ApiError(exc.status, exc.code, exc.message) from None


def upload_digests(items: list[Upload]) -> list[str]:
    """The hex sha256 of each upload's bytes (the contract's `image_sha256`). Up to the body
    limit of bytes: call it in a worker thread (hashlib lets go of the GIL meanwhile)."""
    return [hashlib.sha256(data).hexdigest() for data, _ in items]


class ImageDecode:
    """The uploads' decode, for a worker thread: Pillow under the runtime's ImageLimits and the
    request's pixel budget (`limits.max_request_pixels`), every refusal an ApiError with the
    contract's code. Calling it also hashes the uploads, in the same thread, into `digests`
    (needed only once the images decoded; hashing up to the 8 MiB body limit must not hold the
    event loop)."""

    def __init__(self, items: list[Upload], runtime: Runtime) -> None:
        self.items, self.runtime = items, runtime
        self.digests: list[str] = []

    def __call__(self) -> torch.Tensor:
        limits = self.runtime.settings.limits
        try:
            x = decode_batch(self.items, self.runtime.input_spec, self.runtime.image_limits,
                             limits.max_images_per_request, max_request_pixels=limits.max_request_pixels)
        except ImageError as exc:
            raise ApiError(exc.status, exc.code, exc.message) from None
        self.digests = upload_digests(self.items)
        return x


def image_decoder(items: list[Upload], runtime: Runtime) -> ImageDecode:
    """The uploads' decode and hashing, for a worker thread: see ImageDecode."""
    return ImageDecode(items, runtime)


def remember_images(store: Store, digests: list[str], x: torch.Tensor) -> None:
    """Put each decoded image in the store under its upload's sha256; a store that is down
    costs no prediction."""
    try:
        for i, digest in enumerate(digests):
            store.put_image(digest, x[i])
    except StoreUnavailable:
        pass  # logged by the store; GET /certify for these images answers 404 or 503


async def remember_within(runtime: Runtime, store: Store, keys: list[str], x: torch.Tensor,
                          deadline: Deadline) -> None:
    """remember_images, waited for until the request's deadline at most: the write is for a
    later GET /certify, and a store that hangs (up to its timeout) must not hold an answer that
    is ready past its client's deadline; a write still running then goes on in its thread."""
    if getattr(store, "in_process", False):
        return remember_images(store, keys, x)
    write = asyncio.ensure_future(runtime.offload(lambda: remember_images(store, keys, x)))
    write.add_done_callback(_log_failure)
    await asyncio.wait({write}, timeout=max(0.0, deadline.remaining()))


def _log_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("remembering images for GET /certify failed", exc_info=task.exception())


async def store_call(runtime: Runtime, store: Store, fn: Callable[[], T]) -> T:
    """fn(), a call on `store`, where it may block: on the event loop for the in-process store
    (a dict and a copy: cheaper than a hop between threads), in a worker thread for any other
    (Redis: a network round trip, up to its timeout, must never hold the event loop)."""
    if getattr(store, "in_process", False):
        return fn()
    return await runtime.offload(fn)


async def decode_uploads(items: list[Upload], runtime: Runtime) -> tuple[torch.Tensor, list[str]]:
    """Decode and hash now, in a worker thread (POST /certify, whose pipeline run is not
    batched): the images and their hex sha256s."""
    decode = image_decoder(items, runtime)
    return await runtime.offload(decode), decode.digests


async def classify(runtime: Runtime, pipeline: str, images: int, decode: Callable[[], torch.Tensor],
                   deadline: Deadline, options: dict[str, Any] | None = None, client: str | None = None,
                   ) -> tuple[torch.Tensor, list[ImageResult]]:
    """Admission, decode, batch (screened by the query monitor) and pipeline (Runtime.classify)
    within the deadline."""
    return await within_deadline(deadline, runtime.classify(pipeline, images, decode, deadline=deadline.at, options=options,
                                                    client=client))


async def infer_decoded(runtime: Runtime, pipeline: str, x: torch.Tensor, deadline: Deadline,
                        options: dict[str, Any] | None = None, client: str | None = None) -> list[ImageResult]:
    """Admission, batch (screened by the query monitor) and pipeline (Runtime.infer) for
    images decoded already (/v2 decodes its tensor in the worker-thread call that parses the
    body)."""
    return await within_deadline(deadline, runtime.infer(pipeline, x, deadline=deadline.at, options=options, client=client))


async def within_deadline(deadline: Deadline, work: Coroutine[Any, Any, T]) -> T:
    """Await `work` until the deadline, with overload and deadline mapped to the contract's
    errors. Waiting out the deadline cancels the request's job: a batch whose every request
    is gone stops at its next ctx.check()."""
    remaining = deadline.remaining()
    if remaining <= 0:
        work.close()
        raise deadline.error()
    try:
        async with asyncio.timeout(remaining):
            return await work
    except Overloaded as exc:
        raise overloaded_error(exc) from None
    except AttackSuspected as exc:
        raise attack_suspected_error(exc) from None
    except (DeadlineExceeded, asyncio.TimeoutError):
        raise deadline.error() from None


# ------------------------------------------------------------------ metrics
class tracked:
    """Counts one request in requests_total{pipeline,endpoint,outcome} and its duration.

    Set `outcome` (and `pipeline`, once known) inside the block; an ApiError sets the outcome
    to its code when that is `overloaded` or `deadline_exceeded`, any other failure to `error`.
    A 429 `overloaded` (a client over its own share, admission.max_client_cost) is counted as
    `over_share`, and a 504 on a deadline the client shortened as `client_deadline`: that
    client's doing, not the replica's load, so no alert to add replicas.
    A pipeline that is not configured is counted as `unknown`, so clients cannot create labels.
    """

    def __init__(self, runtime: Runtime, endpoint: str, pipeline: str | None, request: Request) -> None:
        self.runtime, self.endpoint, self.pipeline = runtime, endpoint, pipeline
        self.outcome = "error"
        # timed from the request's arrival (BodyLimitMiddleware's stamp, its upload included), as
        # a refusal before the handler is (errors.count_refused) and as its deadline counts
        self.started = getattr(request.state, "received_at", None) or time.monotonic()

    def __enter__(self) -> "tracked":
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, asyncio.CancelledError):
            self.outcome = "client_closed"  # the client went away; its work was stopped
        elif isinstance(exc, ApiError) and exc.code == "overloaded" and exc.status == 429:
            self.outcome = "over_share"
        elif isinstance(exc, ApiError) and exc.code == "deadline_exceeded" and getattr(exc, "client_deadline", False):
            self.outcome = "client_deadline"  # the client's own short deadline: not the server's capacity
        elif exc is not None:
            self.outcome = exc.code if isinstance(exc, ApiError) and exc.code in (
                "overloaded", "deadline_exceeded", "attack_suspected", "unauthorized") else "error"
        if exc is not None:
            exc.counted = True  # type: ignore[attr-defined]  # the error handlers count it once, not twice
        label = self.pipeline if self.pipeline in self.runtime.pipelines else "unknown"
        m = self.runtime.metrics
        m.requests.labels(label, self.endpoint, self.outcome).inc()
        m.request_duration.labels(label, self.endpoint).observe(max(0.0, time.monotonic() - self.started))


def outcome_of(results: list[ImageResult]) -> str:
    statuses = {r.status for r in results}
    return statuses.pop() if len(statuses) == 1 else "mixed"


def known_pipeline(runtime: Runtime, name: str) -> None:
    if name not in runtime.pipelines:
        raise ApiError(404, "unknown_pipeline",
                       f"no pipeline {echo(name)}; configured: {', '.join(sorted(runtime.pipelines))}")


def radius_options(runtime: Runtime, name: str, radius: float | None) -> dict[str, Any] | None:
    """?radius=R as the smoothing decider's `radius` option (None without it); 422 on a
    pipeline that does not certify (the Query bounds the number itself)."""
    if radius is None:
        return None
    if not runtime.pipelines[name].certifies:
        raise ApiError(422, "invalid_parameter", f"pipeline {name!r} does not certify; radius= needs a smoothing pipeline")
    return {"radius": radius + 0.0}  # -0.0 as 0.0


# ------------------------------------------------------------------ the route
_IMAGE_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/png": {"schema": {"type": "string", "format": "binary"}},
    "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/predict", response_model=PredictResponse, responses=_ERRORS, openapi_extra=_IMAGE_BODY,
             dependencies=[Depends(require_api_key)],
             summary="Classify one or more images through a defended pipeline")
async def predict(request: Request,
                  pipeline: str | None = Query(None, description="pipeline name; default: the configured default"),
                  radius: float | None = Query(
                      None, ge=0, le=MAX_RADIUS,
                      description="smoothing pipelines: certify at this L2 radius instead of the pipeline's "
                                  "target_radius (the answer reports the radius certified and the samples used)"),
                  deadline: Deadline = Depends(request_deadline),
                  runtime: Runtime = Depends(runtime_of)) -> PredictResponse:
    name = pipeline or runtime.settings.default_pipeline
    with tracked(runtime, "predict", name, request) as t:
        client = client_of(request)  # inside the count: a 401 is a request too
        known_pipeline(runtime, name)
        options = radius_options(runtime, name, radius)
        items = await read_images(request, runtime)
        check_uploads(items, runtime)
        decode = image_decoder(items, runtime)
        x, results = await classify(runtime, name, len(items), decode, deadline, options, client=client)
        digests = decode.digests  # hashed in the decode's worker thread
        # so that GET /certify?image_sha256= can find them (only once answered: a client the
        # query monitor blocks gets nothing stored)
        store = request.app.state.store
        keys = [image_key(image_owner(runtime.settings, client), d) for d in digests]
        await remember_within(runtime, store, keys, x, deadline)
        t.outcome = outcome_of(results)
        return PredictResponse(request_id=request.state.request_id, pipeline=name,
                               model_version=runtime.bundle.version,
                               results=[render(r).image_out(d) for d, r in zip(digests, results)])
