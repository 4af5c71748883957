"""Every failure becomes a JSON body with a code and a 4xx/5xx status, never a traceback.

Outside `/v2`: {"error": {"code": "<snake_case>", "message": "<sentence>"}}.
On `/v2/*` (the Open Inference Protocol): {"error": "<message>"}.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.logs import logged_path

log = logging.getLogger("shieldserve")


ECHO_CHARS = 80  # user strings quoted in error messages are cut to this many characters


def echo(value: object) -> str:
    """`value`'s repr cut to ECHO_CHARS, for error messages: an 8 MiB output name once made an
    8 MB error body."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "..."


def endpoint_of(path: str) -> str | None:
    """The `endpoint` label of a path that runs a pipeline (`predict`, `certify`, `infer`), or None."""
    if path in ("/predict", "/certify"):
        return path[1:]
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return "infer"
    return None


def count_refused(app: object, path: str, outcome: str = "error", pipeline: str = "unknown",
                  received_at: float | None = None) -> None:
    """A request to `/predict`, `/certify` or `/v2` infer refused before its handler counted it
    (a query parameter or header that does not validate, a body over the limit): counted in
    requests_total as outcome `error` under pipeline `unknown`, as the handler's `tracked` counts
    its own failures (those 4xx were in no metric, and the error-rate alert missed them)."""
    endpoint = endpoint_of(path)
    if endpoint is None:
        return
    metrics = getattr(getattr(getattr(app, "state", None), "runtime", None), "metrics", None)
    if metrics is not None:
        metrics.requests.labels(pipeline, endpoint, outcome).inc()
        if received_at is not None:  # as the handler's count records it (time.monotonic(), the middleware's stamp)
            metrics.request_duration.labels(pipeline, endpoint).observe(max(0.0, time.monotonic() - received_at))


def _received_at(request: Request) -> float | None:
    """When the body-limit middleware saw the request arrive (time.monotonic()), if it did."""
    value = (request.scope.get("state") or {}).get("received_at")
    return value if isinstance(value, float) else None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                 405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 413: "payload_too_large",
                 415: "unsupported_media_type", 422: "invalid_parameter", 429: "overloaded",
                 503: "overloaded", 504: "deadline_exceeded"}


def is_oip(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def error_body(path: str, code: str, message: str) -> dict[str, Any]:
    """The contract's error body: `/v2`'s `{"error": message}`, elsewhere `{"error": {code, message}}`."""
    return {"error": message} if is_oip(path) else {"error": {"code": code, "message": message}}


def error_response(path: str, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, code, message), status_code=status, headers=headers)


def api_error_response(path: str, exc: ApiError) -> JSONResponse:
    return error_response(path, exc.status, exc.code, exc.message, exc.headers)


def internal_error_response(method: str, path: str) -> JSONResponse:
    """The answer to an exception nothing mapped: logged with its traceback, a 500 without it.
    Call from an `except` block."""
    log.exception("unhandled error on %s %s", method, logged_path(path))
    return error_response(path, 500, "internal_error",
                          "the server failed to answer this request; the error is logged")


def refused_response(app: object, path: str, exc: ApiError, received_at: float | None) -> JSONResponse:
    """The answer to an ApiError raised before a route's handler counted its request (a
    dependency, the body-limit middleware's early 401): counted as refused, then answered."""
    count_refused(app, path, getattr(exc, "outcome", "error"), getattr(exc, "pipeline", "unknown"), received_at)
    return api_error_response(path, exc)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if not getattr(exc, "counted", False):  # raised before the handler's `tracked` (a dependency)
            return refused_response(request.app, request.url.path, exc, _received_at(request))
        return api_error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_refused(request.app, request.url.path, received_at=_received_at(request))  # before the handler ran
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(request.url.path, 422 if not is_oip(request.url.path) else 400,
                              "invalid_parameter", "; ".join(parts) or "invalid request")

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # FastAPI documents a 422 {"detail": [...]} on every route with parameters; /v2 answers
        # a validation error with the 400 its routes list (above), so that 422 never comes
        if app.openapi_schema is None:
            for path, operations in generate()["paths"].items():
                if is_oip(path):
                    for operation in operations.values():
                        operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code in (404, 405):  # the router's own: no route, or not this method
            if exc.status_code == 405 and endpoint_of(request.url.path) is not None:
                count_refused(request.app, request.url.path, received_at=_received_at(request))
            else:
                metrics = getattr(getattr(request.app.state, "runtime", None), "metrics", None)
                if metrics is not None:
                    metrics.unrouted.labels(str(exc.status_code)).inc()
        code = _STATUS_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {echo(request.url.path)}"
        return error_response(request.url.path, exc.status_code, code, message,
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return internal_error_response(request.method, request.url.path)
