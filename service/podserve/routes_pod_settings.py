"""Triton's logging and trace extensions: the pod's log and trace settings and each model's
trace settings, read and changed at run time (log_control.py, trace_control.py,
model_trace_settings.py; pod_settings.py shares them across workers)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from podserve import log_control, model_trace_settings, trace_control
from podserve.errors import Forbidden
from podserve.http_body import check_content_type, read_body
from podserve.json_response import json_response
from podserve.protocol_v2 import loads_json
from podserve.runtime import runtime_of

router = APIRouter(tags=["pod settings"])


async def _change_request(request: Request) -> Any:
    """The JSON body of a change, if changes are allowed in this pod."""
    settings = runtime_of(request).settings
    if not settings.allow_settings_changes:
        raise Forbidden(
            "changing the pod's log and trace settings is turned off "
            "(PODSERVE_ALLOW_SETTINGS_CHANGES=false)"
        )
    # JSON only: a browser sends text/plain or a form cross-site without asking first, so
    # with auth off any web page could have changed the pod's logging.
    check_content_type(request)
    return loads_json(
        await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    )


@router.get("/v2/logging", summary="Log settings (Triton's logging extension)")
async def log_settings() -> Response:
    return json_response(log_control.current().as_triton())


@router.post("/v2/logging", summary="Change the pod's log settings")
async def change_log_settings(request: Request) -> Response:
    return json_response(log_control.change(await _change_request(request)).as_triton())


@router.get("/v2/trace/setting", summary="Trace settings (Triton's trace extension)")
async def trace_settings() -> Response:
    return json_response(trace_control.current().as_triton())


@router.post("/v2/trace/setting", summary="Change the pod's trace settings")
async def change_trace_settings(request: Request) -> Response:
    return json_response(trace_control.change(await _change_request(request)).as_triton())


@router.get("/v2/models/{model_name}/trace/setting", summary="Trace settings for a model")
async def model_trace_settings_of(request: Request, model_name: str) -> Response:
    runtime_of(request).model(model_name)  # an unknown model is a 404
    return json_response(model_trace_settings.as_triton(model_name))


@router.post("/v2/models/{model_name}/trace/setting", summary="Change a model's trace settings")
async def change_model_trace_settings(request: Request, model_name: str) -> Response:
    runtime_of(request).model(model_name)
    body = await _change_request(request)
    return json_response(model_trace_settings.change(model_name, body))
