"""Triton's statistics extension: GET /v2/models[/{name}[/versions/{version}]]/stats.

The numbers come from the pod's metrics (see model_statistics.py), so the extension is
announced in `GET /v2` only while metrics are on. This router is included before the V2
model routes: `/v2/models/stats` would otherwise be read as the metadata of a model named
"stats" (Triton has the same ambiguity and resolves it the same way).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response

from podserve.errors import BadRequest
from podserve.inference_flow import runtime_of
from podserve.json_response import json_response
from podserve.metrics import Metrics
from podserve.model_repository import ServedModel
from podserve.model_statistics import model_stat, read_totals
from podserve.openapi_schemas import ERROR_RESPONSES

router = APIRouter(tags=["statistics"], responses=ERROR_RESPONSES)


def metrics_of(request: Request) -> Metrics | None:
    return request.app.state.observability.metrics


@router.get("/v2/models/stats", summary="Inference statistics of every model (Triton)")
async def all_statistics(request: Request) -> Response:
    served = runtime_of(request).served().models
    return await _answer(request, [(n, v) for n in sorted(served) for v in _versions(served[n])])


@router.get("/v2/models/{model_name}/stats", summary="Inference statistics of a model (Triton)")
async def model_statistics(request: Request, model_name: str) -> Response:
    runtime_of(request).model(model_name)  # an unknown model is a 404, as everywhere
    served = runtime_of(request).served().models[model_name]
    return await _answer(request, [(model_name, v) for v in _versions(served)])


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats",
    summary="Inference statistics of a model version (Triton)",
)
async def model_version_statistics(
    request: Request, model_name: str, model_version: str
) -> Response:
    model = runtime_of(request).model(model_name, model_version)  # 404: unknown model, version
    return await _answer(request, [(model.name, model.version)])


def _versions(served: ServedModel) -> list[str]:
    return sorted(served.versions, key=int)


async def _answer(request: Request, models: list[tuple[str, str]]) -> Response:
    """One $model_stat per (model, version), as Triton: every version of a model in turn."""
    metrics = metrics_of(request)
    if metrics is None:
        raise BadRequest(
            "statistics come from the metrics, which are off (PODSERVE_METRICS_ENABLED=false)"
        )
    metrics.flush()  # this worker's own samples are exact in its answer
    totals = await asyncio.to_thread(read_totals, metrics.exposition)  # reads every worker's file
    stats = [model_stat(name, version, totals.get((name, version))) for name, version in models]
    return json_response({"model_stats": stats})
