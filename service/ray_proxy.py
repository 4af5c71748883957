"""The service's edge rules in Ray Serve's HTTP proxy (`shieldserve serve --ray`).

Ray's proxy (Ray 2.60) takes a request's body off the socket as fast as it comes, with no
limit, and queues it for the replica: the replica's body limit and API-key check
(service/api/middleware.py, BodyLimitMiddleware) came only after the proxy had read it all
(a 300 MiB upload without a key was read whole). A request takes one of its replica's
`max_ongoing_requests` slots as soon as the proxy hands it on, before its body is in: 40
slow uploads locked every other client out. And the proxy answers some errors itself, as
`text/plain`. `ProxyEdgeMiddleware`, in each proxy in front of Ray's own, does what the
nginx gateway does (docker/nginx.conf):

  * on the pipeline routes, a request without a known API key (`api_keys` set) is answered
    401 `unauthorized` from its headers, before any of its body is read;
  * the body is capped at `limits.max_body_bytes`: 413 `payload_too_large` from
    `Content-Length`, else as soon as the bytes received pass it (`Connection: close`: the
    rest is never read; from one of `trusted_proxies`, the nginx gateway, the refused body is
    read and thrown away first and the connection kept, as the replicas do: closed on it,
    nginx took the proxy for a failed upstream, service.api.middleware.drain_body);
  * the whole body is read before Ray routes the request, each read within `body_timeout_s`
    (nginx's `client_body_timeout`, 15 s; 408 `request_timeout` after it): a replica's slot
    is taken only by a request whose body is in;
  * Ray's own errors get the contract's JSON body (`{"error": {"code", "message"}}`, on
    `/v2/*` `{"error": message}`) and an `X-Request-ID`: its backpressure 503 is
    `overloaded` (its `Retry-After` kept), its timeout (408) a 504 `deadline_exceeded`, and a
    replica that died with the request (no answer at all, which uvicorn made a text 500), a
    deployment with no replica (503 without `Retry-After`) or an application not deployed
    (404) a 503 `unavailable` with `Retry-After`.

Installed through Ray's documented hook, the environment variable
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (`middlewares` below), which each proxy reads as it
starts; the limits come in CONFIG_ENV (service.ray_app.proxy_env). Ray's `/-/healthz` and
`/-/routes` pass untouched. The answers given here never reach Ray's proxy, so neither Ray's
metrics nor the replicas' count them: each is counted in the Ray metric
`shieldserve_proxy_refused_requests` (exported by Ray as
`ray_shieldserve_proxy_refused_requests_total{status, code}`) and written as a line to the
proxy's log (logger `ray.serve.shieldserve`, in Ray's proxy log file beside Ray's own lines):
method, path, status, code, request id and client address, never a key; so is a client gone
during its upload (499 `client_closed`, as the replica counts one). Ray's own per-request
timeout header (`X-Request-Timeout-Seconds`) is dropped, as the gateway drops it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import Request

from service.api.clients import api_key_of, key_digests, peer_is_trusted
from service.api.errors import endpoint_of, error_body
from service.api.middleware import REQUEST_ID, declared_length, drain_body
from service.logs import escape_controls, logged_path

# what ray_app sets in the proxies' environment
CALLBACK = "service.ray_proxy:middlewares"
CONFIG_ENV = "SHIELDSERVE_RAY_PROXY"

# a child of Ray Serve's logger, whose handlers (configured by Ray in each proxy) write the
# proxy's log file; the root logger of a proxy's process is not ours to configure
log = logging.getLogger("ray.serve.shieldserve")
REFUSED_METRIC = "shieldserve_proxy_refused_requests"
RAY_TIMEOUT_HEADER = b"x-request-timeout-seconds"


@dataclass(frozen=True)
class ProxyConfig:
    max_body_bytes: int = 8 * 1024 * 1024  # limits.max_body_bytes
    body_timeout_s: float = 15.0  # longest wait for the next part of a body
    api_keys: tuple[str, ...] = ()  # the sha256 hex digests of api_keys (no key in them)
    retry_after_s: int = 1  # admission.retry_after_s: the Retry-After of a 503 `unavailable`
    trusted_proxies: tuple[str, ...] = ()  # whose refused bodies are read to keep the connection

    @classmethod
    def of(cls, settings: Any, body_timeout_s: float) -> ProxyConfig:
        return cls(max_body_bytes=settings.limits.max_body_bytes, body_timeout_s=body_timeout_s,
                   api_keys=tuple(sorted(set(settings.api_keys.values()))),
                   retry_after_s=settings.admission.retry_after_s,
                   trusted_proxies=tuple(settings.trusted_proxies))

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, environ: Any = None) -> ProxyConfig:
        """The config in CONFIG_ENV; the defaults where it is unset. Anything else in it fails
        the proxy's start (Ray retries it and says why), rather than serve without limits."""
        raw = (os.environ if environ is None else environ).get(CONFIG_ENV)
        if not raw:
            return cls()
        data = json.loads(raw)
        data["api_keys"] = tuple(data.get("api_keys", ()))
        data["trusted_proxies"] = tuple(data.get("trusted_proxies", ()))
        config = cls(**data)
        if config.max_body_bytes <= 0 or config.body_timeout_s <= 0:
            raise ValueError(f"{CONFIG_ENV}: max_body_bytes and body_timeout_s must be > 0")
        return config


