"""GET /pipelines, /healthz, /readyz, /metrics."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field

from service.api.schemas import HealthResponse, PipelineOut, PipelinesResponse

router = APIRouter(tags=["service"])
# Each GET route here also answers HEAD (a load balancer's health check; the server sends no
# body): a second route of the same function, kept out of the OpenAPI document, where FastAPI
# would give both methods of one route a single operationId (and change GET's).


class PipelineWithQuality(PipelineOut):
    quality: Literal["passed", "below_gate_not_enforced", "unmeasured"] | None = Field(
        None, description="what the bundle's quality gate says of this pipeline's defenses (the worst of them): "
                          "passed; below_gate_not_enforced (measured below the gate, served because the bundle "
                          "does not enforce it); unmeasured (no verdict); null for a pipeline without defenses. Every pipeline reads "
                          "below_gate_not_enforced when the gate's check of the base classifier itself failed")
    quality_warning: str | None = Field(
        None, description="for a pipeline not `passed`: which defense, its measured figures, how to enforce the gate")


class PipelinesWithUnavailable(PipelinesResponse):
    pipelines: list[PipelineWithQuality]  # type: ignore[assignment]
    unavailable: dict[str, str] = Field(
        default_factory=dict, description="configured pipelines not served on this bundle, and why "
                                          "(a defense the quality gate found unusable, or one the bundle lacks)")
    query_monitor_off: str | None = Field(
        None, description="why the query monitor runs for no pipeline on this bundle (the quality gate "
                          "found it flags too many of the bundle's own benign images); null where it runs")
    suspect_linf_off: str | None = Field(
        None, description="why the monitor's suspect pixel check (suspect_linf) is off on this bundle (the quality "
                          "gate found too many of its benign images near each other); null where it runs")


@router.head("/pipelines", include_in_schema=False)
@router.get("/pipelines", response_model=PipelinesWithUnavailable, summary="Pipelines and their public settings")
async def pipelines(request: Request) -> PipelinesWithUnavailable:
    rt = request.app.state.runtime
    return PipelinesWithUnavailable(default=rt.settings.default_pipeline, model_version=rt.bundle.version,
                                    pipelines=[_with_quality(rt, name, p.describe()) for name, p in rt.pipelines.items()],
                                    unavailable=dict(getattr(rt, "unavailable", {})),
                                    query_monitor_off=getattr(rt, "monitor_off", None),
                                    suspect_linf_off=getattr(rt, "suspect_linf_off", None))


def _with_quality(rt: object, name: str, described: dict) -> PipelineWithQuality:
    status, warning = getattr(rt, "quality_status", {}).get(name, (None, None))
    return PipelineWithQuality(**described, quality=status, quality_warning=warning)


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz(request: Request) -> HealthResponse:
    return HealthResponse(status="ok", model_version=request.app.state.runtime.bundle.version)


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", response_model=HealthResponse, responses={503: {"model": HealthResponse}},
            summary="Readiness: bundle loaded and warm, not draining")
async def readyz(request: Request) -> Response:
    rt = request.app.state.runtime
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining", "model_version": rt.bundle.version}, status_code=503)
    if not rt.ready:
        return JSONResponse({"status": "loading", "model_version": rt.bundle.version}, status_code=503)
    return JSONResponse({"status": "ok", "model_version": rt.bundle.version})


@router.head("/metrics", include_in_schema=False)
@router.get("/metrics", summary="Prometheus exposition", response_class=Response)
async def metrics(request: Request) -> Response:
    # off the event loop: collecting runs the gauges' callbacks (the query monitor's blocked
    # count may ask Redis) and, with --workers, reads every worker's metric files
    rt = request.app.state.runtime
    return Response(await rt.offload(rt.metrics.exposition), media_type=CONTENT_TYPE_LATEST)
