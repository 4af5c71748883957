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
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from pydantic import BaseModel, Field

from service.api.clients import forwarded_client, forwarded_for
from service.api.errors import ApiError, echo
from service.api.schemas import ErrorBody

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
    peer = request.client.host if request.client is not None else "unknown"
    client = forwarded_client(peer, forwarded_for(request), tuple(runtime.settings.trusted_proxies))
    client = "".join(ch if ch.isprintable() and not ch.isspace() else "?" for ch in client)  # one line, one token
    log.warning("admin: rmc reset pipeline=%s to=%s restored=%s discarded=%d mode=%s process=%d client=ip:%s",
                pipeline, to, outcome["restored"], outcome["discarded_images"], outcome["mode"], os.getpid(),
                client)
    return RmcResetResponse(pipeline=pipeline, process=os.getpid(), workers=runtime.settings.workers, **outcome)
