"""Durable background inference: POST a V2 infer body, get 202 + Location, poll the job."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from podserve.db.features import checked_lookup, entity_lookup
from podserve.db.hooks import services_of
from podserve.db.jobs import JobStore
from podserve.db.pool import NOT_CONFIGURED
from podserve.errors import NotConfigured, NotFound
from podserve.http_body import binary_header_length, check_content_type, parse_body, read_body
from podserve.inference_flow import runtime_of
from podserve.json_response import json_response
from podserve.openapi_schemas import ERROR_RESPONSES, V2_INFER_REQUEST, json_body
from podserve.protocol_v2 import check_requested_outputs, parse_infer_request

router = APIRouter(tags=["jobs"], responses=ERROR_RESPONSES)


def _store(request: Request) -> JobStore:
    store = services_of(request).jobs
    if store is None:
        reason = NOT_CONFIGURED if not services_of(request).configured else "PODSERVE_JOBS_ENABLED"
        raise NotConfigured(f"background jobs unavailable: {reason}")
    return store


async def _submit(request: Request, model_name: str, model_version: str | None) -> Response:
    runtime = runtime_of(request)
    settings = runtime.settings
    store = _store(request)
    model = runtime.model(model_name, model_version)  # an unknown model is a 404, whatever the body
    check_content_type(request)
    body = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
    json_length = binary_header_length(request)
    # Validate now: a malformed job is the client's 400, not a job that fails later.
    parsed = await parse_body(parse_infer_request, body, json_length, model.max_rows_per_request)
    check_requested_outputs(parsed, model.output_specs)
    lookup = entity_lookup(parsed.parameters, has_inputs=bool(parsed.inputs))
    if lookup is not None:
        checked_lookup(model, lookup)
    else:
        model.validate(parsed.inputs, parsed.datatypes)
    job_id = await store.submit(model.name, model.version, body, json_length)
    runner = services_of(request).job_runner
    if runner is not None:
        runner.wake.set()  # this worker may run it at once
    location = f"/v2/jobs/{job_id}"
    return json_response(
        {
            "id": str(job_id),
            "status": "queued",
            "model_name": model.name,
            "model_version": model.version,
        },
        status_code=202,
        headers={"Location": location},
    )


@router.post(
    "/v2/models/{model_name}/jobs",
    summary="Submit a background inference job (default version)",
    status_code=202,
    openapi_extra=json_body(V2_INFER_REQUEST),
)
async def submit_job(request: Request, model_name: str) -> Response:
    return await _submit(request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/jobs",
    summary="Submit a background inference job",
    status_code=202,
    openapi_extra=json_body(V2_INFER_REQUEST),
)
async def submit_job_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _submit(request, model_name, model_version)


@router.get("/v2/jobs/{job_id}", summary="Job status, and the result when done")
async def get_job(request: Request, job_id: str) -> Response:
    if not services_of(request).configured:  # permanent: no job can exist here
        raise NotFound(f"no job '{job_id}': background jobs are off ({NOT_CONFIGURED})")
    store = _store(request)
    try:
        key = uuid.UUID(job_id)
    except ValueError:
        raise NotFound(f"no job '{job_id}'") from None
    row = await store.get(key)
    if row is None:
        raise NotFound(f"no job '{job_id}' (unknown, or its result expired)")
    doc: dict[str, Any] = {
        "id": str(row["id"]),
        "model_name": row["model"],
        "model_version": row["model_version"],
        "status": row["status"],
        "attempts": row["attempts"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "expires_at": row["expires_at"],
    }
    if row["result"] is not None:
        doc["result"] = orjson.Fragment(row["result"])  # stored as the encoded V2 response
    if row["error"] is not None:
        doc["error"] = row["error"]
    return json_response(doc)