def middlewares() -> list[Middleware]:
    """RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH's callback, called once by each of Ray Serve's
    HTTP proxies as it starts. Ray wants a list of Starlette `Middleware` (ray/serve/_private/
    http_util.py, validate_http_proxy_callback_return) and puts them outside its own."""
    return [Middleware(ProxyEdgeMiddleware, config=ProxyConfig.from_env(), refused=_refused_counter())]


def _refused_counter() -> Any:
    """The Ray counter of the answers given here, where Ray runs (in a proxy it always does);
    None elsewhere (a metric recorded outside a Ray worker fails)."""
    try:
        import ray
        from ray.util.metrics import Counter
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return Counter(REFUSED_METRIC, description="requests answered by shieldserve's middleware in Ray Serve's "
                                               "proxy, before Ray saw them (401, 400, 413, 408), and clients "
                                               "gone during their upload (499)",
                   tag_keys=("status", "code"))


def _known_key(key: str | None, digests: tuple[str, ...]) -> bool:
    """Whether `key` is one of the keys `digests` are of, as the replica tells (clients.key_digests)."""
    return key is not None and not key_digests(key).isdisjoint(digests)


def _header(headers: Any, name: bytes) -> bytes | None:
    """The first value of header `name` (lower case), as Starlette's Headers.get reads it."""
    return next((v for k, v in headers or [] if k.lower() == name), None)


# Ray's own errors (text/plain): (status, code, message) of the contract's answer
_OVERLOADED = (503, "overloaded", "too many requests are waiting for a replica; retry after Retry-After seconds")
_NO_REPLICA = (503, "unavailable",
               "no replica of the service can take requests now (starting, or failed to deploy); retry later")
_NOT_DEPLOYED = (503, "unavailable",
                 "the service is not deployed on this proxy (starting or shutting down); retry later")
_REPLICA_FAILED = (503, "unavailable", "the replica serving this request failed before answering; retry")
_RAY_TIMEOUT = (504, "deadline_exceeded", "no replica answered within the proxy's timeout")


def _rays_error(status: int, headers: Any) -> tuple[int, str, str] | None:
    """The contract's answer for Ray's own error response, or None for anything else: the
    service answers every error in JSON, Ray's proxy in text/plain."""
    if not (_header(headers, b"content-type") or b"").startswith(b"text/plain"):
        return None
    if status == 503:
        return _OVERLOADED if _header(headers, b"retry-after") is not None else _NO_REPLICA
    return {408: _RAY_TIMEOUT, 404: _NOT_DEPLOYED, 500: _REPLICA_FAILED}.get(status)


