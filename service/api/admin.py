"""Admin routes, behind the `X-API-Key` header (settings.admin_api_key).

With no key configured the admin API is off: every admin route answers 403. The key is
compared in constant time (hmac.compare_digest), and it is checked before anything else in
the request is looked at, so a caller without it learns nothing about the pipelines.

`POST /admin/rmc/reset?pipeline=NAME[&to=bundle|snapshot]` puts an online RMC pipeline's
adaptation stream back to the bundle's weights (or to its latest in-memory snapshot). The
stream lives in one server process: the reset reaches only the process that answers (the
response names it, `process`, and says `scope: "process"`); with `--workers N` every worker,
and every replica, has its own stream (docs/defenses/rmc.md). A reset changes what every
client gets next, so each one is logged (WARNING, logger `shieldserve`) with the caller's
address, never the key.

`POST /admin/query-monitor/unblock?client=ID` lifts the query monitor's block on a client
(`ip:ADDRESS`, or `key:NAME` where API keys are on), with its flags and suspect mark: one an
operator judged a false alarm. On the Redis store it reaches every replica (`scope:
"shared"`), also those holding the block in their own store, which lift it when they next see
the client; on the memory store only the process that answers (`scope: "process"`). Logged
like a reset.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
from typing import Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field

from service.api.clients import client_network, forwarded_client, forwarded_for, parse_address
from service.api.errors import ApiError, echo
from service.api.schemas import ErrorBody
from service.store import StoreUnavailable

log = logging.getLogger("shieldserve")

router = APIRouter(prefix="/admin", tags=["admin"])


async def require_admin_key(request: Request,
                            x_api_key: str | None = Header(None, alias="X-API-Key",
                                                           description="the admin API key")) -> None:
    configured = request.app.state.settings.admin_api_key
    secret = configured.get_secret_value() if configured is not None else ""
    if not secret:
        raise ApiError(403, "forbidden", "admin API disabled: no admin_api_key is configured "
                                         "(set SHIELDSERVE_ADMIN_API_KEY)")
    if not x_api_key:
        raise ApiError(401, "unauthorized", "this route needs the admin key in the X-API-Key header",
                       {"WWW-Authenticate": "X-API-Key"})
    # the key's UTF-8 bytes against the header's own bytes (a client that sent UTF-8; Starlette
    # decodes headers as latin-1) and its text in UTF-8 (one that sent latin-1: Python's
    # http.client, browsers): both compared, in constant time, whatever the first gives
    raw, text, want = x_api_key.encode("latin-1"), x_api_key.encode("utf-8", "surrogatepass"), secret.encode()
    if not (hmac.compare_digest(raw, want) | hmac.compare_digest(text, want)):
        raise ApiError(403, "forbidden", "the X-API-Key header does not hold the admin key")


class RmcResetResponse(BaseModel):
    pipeline: str
    mode: str = Field(description="the RMC adapter's mode: online or isolated")
    restored: str = Field(description="'bundle', or 'snapshot@N' (the stream after N images)")
    discarded_images: int = Field(description="adapted images whose influence the reset removed")
    scope: Literal["process"] = Field(
        "process", description="what was reset: the stream of the one server process that answered; with "
                               "--workers N (or several replicas) every other process keeps its own")
    process: int = Field(description="the id (pid) of the server process whose stream was reset")
    workers: int = Field(description="the server processes this instance runs (--workers): a reset reaches "
                                     "all of them only once that many distinct `process` ids have answered")


def _caller(request: Request, runtime: Any) -> str:
    """The admin caller's address for the log line: one token on one line."""
    peer = request.client.host if request.client is not None else "unknown"
    caller = forwarded_client(peer, forwarded_for(request), tuple(runtime.settings.trusted_proxies))
    return "".join(ch if ch.isprintable() and not ch.isspace() else "?" for ch in caller)


@router.post("/rmc/reset", response_model=RmcResetResponse,
             responses={c: {"model": ErrorBody} for c in (401, 403, 404, 422)},
             dependencies=[Depends(require_admin_key)],
             summary="Reset an online RMC pipeline's adapted weights")
