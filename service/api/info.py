"""GET /pipelines, /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.schemas import HealthResponse, PipelineOut, PipelinesResponse

router = APIRouter(tags=["service"])


@router.get("/pipelines", response_model=PipelinesResponse, summary="Pipelines and their public settings")
async def pipelines(request: Request) -> PipelinesResponse:
    rt = request.app.state.runtime
    return PipelinesResponse(default=rt.settings.default_pipeline, model_version=rt.bundle.version,
                             pipelines=[PipelineOut(**p.describe()) for p in rt.pipelines.values()])


@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz(request: Request) -> HealthResponse:
    return HealthResponse(status="ok", model_version=request.app.state.runtime.bundle.version)


@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
            summary="Readiness: bundle loaded and warm, not draining")
async def readyz(request: Request) -> Response:
    rt = request.app.state.runtime
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining", "model_version": rt.bundle.version}, status_code=503)
    if not rt.ready:
        return JSONResponse({"status": "loading", "model_version": rt.bundle.version}, status_code=503)
    return JSONResponse({"status": "ok", "model_version": rt.bundle.version})


@router.get("/metrics", summary="Prometheus exposition", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
