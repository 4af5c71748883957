"""ASGI middleware that must see every request before FastAPI does."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import secrets
import time
from typing import Any

from starlette.requests import Request

from service.api.clients import check_api_key, from_trusted_proxy
from service.api.errors import ApiError, count_refused, endpoint_of, internal_error_response, is_oip, refused_response
from service.logs import logged_path, request_id_var

access_log = logging.getLogger("shieldserve.access")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatch: "$" would let a trailing newline in
# Generated ids: 32 hex digits, a random per-process prefix and a counter (unique, and without
# a system call per request as uuid4 makes)
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# what is read and thrown away of a refused request's body from a trusted proxy, at most
# (nginx's limit is 8 MiB; past this the connection is closed as for any client)
DRAIN_BYTES = 64 * 1024 * 1024
# The body a route that takes none (everything but /predict, /certify and /v2 infer: health,
# metadata, metrics, admin, a path with no route) may come with: read, as uvicorn holds this much
# of a body it was not asked for anyway (its flow control's high-water mark), and ignored. A
# larger one is 413 from its headers (or at this many bytes, chunked), unread: every path read up
# to max_body_bytes, so a client without a key could hold 8 MiB per connection on /healthz.
NO_BODY_BYTES = 64 * 1024


async def drain_body(receive: Any, read: int, declared: int | None, timeout_s: float | None = None) -> bool:
    """Read and throw away the rest of a refused request's body (`read` bytes of it taken
    already), so that the answer can keep the connection: True when the whole body was read,
    False on a disconnect, past DRAIN_BYTES (or a declared length past it: not read at all), or
    when a part takes longer than `timeout_s`. For a trusted proxy's requests only: nginx, still
    sending the body it buffered when the replica answered and closed, took the broken
    connection for a failed replica and, after 3 in 5 s (max_fails), took every replica out:
    keyless 8 MiB uploads made every client's request a 503."""
    if declared is not None and declared > DRAIN_BYTES:
        return False
    more = True
    while more:
        try:
            async with asyncio.timeout(timeout_s):
                message = await receive()
        except TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return False
        read += len(message.get("body", b""))
        if read > DRAIN_BYTES:
            return False
        more = message.get("more_body", False)
    return True


