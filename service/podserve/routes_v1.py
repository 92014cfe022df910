"""KServe V1 endpoints."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from podserve.db.features import EntityLookup, entity_lookup
from podserve.db.hooks import fetch_features
from podserve.errors import MethodNotAllowed, NotFound
from podserve.http_body import check_content_type, parse_body, read_body
from podserve.inference_flow import (
    RequestContext,
    predict,
    runtime_of,
    start_deadline,
    timing_header,
)
from podserve.json_response import JSON_TYPE, OPTIONS, PreparedResponse, json_response
from podserve.onnx_model import OnnxModel
from podserve.openapi_schemas import ERROR_RESPONSES, V1_PREDICT_REQUEST, json_body
from podserve.processors import Tensors
from podserve.protocol_v1 import (
    encode_outputs,
    encode_predictions,
    is_columnar,
    parse_columns,
    parse_rows,
)
from podserve.protocol_v2 import loads_json
from podserve.response_compression import ANSWER_HEADERS, accepted_coding, compress_answer

router = APIRouter(tags=["v1"], responses=ERROR_RESPONSES)


def _parse_predict(body: bytes, model: OnnxModel) -> tuple[EntityLookup | None, Tensors, bool]:
    """A V1 body: entity ids to look up, or tensors as rows (`instances`) or columns
    (`inputs`); and whether it was columns, which the answer's form follows."""
    doc = loads_json(body)
    is_object = isinstance(doc, dict)
    columnar = is_columnar(doc)
    lookup = entity_lookup(doc, has_inputs=columnar or (is_object and "instances" in doc))
    if lookup:
        return lookup, {}, False
    rows = model.max_rows_per_request
    if columnar:
        return None, parse_columns(doc, model.inputs, rows, model.name), True
    return None, parse_rows(doc, model.inputs, rows), False


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
        lookup, inputs, columnar = await parse_body(_parse_predict, body, model)
        start_deadline(request, ctx)  # before the features phase, which must keep to it
    if lookup is not None:  # `features` phase: entity ids -> tensor from PostgreSQL
        inputs = await fetch_features(request, ctx, model, lookup)
    outcome = await predict(request, ctx, model, inputs, None)
    with ctx.timings.measure("postprocess"):
        order = [s.name for s in model.outputs]
        answer = (
            encode_outputs(outcome.outputs, order)
            if columnar
            else encode_predictions(outcome.outputs, order, ctx.rows)
        )
        content = orjson.dumps(answer, option=OPTIONS)
        coding = accepted_coding(request.scope, settings, len(content))
        if coding is not None:
            content, coding = await compress_answer(content, coding)
    raw_headers = [timing_header(ctx), JSON_TYPE]
    if settings.response_compression:
        raw_headers += ANSWER_HEADERS[coding]
    return PreparedResponse(content, raw_headers)


# After predict: a PUT to /v1/models/m:predict matches both paths, and Starlette's 405
# names the methods of the first route that does (GET, from this one, said the Allow).
@router.get("/v1/models/{model_name}", summary="Model status")
async def model_status(request: Request, model_name: str) -> Response:
    try:
        model = runtime_of(request).model(model_name)
    except NotFound:
        # `GET /v1/models/m:predict` matches this route with the name "m:predict": say
        # what is wrong (the method), not that no model has that name.
        if model_name.endswith(":predict"):
            raise MethodNotAllowed("predict takes POST, with a JSON body", "POST") from None
        raise
    return json_response({"name": model.name, "version": model.version, "ready": True})
