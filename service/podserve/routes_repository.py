"""What is served: KServe V1's model list and Triton's repository index (read-only).

podserve loads every model of PODSERVE_MODEL_REPOSITORY at start-up, in every worker, and
serves that set until the pod is replaced: a change of models is a rollout, so that all
workers and replicas always serve the same versions. Triton's load and unload calls
therefore answer 400 with that reason (as Triton does when its model control mode does not
allow them), and the `model_repository` extension is not announced in `GET /v2`.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from podserve.errors import BadRequest
from podserve.http_body import check_content_type, read_body
from podserve.inference_flow import runtime_of
from podserve.json_response import json_response
from podserve.model_repository import ModelRepository
from podserve.openapi_schemas import ERROR_RESPONSES
from podserve.protocol_v2 import loads_json

router = APIRouter(tags=["repository"], responses=ERROR_RESPONSES)

FIXED_SET = (
    "podserve serves the models of PODSERVE_MODEL_REPOSITORY loaded at start-up and does "
    "not {action} models at run time: change the repository and roll out a new revision"
)


def _repository(request: Request) -> ModelRepository:
    return runtime_of(request).served()


@router.get("/v1/models", summary="List models (KServe V1)")
async def list_models(request: Request) -> Response:
    return json_response({"models": sorted(_repository(request).models)})


@router.post("/v2/repository/index", summary="Repository index (Triton): every served version")
async def repository_index(request: Request) -> Response:
    repository = _repository(request)
    await _read_index_options(request)  # {"ready": bool} or nothing: every version is ready
    index = [
        {"name": name, "version": version, "state": "READY"}
        for name in sorted(repository.models)
        for version in sorted(repository.models[name].versions, key=int)
    ]
    return json_response(index)


async def _read_index_options(request: Request) -> None:
    settings = runtime_of(request).settings
    body = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    if not body.strip():
        return
    check_content_type(request)
    doc = loads_json(body)
    if not isinstance(doc, dict):
        raise BadRequest('repository index body must be a JSON object, e.g. {"ready": true}')
    if "ready" in doc and not isinstance(doc["ready"], bool):
        raise BadRequest(f"'ready' must be true or false, got {doc['ready']!r}")


@router.post("/v2/repository/models/{model_name}/load", summary="Load a model (not supported)")
async def load_model(request: Request, model_name: str) -> Response:
    _repository(request).get(model_name)  # an unknown model is a 404, as everywhere
    raise BadRequest(FIXED_SET.format(action="load"))


@router.post("/v2/repository/models/{model_name}/unload", summary="Unload a model (not supported)")
async def unload_model(request: Request, model_name: str) -> Response:
    _repository(request).get(model_name)
    raise BadRequest(FIXED_SET.format(action="unload"))