class ProxyEdgeMiddleware:
    """The module's rules, around Ray's proxy app (Ray's RequestIdMiddleware inside it)."""

    def __init__(self, app: Any, config: ProxyConfig, refused: Any = None) -> None:
        self.app, self.config, self.refused = app, config, refused

    def _refused(self, scope: dict, request_id: bytes, status: int, code: str) -> None:
        """An answer given here in the log and the metric (what Ray's proxy would have counted)."""
        if self.refused is not None:
            self.refused.inc(tags={"status": str(status), "code": code})
        if log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            # Ray's formatter writes the line: the client's text in it cannot pass for fields of
            # the line (a request id only when the service would take it; the path quoted, escaped)
            rid = request_id.decode("latin-1")
            log.info("refused at the proxy: %s %s %s (request id %s, client %s, path %s)", scope.get("method"),
                     status, code, rid if REQUEST_ID.fullmatch(rid) else "(not shown: not a token)",
                     client[0] if client else "-", escape_controls(repr(logged_path(scope["path"]))))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/-/"):
            return await self.app(scope, receive, send)
        request_id = _header(scope.get("headers"), b"x-request-id")
        if request_id is None:
            # the id Ray's RequestIdMiddleware would make (a uuid4), made here so that the answers
            # given here carry it too; Ray's takes it and echoes it on every response
            request_id = str(uuid.uuid4()).encode()
            scope["headers"] = [*(scope.get("headers") or []), (b"x-request-id", request_id)]
        path = scope["path"]
        # Ray's per-request timeout header, which a client could set to 0 to turn Ray's timeout
        # off or to a few ms to have its request cancelled at the replica (counted there as a
        # client gone): dropped, as the nginx gateway drops it
        scope["headers"] = [(k, v) for k, v in scope.get("headers") or [] if k.lower() != RAY_TIMEOUT_HEADER]

        async def refuse(status: int, code: str, message: str, headers: Any = (), read: int | None = 0,
                         complete: bool = False) -> None:
            """An answer of this middleware's own, before Ray saw the request: its body left unread
            and the connection closed, or, from a trusted proxy, read (`read` bytes taken
            already; None: it cannot be, it stopped arriving) and the connection kept, as it is
            when the whole body was in (`complete`)."""
            self._refused(scope, request_id, status, code)
            kept = complete or (read is not None and peer_is_trusted(scope, config.trusted_proxies)
                                and await drain_body(receive, read, declared_length(scope.get("headers")),
                                                     config.body_timeout_s))
            await answer(status, code, message, headers, close=not kept)

        async def answer(status: int, code: str, message: str, headers: Any = (), close: bool = False) -> None:
            body = json.dumps(error_body(path, code, message))
            out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            out += [(bytes(k), bytes(v)) for k, v in headers]
            if _header(out, b"x-request-id") is None:
                out.append((b"x-request-id", request_id))
            if close:  # the body left unread must not be taken for the connection's next request
                out.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": status, "headers": out})
            await send({"type": "http.response.body", "body": body.encode()})

        config = self.config
        if config.api_keys and endpoint_of(path) is not None:
            key = api_key_of(Request(scope))
            if not _known_key(key, config.api_keys):
                # as the replica's require_api_key answers it (BodyLimitMiddleware._unauthorized)
                return await refuse(401, "unauthorized",
                                    "this service needs an API key: Authorization: Bearer KEY or X-API-Key: KEY"
                                    if key is None else "unknown API key", [(b"www-authenticate", b"Bearer")])
        too_big = f"request body is larger than the limit of {config.max_body_bytes} bytes"
        declared = _header(scope.get("headers"), b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await refuse(400, "bad_request", "Content-Length is not a number", read=None)
            digits = declared.lstrip(b"0") or b"0"
            # more digits than the limit has is over it (int() refuses over 4,300 digits)
            if len(digits) > len(str(config.max_body_bytes)) or int(digits) > config.max_body_bytes:
                return await refuse(413, "payload_too_large", too_big)

        chunks, size, more = [], 0, True
        while more:
            try:
                async with asyncio.timeout(config.body_timeout_s):
                    message = await receive()
            except TimeoutError:
                return await refuse(408, "request_timeout", f"the request body stopped arriving (nothing for "
                                                            f"{config.body_timeout_s:g} s)", read=None)
            if message["type"] == "http.disconnect":
                # gone during its upload: nobody to answer, but counted and logged as the replica
                # counts one (`client_closed`, nginx's 499); Ray never saw it
                self._refused(scope, request_id, 499, "client_closed")
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > config.max_body_bytes:
                return await refuse(413, "payload_too_large", too_big, read=size,
                                    complete=not message.get("more_body", False))
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        state = {"delivered": False, "started": False, "disconnected": False, "held": None}

        async def replay() -> dict:
            if not state["delivered"]:
                state["delivered"] = True
                return {"type": "http.request", "body": body, "more_body": False}
            message = await receive()  # the client's disconnect, which makes Ray cancel the request
            if message["type"] == "http.disconnect":
                state["disconnected"] = True
            return message

        async def contract_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                mapped = _rays_error(message["status"], message.get("headers"))
                if mapped is not None:
                    state["held"] = (message, mapped)  # Ray's own error: answered below, with its body
                    return
                state["started"] = True
            elif message["type"] == "http.response.body" and state["held"] is not None:
                if not message.get("more_body", False):
                    held, (status, code, text) = state["held"]
                    state["held"], state["started"] = None, True
                    keep = [(k, v) for k, v in held.get("headers") or []
                            if k.lower() in (b"retry-after", b"x-request-id")]
                    if status == 503 and code == "unavailable" and _header(keep, b"retry-after") is None:
                        keep.append((b"retry-after", str(config.retry_after_s).encode()))
                    await answer(status, code, text, keep)
                return
            await send(message)

        try:
            await self.app(scope, replay, contract_send)
        except Exception:
            if state["started"]:
                raise
            log.exception("Ray Serve's proxy failed on %s %s", scope.get("method"), path)
        if not state["started"] and not state["disconnected"]:
            # Ray's proxy returned without an answer: the replica died with the request (Ray
            # leaves that to uvicorn's bare text 500)
            status, code, text = _REPLICA_FAILED
            await answer(status, code, text, [(b"retry-after", str(config.retry_after_s).encode())])
