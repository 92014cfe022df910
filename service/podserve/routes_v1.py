"""KServe V1 endpoints."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from podserve.db.features import entity_lookup
from podserve.db.hooks import fetch_features
from podserve.http_body import check_content_type, read_body
from podserve.inference_flow import RequestContext, predict, runtime_of, timing_header
from podserve.json_response import JSON_TYPE, OPTIONS, PreparedResponse, json_response
from podserve.openapi_schemas import ERROR_RESPONSES, V1_PREDICT_REQUEST, json_body
from podserve.protocol_v1 import encode_predictions, parse_predict_doc
from podserve.protocol_v2 import loads_json

router = APIRouter(tags=["v1"], responses=ERROR_RESPONSES)


@router.get("/v1/models/{model_name}", summary="Model status")
async def model_status(request: Request, model_name: str) -> Response:
    model = runtime_of(request).model(model_name)
    return json_response({"name": model.name, "version": model.version, "ready": True})


@router.post(
    "/v1/models/{model_name}:predict",
    summary="Prediction",
    openapi_extra=json_body(V1_PREDICT_REQUEST),
)
async def model_predict(request: Request, model_name: str) -> Response:
    ctx = RequestContext.begin(request.scope)
    runtime = runtime_of(request)
    settings = runtime.settings
    with ctx.timings.measure("parse"):
        model = runtime.model(model_name)  # first: an unknown model is a 404, whatever the body
        check_content_type(request)
        body = await read_body(request, settings.max_body_bytes, settings.body_read_timeout_s)
        doc = loads_json(body)
        lookup = entity_lookup(doc, has_inputs=isinstance(doc, dict) and "instances" in doc)
        inputs = {} if lookup else parse_predict_doc(doc, model.inputs)
    if lookup is not None:  # `features` phase: entity ids -> tensor from PostgreSQL
        inputs = await fetch_features(request, ctx, model, lookup)
    outcome = await predict(request, ctx, model, inputs, None)
    with ctx.timings.measure("postprocess"):
        content = orjson.dumps(
            encode_predictions(outcome.outputs, [s.name for s in model.outputs]), option=OPTIONS
        )
    return PreparedResponse(content, [timing_header(ctx), JSON_TYPE])
