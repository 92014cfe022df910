"""KServe V1 (TensorFlow-Serving style): rows, {"instances": [...]} -> {"predictions": [...]},
or columns, {"inputs": ...} -> {"outputs": ...}."""

from __future__ import annotations

from typing import Any

import numpy as np

from podserve.errors import BadRequest, check_rows
from podserve.model_config import TensorSpec
from podserve.processors import Tensors
from podserve.protocol_v2 import numeric_array


def parse_predict_doc(doc: Any, inputs: list[TensorSpec], max_rows: int | None = None) -> Tensors:
    """Either format. `max_rows`: the model's limit per request, checked before the values
    become arrays."""
    if is_columnar(doc):
        return parse_columns(doc, inputs, max_rows)
    return parse_rows(doc, inputs, max_rows)


def is_columnar(doc: Any) -> bool:
    """TF Serving's column format: `inputs` (with `instances` too, a 400 in parse_columns)."""
    return isinstance(doc, dict) and "inputs" in doc


def parse_rows(doc: Any, inputs: list[TensorSpec], max_rows: int | None = None) -> Tensors:
    """The row format, {"instances": [...]}, of a doc that is_columnar said is not columns."""
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise BadRequest(
            "request body must be a JSON object with an 'instances' list (rows) or 'inputs' "
            "(columns)"
        )
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


def parse_columns(
    doc: dict[str, Any], inputs: list[TensorSpec], max_rows: int | None, model: str = "<model>"
) -> Tensors:
    """The column format: {"inputs": value} for a model with one input, or {"inputs":
    {"name": value, ...}}; each value is that input's whole tensor, batch dimension first
    (a scalar for a 0-d input). TF Serving lets the inputs' batch sizes differ; podserve
    counts, limits and batches a request's rows on dim 0 of every input (OnnxModel.validate,
    as for V2), so they must agree: a scalar counts as 1 row, as there. `model`: the name
    the messages give."""
    if is_v2_inputs(doc["inputs"]):
        raise BadRequest(
            "this looks like a V2 (Open Inference Protocol) request, 'inputs' as a list of "
            f"named tensors: POST it to /v2/models/{model}/infer, or send V1's "
            '{"instances": [...]} (rows) or {"inputs": <tensor>} (columns) here'
        )
    if "instances" in doc:
        raise BadRequest(
            "send either 'instances' (row format) or 'inputs' (column format), not both"
        )
    columns = _named_columns(doc["inputs"], inputs)
    rows = {name: len(value) if isinstance(value, list) else 1 for name, value in columns.items()}
    if max_rows is not None:  # before any array is built
        check_rows(max(rows.values(), default=0), max_rows)
    if len(set(rows.values())) > 1:
        raise BadRequest(
            f"inputs have different batch sizes (dim 0) {rows}: podserve runs a request's "
            "rows along dim 0 of every input, so each must have the same number of rows"
        )
    return {spec.name: _tensor(spec, columns[spec.name]) for spec in inputs}


