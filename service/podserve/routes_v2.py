"""Open Inference Protocol (KServe V2) model endpoints."""

from __future__ import annotations

import asyncio
from functools import partial

from fastapi import APIRouter, Request, Response

from podserve.db.features import entity_lookup
from podserve.db.hooks import fetch_features
from podserve.errors import BadRequest
from podserve.http_body import binary_header_length, check_content_type, parse_body, read_body
from podserve.inference_flow import (
    RequestContext,
    predict,
    runtime_of,
    start_deadline,
    timing_header,
)
from podserve.json_response import BINARY_TYPE, JSON_TYPE, PreparedResponse, json_response
from podserve.onnx_model import OnnxModel
from podserve.openapi_schemas import ERROR_RESPONSES, V2_INFER_REQUEST, json_body
from podserve.protocol_v2 import (
    check_requested_outputs,
    classification_is_large,
    encode_infer_response,
    parse_infer_request,
)
from podserve.response_compression import ANSWER_HEADERS, accepted_coding, compress_answer
from podserve.triton_model_config import PLATFORM, triton_config

router = APIRouter(tags=["v2"], responses=ERROR_RESPONSES)


def _metadata(request: Request, model: OnnxModel) -> dict:
    served = runtime_of(request).repository.models[model.name]  # type: ignore[union-attr]
    return {
        "name": model.name,
        "versions": sorted(served.versions, key=int),
        "platform": PLATFORM,
        "inputs": [spec.model_dump() for spec in model.inputs],
        "outputs": [spec.model_dump() for spec in model.outputs],
        "parameters": {
            "max_batch_size": model.max_batch_size,
            "batching": model.batching,
            "version": model.version,
        },
    }


@router.get("/v2/models/{model_name}", summary="Model metadata (default version)")
async def model_metadata(request: Request, model_name: str) -> Response:
    return json_response(_metadata(request, runtime_of(request).model(model_name)))


@router.get("/v2/models/{model_name}/versions/{model_version}", summary="Model metadata")
async def model_version_metadata(request: Request, model_name: str, model_version: str) -> Response:
    return json_response(_metadata(request, runtime_of(request).model(model_name, model_version)))


@router.get("/v2/models/{model_name}/config", summary="Model configuration (Triton)")
async def model_config(request: Request, model_name: str) -> Response:
    return _triton_config(request, model_name, None)


@router.get(
    "/v2/models/{model_name}/versions/{model_version}/config",
    summary="Model configuration of a version (Triton)",
)
async def model_version_config(request: Request, model_name: str, model_version: str) -> Response:
    return _triton_config(request, model_name, model_version)


def _triton_config(request: Request, model_name: str, model_version: str | None) -> Response:
    runtime = runtime_of(request)
    model = runtime.model(model_name, model_version)
    return json_response(triton_config(model, runtime.settings.max_queue_rows))


@router.get("/v2/models/{model_name}/ready", summary="Model readiness")
async def model_ready(request: Request, model_name: str) -> Response:
    runtime_of(request).model(model_name)
    return json_response({"name": model_name, "ready": True})


@router.get("/v2/models/{model_name}/versions/{model_version}/ready", summary="Model readiness")
async def model_version_ready(request: Request, model_name: str, model_version: str) -> Response:
    runtime_of(request).model(model_name, model_version)
    return json_response({"name": model_name, "version": model_version, "ready": True})


async def _infer(request: Request, model_name: str, model_version: str | None) -> Response:
    ctx = RequestContext.begin(request.scope)
    runtime = runtime_of(request)
    settings = runtime.settings
    with ctx.timings.measure("parse"):
        model = runtime.model(model_name, model_version)  # first: an unknown model is a 404
        check_content_type(request)
        body = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
        parsed = await parse_body(
            parse_infer_request,
            body,
            binary_header_length(request),
            model.max_rows_per_request,
            model.name,
        )
        check_requested_outputs(parsed, model.output_specs)
        lookup = entity_lookup(parsed.parameters, has_inputs=bool(parsed.inputs))
        start_deadline(request, ctx, parsed.timeout_ms)  # before the features phase
    if lookup is not None:  # `features` phase: entity ids -> tensor from PostgreSQL
        parsed.inputs = await fetch_features(request, ctx, model, lookup)
    outcome = await predict(request, ctx, model, parsed.inputs, parsed.datatypes)
    with ctx.timings.measure("postprocess"):
        encode = partial(
            encode_infer_response, model.name, model.version, parsed, outcome.outputs,
            [s.name for s in model.outputs], labels=model.labels,
        )  # fmt: skip
        if classification_is_large(parsed, outcome.outputs):
            content, headers = await asyncio.to_thread(encode)
        else:
            content, headers = encode()
        coding = accepted_coding(request.scope, settings, len(content))
        if coding is not None:  # the whole body; the header length stays the JSON's own
            content, coding = await compress_answer(content, coding)
    raw_headers = [timing_header(ctx), JSON_TYPE]
    if headers:  # the binary extension's header length: the body is JSON, then raw tensors
        raw_headers[1] = BINARY_TYPE
        raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if settings.response_compression:
        raw_headers += ANSWER_HEADERS[coding]
    return PreparedResponse(content, raw_headers)


@router.post(
    "/v2/models/{model_name}/infer",
    summary="Inference (default version)",
    openapi_extra=json_body(V2_INFER_REQUEST),
)
async def infer(request: Request, model_name: str) -> Response:
    return await _infer(request, model_name, None)


@router.post(
    "/v2/models/{model_name}/versions/{model_version}/infer",
    summary="Inference",
    openapi_extra=json_body(V2_INFER_REQUEST),
)
async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
    return await _infer(request, model_name, model_version)


# Triton's generate extension (a JSON object of named values mapped onto input tensors, one
# answer or a stream of server-sent events from a decoupled model): routing's bare 404 read
# as a wrong URL or version. A model that is not served is still a 404, as in Triton, which
# looks the model up first.
GENERATE_KINDS = ("generate", "generate_stream")


async def generate(request: Request, model_name: str) -> Response:
    raise _no_generate(request, model_name, None)


async def generate_version(request: Request, model_name: str, model_version: str) -> Response:
    raise _no_generate(request, model_name, model_version)


def _no_generate(request: Request, model_name: str, model_version: str | None) -> BadRequest:
    model = runtime_of(request).model(model_name, model_version)
    version = f"/versions/{model.version}" if model_version else ""
    return BadRequest(
        "podserve does not support Triton's generate extension (generate, generate_stream): "
        f"POST the input tensors to /v2/models/{model.name}{version}/infer"
    )


for _kind in GENERATE_KINDS:
    router.add_api_route(
        f"/v2/models/{{model_name}}/{_kind}", generate, methods=["POST"],
        summary=f"Triton's {_kind} (not supported: 400)",
    )  # fmt: skip
    router.add_api_route(
        f"/v2/models/{{model_name}}/versions/{{model_version}}/{_kind}", generate_version,
        methods=["POST"], summary=f"Triton's {_kind} of a version (not supported: 400)",
    )  # fmt: skip
