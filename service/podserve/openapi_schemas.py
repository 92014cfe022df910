"""JSON schemas of request bodies, for the OpenAPI document (bodies are parsed by hand)."""

from __future__ import annotations

from typing import Any

from podserve.datatypes import V2_TO_NUMPY

_TENSOR_DATA: dict[str, Any] = {
    "description": "Row-major tensor contents (flat or nested lists)",
    "type": "array",
    "items": {},
}

_ENTITY_IDS: dict[str, Any] = {
    "description": "Instead of tensors: look the feature vectors up in PostgreSQL",
    "type": "array",
    "minItems": 1,
    "items": {"type": ["string", "integer"]},
}

V2_INFER_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": "Send `inputs`, or `parameters.entity_ids` (and `feature_set`) instead",
    "properties": {
        "id": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {
                "entity_ids": _ENTITY_IDS,
                "feature_set": {"type": "string"},
                "timeout": {
                    "description": "Deadline in microseconds (Triton's); 0 = none of its own",
                    "type": "integer",
                    "minimum": 0,
                },
            },
        },
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype", "data"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string", "enum": sorted(V2_TO_NUMPY)},
                    "parameters": {"type": "object"},
                    "data": _TENSOR_DATA,
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
            },
        },
    },
}

V1_PREDICT_REQUEST: dict[str, Any] = {
    "type": "object",
    "description": (
        "Send `instances` (rows: answered with `predictions`), `inputs` (columns: a tensor, "
        "or an object naming each input's tensor; answered with `outputs`), or `entity_ids` "
        "(and `feature_set`) instead"
    ),
    "properties": {
        "instances": {"type": "array", "minItems": 1, "items": {}},
        "inputs": {"type": ["array", "object"]},
        "signature_name": {"type": "string"},
        "entity_ids": _ENTITY_IDS,
        "feature_set": {"type": "string"},
    },
}


def json_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` fragment declaring a required JSON request body."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {
        "description": text,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                }
            }
        },
    }
    for status, text in {
        400: "Invalid request",
        404: "Unknown model or version",
        413: "Body or batch too large",
        415: "Unsupported content type",
        501: "Not set up on this pod (entity ids or jobs without a database, jobs off)",
        503: "Overloaded or not ready (see Retry-After)",
        504: "Deadline exceeded",
    }.items()
}
