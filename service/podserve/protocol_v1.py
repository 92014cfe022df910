"""KServe V1 (TensorFlow-Serving style): {"instances": [...]} -> {"predictions": [...]}."""

from __future__ import annotations

from typing import Any

import numpy as np

from podserve.errors import BadRequest, check_rows
from podserve.model_config import TensorSpec
from podserve.processors import Tensors
from podserve.protocol_v2 import loads_json, numeric_array


def parse_predict_request(body: bytes, inputs: list[TensorSpec]) -> Tensors:
    return parse_predict_doc(loads_json(body), inputs)


def parse_predict_doc(doc: Any, inputs: list[TensorSpec], max_rows: int | None = None) -> Tensors:
    """`max_rows`: the model's limit per request, checked before the instances become arrays."""
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise BadRequest("request body must be a JSON object with an 'instances' list")
    instances = doc["instances"]
    if not instances:
        raise BadRequest("'instances' is empty")
    if max_rows is not None:
        check_rows(len(instances), max_rows)
    if len(inputs) == 1 and not isinstance(instances[0], dict):  # rows of the one input
        return {inputs[0].name: _column(inputs[0], instances)}
    # Named instances ({"input name": value, ...} per row), as TF Serving's row format allows
    # for any model and requires for one with several inputs.
    if not all(isinstance(row, dict) for row in instances):
        names = [spec.name for spec in inputs]
        if len(inputs) == 1:
            raise BadRequest(f"instances must be all values or all objects naming {names}")
        raise BadRequest(f"model has several inputs {names}: each instance must be an object")
    names = {spec.name for spec in inputs}
    for index, row in enumerate(instances):
        if unknown := row.keys() - names:  # as V2 refuses an unknown input: a typo, surely
            raise BadRequest(
                f"instance {index} names unknown inputs {sorted(unknown)}; "
                f"the model's are {sorted(names)}"
            )
    return {spec.name: _column(spec, [row.get(spec.name) for row in instances]) for spec in inputs}


def _column(spec: TensorSpec, values: list[Any]) -> np.ndarray:
    if any(v is None for v in values):
        raise BadRequest(f"input '{spec.name}' is missing from some instances")
    if spec.datatype == "BYTES":
        return _strings(spec, values)
    try:
        shaped = np.asarray(values)
    except ValueError:
        raise BadRequest(f"input '{spec.name}': instances are ragged") from None
    return numeric_array(spec.name, spec.datatype, values).reshape(shaped.shape)


def _strings(spec: TensorSpec, values: list[Any]) -> np.ndarray:
    """BYTES instances: a string each, or (nested) lists of strings for a [batch, n] input."""
    if any(isinstance(v, list) for v in values):
        try:
            array = np.array(values, dtype=object)  # the instances' own shape; ragged: 1-d
        except ValueError:  # a mix numpy cannot place at all
            array = np.empty(0, dtype=object)
        if not 2 <= array.ndim <= len(spec.shape):
            raise BadRequest(f"input '{spec.name}': instances are ragged or nested too deep")
    else:
        array = np.empty(len(values), dtype=object)
        array[:] = values
    if not all(isinstance(v, str) for v in array.flat):
        raise BadRequest(f"input '{spec.name}' takes strings")
    if array.ndim == 1:  # one string per instance: each fills the model's trailing dims of 1
        return array.reshape([len(values)] + [1] * (len(spec.shape) - 1))
    return array


def encode_predictions(outputs: Tensors, order: list[str], rows: int) -> dict[str, Any]:
    """`rows`: the instances'. Several outputs make an object per instance, so each must
    have a row per instance (as TF Serving's row format requires)."""
    if len(order) == 1:
        array = outputs[order[0]]
        # orjson encodes a numeric array itself (OPT_SERIALIZE_NUMPY), but no object array
        # and no 0-d one.
        return {"predictions": array if array.dtype.kind != "O" and array.ndim else _lists(array)}
    for name in order:
        shape = list(outputs[name].shape)
        if not shape or shape[0] != rows:
            raise BadRequest(
                f"output '{name}' has shape {shape}, not a row for each of the {rows} "
                "instances, which V1's answer (an object per instance) needs: use V2 infer"
            )
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