def is_v2_inputs(value: Any) -> bool:
    """V2's tensor list, [{"name": ..., "shape": ..., "datatype": ..., "data": ...}, ...]: no
    V1 column value (a tensor holds no objects, and several inputs make an object)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, dict) and "name" in item for item in value)
        and any(key in value[0] for key in ("shape", "datatype", "data"))
    )


def _named_columns(value: Any, inputs: list[TensorSpec]) -> dict[str, Any]:
    """Each input's value: an object names them; anything else is the one input's tensor."""
    names = sorted(spec.name for spec in inputs)
    if not isinstance(value, dict):  # a tensor is never a JSON object: no ambiguity
        if len(inputs) != 1:
            raise BadRequest(f"model has several inputs {names}: 'inputs' must be an object")
        return {inputs[0].name: value}
    if unknown := value.keys() - set(names):  # as V2 and the row format refuse: a typo
        raise BadRequest(
            f"'inputs' names unknown inputs {sorted(unknown)}; the model's are {names}"
        )
    if missing := [name for name in names if value.get(name) is None]:
        raise BadRequest(f"'inputs' lacks input(s) {missing}; the model's are {names}")
    return value


def _tensor(spec: TensorSpec, value: Any) -> np.ndarray:
    """One input's whole tensor from its column value, through the row format's checks."""
    if value is None:
        raise BadRequest("'inputs' is null: it must be a tensor or an object naming inputs")
    if not isinstance(value, list):  # a scalar: a 0-d tensor (validate checks the model's rank)
        return _column(spec, [value], "rows").reshape(())
    if not value:  # also keeps the message the row format's empty 'instances' gets
        raise BadRequest(
            f"input '{spec.name}' is empty: it needs at least one row, as 'instances' does"
        )
    return _column(spec, value, "rows")


def _column(spec: TensorSpec, values: list[Any], rows: str = "instances") -> np.ndarray:
    """`values`: the input's rows; `rows`: what the request calls them, for the messages."""
    if any(v is None for v in values):
        raise BadRequest(f"input '{spec.name}' is missing from some {rows}")
    if spec.datatype == "BYTES":
        return _strings(spec, values, rows)
    try:
        shaped = np.asarray(values)
    except ValueError:
        raise BadRequest(f"input '{spec.name}': {rows} are ragged") from None
    return numeric_array(spec.name, spec.datatype, values).reshape(shaped.shape)


def _strings(spec: TensorSpec, values: list[Any], rows: str) -> np.ndarray:
    """BYTES instances: a string each, or (nested) lists of strings for a [batch, n] input."""
    if any(isinstance(v, list) for v in values):
        try:
            array = np.array(values, dtype=object)  # the instances' own shape; ragged: 1-d
        except ValueError:  # a mix numpy cannot place at all
            array = np.empty(0, dtype=object)
        if not 2 <= array.ndim <= len(spec.shape):
            raise BadRequest(f"input '{spec.name}': {rows} are ragged or nested too deep")
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
        return {"predictions": _json_tensor(outputs[order[0]])}
    for name in order:
        shape = list(outputs[name].shape)
        if not shape or shape[0] != rows:
            raise BadRequest(
                f"output '{name}' has shape {shape}, not a row for each of the {rows} "
                "instances, which V1's answer (an object per instance) needs: use V2 infer"
            )
    columns = {name: _lists(outputs[name]) for name in order}
    return {"predictions": [{name: columns[name][i] for name in order} for i in range(rows)]}


def encode_outputs(outputs: Tensors, order: list[str]) -> dict[str, Any]:
    """TF Serving's column answer: each output whole, so none needs a row per instance;
    a single output is the tensor itself, several an object naming them."""
    if len(order) == 1:
        return {"outputs": _json_tensor(outputs[order[0]])}
    return {"outputs": {name: _json_tensor(outputs[name]) for name in order}}


def _json_tensor(array: np.ndarray) -> Any:
    """orjson encodes a numeric array itself (OPT_SERIALIZE_NUMPY), but no object array and
    no 0-d one."""
    return array if array.dtype.kind != "O" and array.ndim else _lists(array)


def _lists(array: np.ndarray) -> Any:
    """A row per item (or the value of a 0-d array) that orjson can encode: FP32 (and FP16,
    widened as V2 does) as float32 rows and scalars, which orjson writes as V2 and the column
    answer do, each float32's shortest form (0.76690227, where tolist()'s float64 printed
    0.7669022679328918); tolist() for other numbers (orjson cannot encode every numpy scalar
    type, e.g. longlong from ORT); str for BYTES elements, bytes read as UTF-8 as in the V2
    JSON answer."""
    if array.dtype.kind == "f" and array.dtype.itemsize <= 4:
        if not array.ndim:  # (ascontiguousarray would make it 1-d)
            return np.float32(array[()])
        return list(np.ascontiguousarray(array, dtype=np.float32))  # orjson: C-contiguous only
    if array.dtype.kind != "O":
        return array.tolist()
    texts = np.empty(array.shape, dtype=object)
    texts.flat = [
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.flat
    ]
    return texts.tolist()
