"""KServe V1 (TensorFlow-Serving style): {"instances": [...]} -> {"predictions": [...]}."""

from __future__ import annotations

from typing import Any

import numpy as np

from podserve.errors import BadRequest
from podserve.model_config import TensorSpec
from podserve.processors import Tensors
from podserve.protocol_v2 import loads_json, numeric_array


def parse_predict_request(body: bytes, inputs: list[TensorSpec]) -> Tensors:
    return parse_predict_doc(loads_json(body), inputs)


def parse_predict_doc(doc: Any, inputs: list[TensorSpec]) -> Tensors:
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise BadRequest("request body must be a JSON object with an 'instances' list")
    instances = doc["instances"]
    if not instances:
        raise BadRequest("'instances' is empty")
    if len(inputs) == 1 and not isinstance(instances[0], dict):  # rows of the one input
        return {inputs[0].name: _column(inputs[0], instances)}
    # Named instances ({"input name": value, ...} per row), as TF Serving's row format allows
    # for any model and requires for one with several inputs.
    if not all(isinstance(row, dict) for row in instances):
        names = [spec.name for spec in inputs]
        if len(inputs) == 1:
            raise BadRequest(f"instances must be all values or all objects naming {names}")
        raise BadRequest(f"model has several inputs {names}: each instance must be an object")
    return {spec.name: _column(spec, [row.get(spec.name) for row in instances]) for spec in inputs}


def _column(spec: TensorSpec, values: list[Any]) -> np.ndarray:
    if any(v is None for v in values):
        raise BadRequest(f"input '{spec.name}' is missing from some instances")
    if spec.datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise BadRequest(f"input '{spec.name}' takes strings")
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape([len(values)] + [1] * (len(spec.shape) - 1))
    try:
        shaped = np.asarray(values)
    except ValueError:
        raise BadRequest(f"input '{spec.name}': instances are ragged") from None
    return numeric_array(spec.name, spec.datatype, values).reshape(shaped.shape)


def encode_predictions(outputs: Tensors, order: list[str]) -> dict[str, Any]:
    if len(order) == 1:
        array = outputs[order[0]]
        # orjson encodes a numeric array itself (OPT_SERIALIZE_NUMPY), but no object array.
        return {"predictions": array if array.dtype.kind != "O" else _lists(array)}
    rows = len(outputs[order[0]])
    columns = {name: _lists(outputs[name]) for name in order}
    return {"predictions": [{name: columns[name][i] for name in order} for i in range(rows)]}


def _lists(array: np.ndarray) -> Any:
    """Nested lists orjson can encode: tolist() for numbers (orjson cannot encode every numpy
    scalar type, e.g. longlong from ORT); str for BYTES elements, bytes read as UTF-8 as in
    the V2 JSON answer."""
    if array.dtype.kind != "O":
        return array.tolist()
    texts = np.empty(array.shape, dtype=object)
    texts.flat = [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.flat
    ]
    return texts.tolist()