async def rmc_reset(request: Request,
                    pipeline: str = Query(..., description="the pipeline whose RMC adapter to reset"),
                    to: Literal["bundle", "snapshot"] = Query(
                        "bundle", description="the bundle's weights, or the latest in-memory snapshot"),
                    ) -> RmcResetResponse:
    runtime = request.app.state.runtime
    if pipeline not in runtime.pipelines:
        raise ApiError(404, "unknown_pipeline",
                       f"no pipeline {echo(pipeline)}; configured: {', '.join(sorted(runtime.pipelines))}")
    adapters = [c for c in runtime.pipelines[pipeline].components
                if c.role == "adapter" and callable(getattr(c, "reset", None))]
    if not adapters:
        raise ApiError(422, "invalid_parameter", f"pipeline {pipeline!r} has no RMC adapter to reset")
    # on the compute thread, as every torch call: after the batch running now, never inside it
    outcome = await asyncio.wrap_future(runtime.compute.submit(adapters[0].reset, to))
    # every later answer changes: leave a trace (who, what, how much), never the key
    client = _caller(request, runtime)
    log.warning("admin: rmc reset pipeline=%s to=%s restored=%s discarded=%d mode=%s process=%d client=ip:%s",
                pipeline, to, outcome["restored"], outcome["discarded_images"], outcome["mode"], os.getpid(),
                client)
    return RmcResetResponse(pipeline=pipeline, process=os.getpid(), workers=runtime.settings.workers, **outcome)


class UnblockResponse(BaseModel):
    client: str = Field(description="the client, as the service names it (an IPv6 address: its network)")
    was_blocked: bool = Field(description="whether the client was blocked (in Redis, or in this process)")
    scope: Literal["shared", "process"] = Field(
        description="shared: every replica of the Redis store (one holding the block in its own store lifts it "
                    "at the client's next request); process: only the server process that answered (memory store)")
    process: int = Field(description="the id (pid) of the server process that answered")


def _client_id(text: str, settings: Any) -> str:
    """The client id the monitor knows `text` by (service/api/clients.py), or 422."""
    kind, _, rest = text.partition(":")
    if len(text) > 256 or not text.isprintable() or any(ch.isspace() for ch in text) or not rest:
        raise ApiError(422, "invalid_parameter", "client must be ip:ADDRESS or key:NAME (printable, no spaces, "
                                                 "256 characters at most)")
    if kind == "key":
        if not settings.api_keys:
            raise ApiError(422, "invalid_parameter", "API keys are off: clients are named by address (ip:ADDRESS)")
        if rest not in settings.api_keys:
            raise ApiError(422, "invalid_parameter", f"no API key is named {echo(rest)}")
        return text
    if kind == "ip":
        if settings.api_keys:
            raise ApiError(422, "invalid_parameter", "API keys are on: clients are named by key (key:NAME)")
        # an address as a request names it (an IPv6 address: its network), a network in its
        # canonical spelling (as client_network writes it); anything else as given
        if parse_address(rest):
            return "ip:" + client_network(rest, settings.client_ipv6_prefix)
        try:
            net = ipaddress.ip_network(rest, strict=False)
        except ValueError:
            return text
        # a whole-address network (1.2.3.4/32) is the address
        return "ip:" + (client_network(str(net.network_address), settings.client_ipv6_prefix)
                        if net.prefixlen == net.max_prefixlen else str(net))
    raise ApiError(422, "invalid_parameter", "client must be ip:ADDRESS or key:NAME")


@router.post("/query-monitor/unblock", response_model=UnblockResponse,
             responses={c: {"model": ErrorBody} for c in (401, 403, 422, 503)},
             dependencies=[Depends(require_admin_key)],
             summary="Lift the query monitor's block on a client")
async def query_monitor_unblock(request: Request,
                                client: str = Query(..., description="ip:ADDRESS, or key:NAME where API keys are on")
                                ) -> UnblockResponse:
    runtime = request.app.state.runtime
    if runtime.monitor is None:
        raise ApiError(422, "invalid_parameter", "the query monitor is off: no pipeline is monitored")
    name = _client_id(client, runtime.settings)
    # a replica's copy of the block lasts at most the longest cooldown
    hold_s = max((p.monitor.cooldown_s for p in runtime.pipelines.values() if p.monitor is not None), default=1.0)
    monitor = runtime.monitor
    errors = monitor.redis.errors if monitor.redis is not None else ()
    try:
        outcome = await runtime.offload(lambda: monitor.unblock(name, hold_s))
    except errors as exc:
        raise StoreUnavailable(f"the query monitor's Redis did not take the unblock ({type(exc).__name__}): this "
                               f"process lifted its own copy of the block, Redis and the other replicas did not; "
                               f"try again when Redis answers") from None
    runtime._refresh_blocked()
    caller = _caller(request, runtime)
    # the client's id (an address or a key's name, never a key) is what the operator gave
    log.warning("admin: query monitor unblock client=%s was_blocked=%s scope=%s process=%d admin=ip:%s",
                name, outcome["was_blocked"], outcome["scope"], os.getpid(), caller)
    return UnblockResponse(client=name, process=os.getpid(), **outcome)
