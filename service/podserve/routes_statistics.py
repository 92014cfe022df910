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
from podserve.model_statistics import model_stat, read_totals
from podserve.openapi_schemas import ERROR_RESPONSES

router = APIRouter(tags=["statistics"], responses=ERROR_RESPONSES)


def metrics_of(request: Request) -> Metrics | None:
    return request.app.state.observability.metrics


@router.get("/v2/models/stats", summary="Inference statistics of every model (Triton)")
async def all_statistics(request: Request) -> Response:
    return await _answer(request, None)


@router.get("/v2/models/{model_name}/stats", summary="Inference statistics of a model (Triton)")
async def model_statistics(request: Request, model_name: str) -> Response:
    runtime_of(request).model(model_name)  # an unknown model is a 404, as everywhere
    return await _answer(request, model_name)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/stats",
    summary="Inference statistics of a model version (Triton)",
)
async def model_version_statistics(
    request: Request, model_name: str, model_version: str
) -> Response:
    runtime = runtime_of(request)
    runtime.model(model_name, model_version)  # 404 for an unknown model or version
    versions = runtime.served().models[model_name].versions
    if len(versions) > 1:
        raise BadRequest(
            f"podserve keeps statistics per model, not per version; '{model_name}' serves "
            f"versions {sorted(versions, key=int)}: ask /v2/models/{model_name}/stats"
        )
    return await _answer(request, model_name)


async def _answer(request: Request, model_name: str | None) -> Response:
    metrics = metrics_of(request)
    if metrics is None:
        raise BadRequest(
            "statistics come from the metrics, which are off (PODSERVE_METRICS_ENABLED=false)"
        )
    repository = runtime_of(request).served()
    names = [model_name] if model_name is not None else sorted(repository.models)
    metrics.flush()  # this worker's own samples are exact in its answer
    totals = await asyncio.to_thread(read_totals, metrics.exposition)  # reads every worker's file
    stats = [model_stat(n, repository.models[n].versions, totals.get(n)) for n in names]
    return json_response({"model_stats": stats})