def declared_length(headers: Any) -> int | None:
    """Content-Length as a number, or None (absent, or not a number)."""
    value = dict(headers or []).get(b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _replay_once(body: bytes, receive: Any) -> Any:
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# how far past a request's deadline its body is still waited for (BodyLimitMiddleware)
DEADLINE_GRACE_S = 0.1


def _idle_timeout(scope: dict) -> float:
    """limits.body_idle_timeout_s of the app serving `scope`."""
    return scope["app"].state.settings.limits.body_idle_timeout_s


async def _deadline(scope: dict) -> Any:
    """The pipeline request's deadline (predict.Deadline), as its route's request_deadline
    makes it: from its arrival, `X-Request-Timeout` or request_timeout_s. A malformed header
    is the route's 422 to give once the body is in; meanwhile the server's deadline applies."""
    # imported here, not above: service.ray_proxy imports this module in Ray's HTTP proxies,
    # which must not load torch (service.api.predict does)
    from service.api.predict import TIMEOUT_HEADER, request_deadline

    request = Request(scope)
    try:
        return await request_deadline(request, request.headers.get(TIMEOUT_HEADER))
    except ApiError:
        return await request_deadline(request, None)


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, also chunked ones with no Content-Length;
    then watch the connection and stop the request's work when its client goes away.

    The body is read here (up to the limit) and replayed to the app, so no handler can be
    made to buffer more than the limit. With `api_keys` set, a request to a pipeline route
    without a known key is answered 401 first, from its headers (api.clients.check_api_key):
    a client without a key gets no body of its held in memory. A client that goes away
    before its body is in is counted and logged as one that goes away later is (outcome
    `client_closed`, 499). Once the body is in, this middleware is the only
    reader of the connection's further messages: an `http.disconnect` before the response
    is complete cancels the handler's task. The cancellation reaches the batcher (the job is
    dropped, or the batch stops at its next `ctx.check()` when no one else waits for it) and
    /certify's sampling loop; the request is counted with outcome `client_closed`.

    Only the pipeline routes take a body: any other route's is capped at NO_BODY_BYTES. Each
    wait for the next part of a body is bounded (uvicorn bounds none): by
    `limits.body_idle_timeout_s` (408 `request_timeout`), and on a pipeline route by what is
    left of the request's deadline (504 `deadline_exceeded`), which counts from its arrival;
    both answered with `Connection: close`, the rest of the body never read.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {}).setdefault("received_at", time.monotonic())
        pipeline_route = endpoint_of(scope["path"]) is not None
        if pipeline_route and await self._unauthorized(scope, receive, send):
            return
        limit = self.max_bytes if pipeline_route else min(self.max_bytes, NO_BODY_BYTES)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                return await self._reject(scope, send, 400, "bad_request", "Content-Length is not a number")
            if too_big:
                return await self._too_big(scope, send, limit, await self._drained(scope, receive, 0))
        idle_s = _idle_timeout(scope)
        deadline = await _deadline(scope) if pipeline_route else None
        chunks, size, more = [], 0, True
        while more:
            wait, late = idle_s, False
            if deadline is not None and deadline.remaining() + DEADLINE_GRACE_S <= idle_s:
                # cut at the deadline and a little more: a body that is in but takes a moment to
                # be handed on (Ray's replica receives it from its proxy in a few ms) reaches the
                # route, whose own 504 counts it under its pipeline; a body still arriving is
                # 504 here. Past the deadline too: a part already in is still taken
                wait, late = deadline.remaining() + DEADLINE_GRACE_S, True
            try:
                async with asyncio.timeout(wait):
                    message = await receive()
            except TimeoutError:
                return await self._timed_out(scope, send, idle_s, deadline if late else None)
            if message["type"] == "http.disconnect":
                # gone during its upload: as a client gone later is (tracked, and the 499 of
                # RequestIdMiddleware's access line), not a 500 counted nowhere
                scope["state"]["client_closed"] = True
                count_refused(scope.get("app"), scope["path"], "client_closed",
                              received_at=scope["state"]["received_at"])
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                rest = message.get("more_body", False)
                return await self._too_big(scope, send, limit,
                                           not rest or await self._drained(scope, receive, size))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if not pipeline_route:  # health, metadata, metrics: no pipeline work to stop
            return await self.app(scope, _replay_once(body, receive), send)
        replayed = False
        task = asyncio.current_task()
        state = {"responded": False, "disconnected": False}

        async def watch() -> dict:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state["responded"] and task is not None:
                        state["disconnected"] = True
                        task.cancel()
                    return message

        watcher = asyncio.create_task(watch())

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await asyncio.shield(watcher)

        async def tracking_send(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["responded"] = True
            await send(message)

        try:
            await self.app(scope, replay, tracking_send)
        except asyncio.CancelledError:
            if not state["disconnected"] or task is None:
                raise
            task.uncancel()
            scope["state"]["client_closed"] = True
        finally:
            watcher.cancel()

    @staticmethod
    async def _drained(scope: dict, receive: Any, read: int) -> bool:
        """The rest of a refused body read and thrown away (drain_body), from a trusted proxy
        only: a direct client's body is never read (its refusal closes the connection). Each
        part within body_idle_timeout_s: a gateway that stalls is closed on as anyone is."""
        if not from_trusted_proxy(scope):
            return False
        return await drain_body(receive, read, declared_length(scope.get("headers")), _idle_timeout(scope))

    @classmethod
    async def _unauthorized(cls, scope: dict, receive: Any, send: Any) -> bool:
        """Answer the 401 of a request without a known key (api_keys set) and say so; False for
        one with a key, or with keys off. The route's dependency (require_api_key) runs the same
        check: the same 401, counted as it counts one, with `Connection: close` as the 413's
        (the unread body must not be taken for the connection's next request), unless the body
        came from a trusted proxy and was read (_drained)."""
        try:
            check_api_key(Request(scope))
        except ApiError as exc:
            response = refused_response(scope.get("app"), scope["path"], exc, scope["state"]["received_at"])
            if not await cls._drained(scope, receive, 0):
                response.headers["connection"] = "close"
            await response(scope, receive, send)
            return True
        return False

    async def _too_big(self, scope: dict, send: Any, limit: int, drained: bool = False) -> None:
        message = (f"request body is larger than the limit of {limit} bytes" if limit == self.max_bytes else
                   f"this route takes no request body (one of up to {limit} bytes is read and ignored)")
        await self._reject(scope, send, 413, "payload_too_large", message, keep_alive=drained)

    async def _timed_out(self, scope: dict, send: Any, idle_s: float, deadline: Any) -> None:
        """The body stopped arriving: 408 after `idle_s` without a part, or the 504 of the
        `deadline` it ran into. Closed, the rest unread (from a trusted proxy too: what does not
        arrive cannot be drained). A 504 here counts as `client_deadline` even on the server's
        deadline: the server only waited for the client's bytes (a slow upload is not the
        overload the `deadline_exceeded` alert is for)."""
        received_at = scope["state"]["received_at"]
        if deadline is None:
            await self._reject(scope, send, 408, "request_timeout",
                               f"the request body stopped arriving (nothing for {idle_s:g} s)",
                               outcome="error", received_at=received_at)
        else:
            await self._reject(scope, send, 504, "deadline_exceeded",
                               f"{deadline.error().message}: its body was still arriving",
                               outcome="client_deadline", received_at=received_at)

    @staticmethod
    async def _reject(scope: dict, send: Any, status: int, code: str, message: str, keep_alive: bool = False,
                      outcome: str = "error", received_at: float | None = None) -> None:
        """The refusal; `Connection: close` unless the whole body was read (`keep_alive`)."""
        count_refused(scope.get("app"), scope["path"], outcome, received_at=received_at)
        payload = {"error": message} if is_oip(scope["path"]) else {"error": {"code": code, "message": message}}
        body = json.dumps(payload).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if not keep_alive:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    """Accept a sane `X-Request-ID` or make one; expose it to handlers and logs, echo it back,
    and write one access-log line per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.fullmatch(given) else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        status = 500

        started_response = False

        async def send_with_id(message: dict) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            # cancelled before it was answered: under Ray Serve a client's disconnect reaches the
            # replica as a cancellation (no http.disconnect), as does the proxy's timeout
            if not started_response:
                status = 499
            raise
        except Exception:
            if started_response:
                raise
            # answered here, inside this middleware, so the 500 carries the request id too
            # (Starlette's last-resort handler sits outside every middleware)
            await internal_error_response(scope["method"], scope["path"])(scope, receive, send_with_id)
        finally:
            if scope["state"].get("client_closed"):
                status = 499  # nginx's code for "the client closed the connection"
            if access_log.isEnabledFor(logging.INFO):  # the extra fields cost even when not logged
                path = logged_path(scope["path"])
                access_log.info("%s %s %s", scope["method"], path, status,
                                extra={"method": scope["method"], "path": path, "status": status,
                                       "seconds": round(time.perf_counter() - started, 6)})
            request_id_var.reset(token)
