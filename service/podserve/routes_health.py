"""Server metadata and health (Open Inference Protocol), and Triton's shared-memory routes,
which answer that podserve has no shared memory (a clear 400, not routing's 404)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request, Response

from podserve import __version__
from podserve.errors import BadRequest
from podserve.inference_flow import runtime_of
from podserve.json_response import json_response
from podserve.openapi_schemas import ERROR_RESPONSES
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


# Triton's system and CUDA shared-memory extensions (tritonclient's register_*, unregister_*,
# get_*_shared_memory_status): tensors travel in the request and answer bodies only.
SHARED_MEMORY_ROUTES = (
    ("GET", "status"),
    ("GET", "region/{region}/status"),
    ("POST", "region/{region}/register"),
    ("POST", "unregister"),
    ("POST", "region/{region}/unregister"),
)


def _no_shared_memory(kind: str) -> Callable[[], Awaitable[Response]]:
    async def no_shared_memory() -> Response:
        raise BadRequest(
            f"podserve does not support {kind} shared memory (Triton's {kind} shared-memory "
            "extension, not announced in GET /v2): send tensors in the request body, as binary "
            "data (tritonclient's default) or JSON"
        )

    return no_shared_memory


def _add_shared_memory_routes() -> None:
    for kind, prefix in (("system", "systemsharedmemory"), ("CUDA", "cudasharedmemory")):
        for method, path in SHARED_MEMORY_ROUTES:
            router.add_api_route(
                f"/v2/{prefix}/{path}",
                _no_shared_memory(kind),
                methods=[method],
                summary=f"{kind} shared memory (not supported: 400)",
                tags=["shared memory"],
                responses={400: ERROR_RESPONSES[400]},
            )


_add_shared_memory_routes()
