"""What is served: KServe V1's model list and Triton's repository index (read-only).

podserve loads every model of PODSERVE_MODEL_REPOSITORY at start-up, in every worker, and
serves that set until the pod is replaced: a change of models is a rollout, so that all
workers and replicas always serve the same versions. Triton's load and unload calls
therefore answer 400 with that reason, for any model name, and the `model_repository`
extension is not announced in `GET /v2`. Triton in model control mode NONE refuses them
before it looks the name up ("explicit model load / unload is not allowed if polling is
enabled", UNAVAILABLE): 400 in its HTTP server until it mapped error codes to statuses, 503
since. podserve keeps 400: a 503 is retried by clients and meshes, and no retry can help.
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
    raise _not_at_run_time(_repository(request), "load", model_name)


@router.post("/v2/repository/models/{model_name}/unload", summary="Unload a model (not supported)")
async def unload_model(request: Request, model_name: str) -> Response:
    raise _not_at_run_time(_repository(request), "unload", model_name)


def _not_at_run_time(repository: ModelRepository, action: str, model_name: str) -> BadRequest:
    """The same 400 whether or not the model is served: Triton, whose model control mode
    does not allow loads, refuses before it looks the name up (a 404 for an unknown model
    told a client that loading it might work once the name was right)."""
    shown = model_name if len(model_name) <= 200 else model_name[:200] + "..."
    if model_name in repository.models:
        which = f"model '{shown}' is served already"
    else:
        which = f"model '{shown}' is not among them (GET /v2/repository/index lists them)"
    return BadRequest(f"{FIXED_SET.format(action=action)}; {which}")
