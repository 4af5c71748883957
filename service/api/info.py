"""GET /pipelines, /healthz, /readyz, /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field

from service.api.schemas import HealthResponse, PipelineOut, PipelinesResponse

router = APIRouter(tags=["service"])


class PipelinesWithUnavailable(PipelinesResponse):
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="configured pipelines not served on this bundle, and why "
                                          "(a defense the quality gate found unusable, or one the bundle lacks)")
    query_monitor_off: str | None = Field(
        None, description="why the query monitor runs for no pipeline on this bundle (the quality gate "
                          "found it flags too many of the bundle's own benign images); null where it runs")
    suspect_linf_off: str | None = Field(
        None, description="why the monitor's suspect pixel check (suspect_linf) is off on this bundle (the quality "
                          "gate found too many of its benign images near each other); null where it runs")


@router.get("/pipelines", response_model=PipelinesWithUnavailable, summary="Pipelines and their public settings")
async def pipelines(request: Request) -> PipelinesWithUnavailable:
    rt = request.app.state.runtime
    return PipelinesWithUnavailable(default=rt.settings.default_pipeline, model_version=rt.bundle.version,
                                    pipelines=[PipelineOut(**p.describe()) for p in rt.pipelines.values()],
                                    unavailable=dict(getattr(rt, "unavailable", {})),
                                    query_monitor_off=getattr(rt, "monitor_off", None),
                                    suspect_linf_off=getattr(rt, "suspect_linf_off", None))


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
    # off the event loop: collecting runs the gauges' callbacks (the query monitor's blocked
    # count may ask Redis) and, with --workers, reads every worker's metric files
    rt = request.app.state.runtime
    return Response(await rt.offload(rt.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
