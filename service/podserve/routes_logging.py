"""Triton's logging extension: read and change the pod's log settings (log_control.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from podserve import log_control
from podserve.http_body import read_body
from podserve.json_response import json_response
from podserve.protocol_v2 import loads_json
from podserve.runtime import runtime_of

router = APIRouter(tags=["logging"])


@router.get("/v2/logging", summary="Log settings (Triton's logging extension)")
async def log_settings() -> Response:
    return json_response(log_control.current().as_triton())


@router.post("/v2/logging", summary="Change the pod's log settings")
async def change_log_settings(request: Request) -> Response:
    settings = runtime_of(request).settings
    body = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    return json_response(log_control.change(loads_json(body)).as_triton())
