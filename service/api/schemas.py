"""Pydantic models for every JSON body the service answers with (outside /v2)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class RejectionOut(BaseModel):
    defense: str
    detector: str
    score: float
    threshold: float


class StageOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # a stage may add numbers (e.g. reconstruction_error)
    defense: str
    seconds: float


class ImageResultOut(BaseModel):
    image_sha256: str
    status: Literal["accepted", "rejected", "abstained"]
    label: int | None = None
    class_name: str | None = None
    confidence: float | None = None
    certified_radius: float | None = None
    # smoothing pipelines: the radius the sequential test was asked to certify, whether it did
    # (certified_radius >= target_radius), and the noise samples this image used
    target_radius: float | None = None
    certified: bool | None = None
    samples: int | None = None
    # smoothing pipelines: the bound of the certificate: it holds with probability >= 1 - alpha
    # over the service's noise, drawn at this sigma
    alpha: float | None = None
    sigma: float | None = None
    rejected_by: list[RejectionOut] = Field(default_factory=list)
    stages: list[StageOut] = Field(default_factory=list)


class PredictResponse(BaseModel):
    request_id: str
    pipeline: str
    model_version: str
    results: list[ImageResultOut]


class DefenseOut(BaseModel):
    defense: str
    role: str
    settings: dict[str, Any] = Field(default_factory=dict)


class PipelineOut(BaseModel):
    name: str
    description: str = ""
    certifies: bool
    defenses: list[DefenseOut]
    query_monitor: dict[str, Any] | None = None  # the monitor's public policy; null: not monitored


class PipelinesResponse(BaseModel):
    default: str
    model_version: str
    pipelines: list[PipelineOut]


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "draining"]
    model_version: str | None = None
