"""Server metadata and health (Open Inference Protocol)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from podserve import __version__
from podserve.inference_flow import runtime_of
from podserve.json_response import json_response
from podserve.routes_statistics import metrics_of

router = APIRouter(tags=["health"])


@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    extensions = ["binary_tensor_data", "classification", "logging", "trace"]
    if metrics_of(request) is not None:
        extensions.append("statistics")
    return json_response({"name": "podserve", "version": __version__, "extensions": extensions})


@router.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/v2/health/ready", summary="Readiness: models loaded, not draining")
async def ready(request: Request) -> Response:
    is_ready = runtime_of(request).ready
    return json_response({"ready": is_ready}, status_code=200 if is_ready else 503)
