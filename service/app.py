"""The app factory: everything is built from settings; tests build their own app."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

import service
from service.api import admin, certify, info, oip, predict
from service.api.errors import install_error_handlers
from service.api.middleware import BodyLimitMiddleware, RequestIdMiddleware
from service.logs import configure_logging
from service.metrics import multiprocess_dir
from service.runtime import Runtime
from service.settings import Settings, load_settings
from service.store import MemoryStore, Store

log = logging.getLogger("shieldserve")


class InflightMiddleware:
    """Counts requests being served (the `shieldserve_inflight_requests` gauge)."""

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        gauge = self.runtime.metrics.inflight
        gauge.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            gauge.dec()


def create_app(settings: Settings | None = None, runtime: Runtime | None = None,
               store: Store | None = None) -> FastAPI:
    """Build the app. Without arguments, settings come from SHIELDSERVE_CONFIG and the
    environment and logging is set up as `shieldserve serve` sets it up. Nothing process-wide
    (torch's thread count) is set here: `--workers N`'s processes start through
    service.server.worker_app, which sets that once per process and then calls this."""
    if settings is None:
        settings = load_settings()
        configure_logging(settings.log_level, settings.json_logs)
    runtime = runtime or Runtime(settings)
    c = settings.certify  # recently posted images and their certificates, for GET /certify
    if store is None and c.store == "redis":
        from service.redis_store import RedisStore

        metrics = runtime.metrics

        def down(now_down: bool) -> None:
            metrics.certify_store_down.set(1 if now_down else 0)
            if now_down:
                metrics.certify_store_outages.inc()

        store = RedisStore(c.redis_url, c.store_max_images, c.store_max_certificates, c.store_max_age_s,
                           prefix=c.redis_prefix, on_down=down)
    store = store or MemoryStore(c.store_max_images, c.store_max_certificates, c.store_max_age_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.warmup:
            await asyncio.wrap_future(runtime.compute.submit(runtime.warmup))
        # Everything loaded so far lives as long as the process: keep it out of the garbage
        # collector's full passes, which otherwise pause every thread (they hold the GIL) for
        # over 100 ms every few seconds under load (docs/operations.md, bench/gc_pauses.py).
        gc.collect()
        gc.freeze()
        runtime.ready = True
        yield
        app.state.draining = True
        runtime.ready = False
        await runtime.close()
        if multiprocess_dir():
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(title="shieldserve", version=service.__version__, lifespan=lifespan,
                  telemetry=None if settings.fastapi_telemetry else {"tracing": False, "metrics": False, "logs": False},
                  description="An image classifier behind runtime adversarial defenses.")
    app.state.runtime = runtime
    app.state.settings = settings
    app.state.store = store
    app.state.draining = False
    install_error_handlers(app)
    for api in (predict, certify, info, admin, oip):
        app.include_router(api.router)
    # outermost first: request id, CORS (only when origins are configured), in-flight count,
    # then the body limit and disconnect watch
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_body_bytes)
    app.add_middleware(InflightMiddleware, runtime=runtime)
    if settings.cors_origins:  # off by default: no CORS header at all unless origins are named
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           # the last: where a binary /v2 response's JSON ends, which a browser
                           # client needs to split it
                           expose_headers=["X-Request-ID", "Retry-After", "Inference-Header-Content-Length"],
                           max_age=600)
    app.add_middleware(RequestIdMiddleware)
    return app
