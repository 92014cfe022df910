"""Open Inference Protocol (KServe V2) REST: request parsing and response encoding.

Supports JSON tensors and the binary tensor data extension that `tritonclient[http]` uses
by default (a JSON header of `Inference-Header-Content-Length` bytes, then raw tensors).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

from podserve.classification import check_classifiable, class_count, top_classes
from podserve.datatypes import INT_TYPES, V2_TO_NUMPY, numpy_to_v2
from podserve.errors import BadRequest, check_rows
from podserve.model_config import TensorSpec
from podserve.processors import Tensors

MAX_DIMS = 32
# The request 'id' (echoed in the answer), in UTF-8 bytes.
MAX_REQUEST_ID_BYTES = 1024


@dataclass
class RequestedOutput:
    name: str
    binary: bool
    classification: int | None = None  # top classes instead of the tensor (classification.py)


@dataclass
class InferRequest:
    id: str | None
    parameters: dict[str, Any]
    inputs: Tensors
    datatypes: dict[str, str]
    outputs: list[RequestedOutput] | None = None
    binary_output: bool = False
    timeout_ms: float | None = None  # Triton's `timeout` parameter (microseconds), in ms


def loads_json(body: bytes | memoryview) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}") from None


def parse_infer_request(
    body: bytes,
    json_length: int | None = None,
    max_rows: int | None = None,
    model: str = "<model>",
) -> InferRequest:
    """`max_rows`: the model's limit per request, checked on each input's declared shape
    before its data becomes an array (a 15 KiB deflated body of 2M rows cost ~200 MiB).
    `model`: the name the messages give."""
    if json_length == 0:
        raise BadRequest(
            "Inference-Header-Content-Length 0 (Triton's raw binary request, no JSON header) "
            "is not supported: send the inference header as JSON before the binary data"
        )
    if json_length is not None and not 0 < json_length <= len(body):
        raise BadRequest(
            f"Inference-Header-Content-Length {json_length} is outside the body ({len(body)} bytes)"
        )
    view = memoryview(body)
    doc = loads_json(view[:json_length] if json_length is not None else view)
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    binary = view[json_length:] if json_length is not None else view[:0]
    parameters = _object(doc.get("parameters"), "parameters")
    _check_scheduling_parameters(parameters)
    if doc.get("inputs") is None and "entity_ids" in parameters:
        inputs, datatypes = {}, {}  # features are fetched by entity id (podserve.db.features)
    else:
        _check_not_v1(doc, model)
        inputs, datatypes = _parse_inputs(doc.get("inputs"), binary, max_rows)
    request_id = doc.get("id")
    if request_id is not None:
        if not isinstance(request_id, str):
            raise BadRequest("'id' must be a string")
        # Echoed in the answer: unbounded, 16 KB of gzip made a 16 MB answer per request.
        if len(request_id) > MAX_REQUEST_ID_BYTES // 4 and (
            len(request_id.encode("utf-8", "surrogatepass")) > MAX_REQUEST_ID_BYTES
        ):
            raise BadRequest(
                f"'id' is longer than {MAX_REQUEST_ID_BYTES} bytes (UTF-8): it is echoed in the "
                "answer; send a short correlation id (a UUID is 36)"
            )
    return InferRequest(
        id=request_id,
        parameters=parameters,
        inputs=inputs,
        datatypes=datatypes,
        outputs=_parse_outputs(doc.get("outputs")),
        binary_output=_flag(parameters, "binary_data_output"),
        timeout_ms=_timeout_ms(parameters),
    )


_V2_TENSOR_KEYS = frozenset({"name", "shape", "datatype", "data"})


def _check_not_v1(doc: dict[str, Any], model: str) -> None:
    """A KServe V1 body sent here: rows ({"instances": [...]}) or columns ({"inputs": a
    tensor or an object naming them}) -- say so, not only that the tensors are wrong."""
    raw = doc.get("inputs")
    if raw is None and "instances" in doc:
        form = "rows, 'instances'"
    elif isinstance(raw, dict) and not _V2_TENSOR_KEYS.intersection(raw):
        form = "columns, 'inputs' as an object naming tensors"
    elif isinstance(raw, list) and raw and not isinstance(raw[0], dict):
        form = "columns, 'inputs' as a tensor"
    else:  # V2's own shape, or one V2 tensor without its list: the usual messages say
        return
    raise BadRequest(
        f"this looks like a KServe V1 request ({form}): POST it to /v1/models/{model}:predict, "
        'or send V2\'s {"inputs": [{"name": ..., "shape": [...], "datatype": ..., '
        '"data": [...]}]} here'
    )


def _flag(params: dict[str, Any], key: str) -> bool:
    """A boolean parameter: JSON true or false only (Triton: 400 for anything else, where a
    plain bool() would read the string "false" as true)."""
    value = params.get(key, False)
    if value is True or value is False:
        return value
    raise BadRequest(f"Unable to parse '{key}': it must be true or false")


def _check_scheduling_parameters(params: dict[str, Any]) -> None:
    """Triton's sequence and priority parameters (tritonclient's `infer(sequence_id=...,
    sequence_start=..., sequence_end=..., priority=...)`): their types are checked as Triton
    checks them (a 400 otherwise), and their values are ignored, as Triton ignores them for
    a model without a sequence batcher or priority levels (its dynamic batcher never reads
    the correlation ID; a priority past the model's levels becomes the default). podserve
    has no stateful models and batches by arrival: every request stands alone."""
    if "sequence_id" in params:
        value = params["sequence_id"]
        if not (isinstance(value, str) or _is_uint64(value)):
            raise BadRequest(
                "Unable to parse 'sequence_id': it must be a non-negative integer or a string, "
                f"got {_shown(value)}"
            )
    _flag(params, "sequence_start")
    _flag(params, "sequence_end")
    if "priority" in params and not _is_uint64(params["priority"]):
        raise BadRequest(
            "Unable to parse 'priority': it must be a non-negative integer, "
            f"got {_shown(params['priority'])}"
        )


def _is_uint64(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64  # `type`: a bool is no integer here


def _shown(value: Any) -> str:
    """A client's value in a message, cut short: it is echoed in the answer."""
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def _timeout_ms(params: dict[str, Any]) -> float | None:
    """Triton's per-request `timeout` (tritonclient's `infer(timeout=...)`): microseconds, an
    unsigned integer; 0 or absent leaves the deadline to the header or the default."""
    value = params.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadRequest(
            f"parameter 'timeout' must be a non-negative integer of microseconds, got {value!r}"
        )
    return value / 1000 if value else None


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'{what}' must be a JSON object")
    return value


def _parse_inputs(
    raw: Any, binary: memoryview, max_rows: int | None
) -> tuple[Tensors, dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    tensors: Tensors = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for item in raw:
        name, datatype, shape, params = _tensor_header(item)
        if name in tensors:
            raise BadRequest(f"input '{name}' appears more than once")
        if max_rows is not None and shape:
            check_rows(shape[0], max_rows)
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise BadRequest(f"input '{name}': binary data is shorter than binary_data_size")
            chunk = binary[offset : offset + size]
            offset += size
            tensors[name] = _binary_tensor(name, datatype, shape, chunk)
        elif "data" in item:
            tensors[name] = _json_tensor(name, datatype, shape, item["data"])
        else:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
        datatypes[name] = datatype
    if offset != len(binary):
        raise BadRequest(f"{len(binary) - offset} bytes of binary data belong to no input")
    return tensors, datatypes


def _tensor_header(item: Any) -> tuple[str, str, list[int], dict[str, Any]]:
    if not isinstance(item, dict):
        raise BadRequest("each input must be a JSON object")
    name = item.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest("each input needs a non-empty string 'name'")
    datatype = item.get("datatype")
    if type(datatype) is not str:  # a list or an object would not even hash for the lookup
        raise BadRequest(
            f"input '{name}': 'datatype' must be a string, one of {sorted(V2_TO_NUMPY)}"
        )
    if datatype not in V2_TO_NUMPY:
        raise BadRequest(
            f"input '{name}': unknown datatype {datatype!r}; expected one of {sorted(V2_TO_NUMPY)}"
        )
    shape = item.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and d >= 0 for d in shape)  # `type`: a bool is no dim
    ):
        raise BadRequest(
            f"input '{name}': 'shape' must be a list of at most {MAX_DIMS} non-negative integers"
        )
    params = item.get("parameters")
    if params is None:
        return name, datatype, shape, {}
    params = _object(params, f"{name}.parameters")
    _check_no_shared_memory(params, f"input '{name}'")
    return name, datatype, shape, params


def _check_no_shared_memory(params: dict[str, Any], what: str) -> None:
    """Triton's shared-memory parameters: an output's was ignored (its data came in the body,
    not in the region the client reads) and an input's read as a tensor without data."""
    if "shared_memory_region" in params:
        raise BadRequest(
            f"{what} names shared-memory region {str(params['shared_memory_region'])[:100]!r}: "
            "podserve does not support shared memory; send the tensor in the request body "
            "(binary data or JSON) and read outputs from the answer"
        )


def _flatten(data: Any, out: list[Any], depth: int = 0) -> None:
    if depth > MAX_DIMS:
        raise BadRequest(f"tensor data is nested deeper than {MAX_DIMS} levels")
    for value in data:
        if isinstance(value, list):
            _flatten(value, out, depth + 1)
        else:
            out.append(value)


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    expected = math.prod(shape)
    if expected and len(data) > expected:  # before numpy copies what cannot fit anyway
        raise BadRequest(
            f"input '{name}': shape {shape} needs {expected} elements, data has {len(data)}+"
        )
    if datatype == "BYTES":
        flat: list[Any] = []
        _flatten(data, flat)
        if not all(isinstance(v, str) for v in flat):
            raise BadRequest(f"input '{name}': BYTES data must be strings")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        array = numeric_array(name, datatype, data)
    if array.size != expected:
        raise BadRequest(
            f"input '{name}': shape {shape} needs {expected} elements, data has {array.size}"
        )
    return _reshape(name, array, shape)


def _reshape(name: str, array: np.ndarray, shape: list[int]) -> np.ndarray:
    """Zero elements with a huge dim (e.g. [2**62, 0]) pass the count check; numpy refuses."""
    try:
        return array.reshape(shape)
    except ValueError:
        raise BadRequest(f"input '{name}': shape {shape} is too large") from None


# numpy kinds that JSON values of each datatype may parse to (bool, int, unsigned, float).
_ALLOWED_KINDS = {
    datatype: "b" if datatype == "BOOL" else "iu" if datatype in INT_TYPES else "iuf"
    for datatype in V2_TO_NUMPY
}


_FOUND = {"b": "booleans", "f": "floats", "U": "strings", "O": "mixed or out-of-range values"}


def numeric_array(name: str, datatype: str, data: list[Any]) -> np.ndarray:
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError):
        raise BadRequest(f"input '{name}': data is ragged or not numeric") from None
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.reshape(-1).astype(V2_TO_NUMPY[datatype])
    if kind not in _ALLOWED_KINDS[datatype]:
        if kind in "fO" and datatype in INT_TYPES:  # maybe ints numpy found no one dtype for
            return _wide_ints(name, datatype, data, raw.ndim)
        raise _cannot_hold(name, datatype, _FOUND.get(kind, f"{raw.dtype.name} values"))
    if kind != "b" and _holds_bools(data, raw.ndim):  # numpy made numbers of true/false
        raise _cannot_hold(name, datatype, "booleans")
    target = V2_TO_NUMPY[datatype]
    if datatype in INT_TYPES:
        info = np.iinfo(target)
        if raw.min() < info.min or raw.max() > info.max:
            raise BadRequest(f"input '{name}': values out of range for {datatype}")
    return raw.reshape(-1).astype(target, copy=False)


def _cannot_hold(name: str, datatype: str, what: str) -> BadRequest:
    return BadRequest(f"input '{name}': datatype {datatype} cannot hold {what}")


def _values(data: list[Any], ndim: int) -> Iterable[Any]:
    """The values of `data`, which numpy made a regular `ndim`-d array of, flattened in C."""
    values: Iterable[Any] = data
    for _ in range(ndim - 1):
        values = chain.from_iterable(values)
    return values


def _holds_bools(data: list[Any], ndim: int) -> bool:
    """Whether JSON true/false sit among the numbers (numpy turns them into 1 and 0): one
    pass in C over the values, ~1.3 us for a row of 30 (~0.5% of a tabular request's CPU);
    numpy's own conversion of the list costs about as much."""
    return bool in set(map(type, _values(data, ndim)))


def _wide_ints(name: str, datatype: str, data: list[Any], ndim: int) -> np.ndarray:
    """Integers numpy could not give one dtype: values of both int64 and uint64 range (it
    promotes those to float64) or beyond both (object). Valid for UINT64 within its range;
    floats, booleans and other values keep their own error."""
    flat = list(_values(data, ndim))
    types = set(map(type, flat))
    if types != {int}:  # `type`: a bool is no int here
        types.discard(int)
        what = "booleans" if types == {bool} else "floats" if types == {float} else None
        raise _cannot_hold(name, datatype, what or "mixed or out-of-range values")
    info = np.iinfo(V2_TO_NUMPY[datatype])
    if min(flat) < info.min or max(flat) > info.max:
        raise BadRequest(f"input '{name}': values out of range for {datatype}")
    return np.array(flat, dtype=V2_TO_NUMPY[datatype])


def _binary_tensor(name: str, datatype: str, shape: list[int], chunk: memoryview) -> np.ndarray:
    expected = math.prod(shape)
    if datatype == "BYTES":
        return _reshape(name, _decode_bytes_elements(name, chunk, shape, expected), shape)
    dtype = V2_TO_NUMPY[datatype].newbyteorder("<")
    if len(chunk) != expected * dtype.itemsize:
        raise BadRequest(
            f"input '{name}': shape {shape} of {datatype} needs {expected * dtype.itemsize} "
            f"bytes, binary data has {len(chunk)}"
        )
    flat = np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    if datatype == "BOOL" and flat.view(np.uint8).max(initial=0) > 1:
        # numpy keeps any byte as a bool, and ORT reads 2 as neither true nor false (Not(2)
        # was true): the spec's BOOL bytes are 0 and 1 only.
        raise BadRequest(f"input '{name}': BOOL binary data must be bytes 0 or 1")
    return _reshape(name, flat, shape)


_ELEMENT_LENGTH = struct.Struct("<I").unpack_from


def _decode_bytes_elements(
    name: str, chunk: memoryview, shape: list[int], expected: int
) -> np.ndarray:
    """BYTES in binary form: each element is a 4-byte little-endian length, then the bytes.

    Elements become str, as JSON strings do: ONNX Runtime reads a string tensor's elements
    as text and would feed str(b"hi") = "b'hi'" for bytes, so anything but UTF-8 is a 400.
    No more than `expected` elements are read: a few KB of gzip'd zero-length elements
    (4 bytes each once inflated) would otherwise hold the event loop for seconds before a
    count check at the end.
    """
    data = chunk.tobytes()  # one copy: slicing bytes is far cheaper than a memoryview
    items: list[str] = []
    append = items.append
    offset = 0
    end = len(data)
    for index in range(expected):  # a huge `expected` is fine: the data runs out first
        start = offset + 4
        if start > end:
            if offset == end:
                raise BadRequest(
                    f"input '{name}': shape {shape} needs {expected} elements, data has {index}"
                )
            raise BadRequest(f"input '{name}': truncated BYTES element length")
        offset = start + _ELEMENT_LENGTH(data, offset)[0]
        if offset > end:
            raise BadRequest(f"input '{name}': BYTES element longer than the data")
        try:
            append(data[start:offset].decode())
        except UnicodeDecodeError:
            raise BadRequest(f"input '{name}': BYTES element {index} is not UTF-8") from None
    if offset != end:
        raise BadRequest(
            f"input '{name}': shape {shape} needs {expected} elements, binary data holds more"
        )
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _parse_outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest("'outputs' must be a list")
    outputs: list[RequestedOutput] = []
    names: set[str] = set()
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest("each requested output needs a string 'name'")
        # Twice by name (say, once classified and once raw) answered two outputs of one name,
        # which tritonclient's as_numpy reads with the wrong offsets.
        if item["name"] in names:
            raise BadRequest(f"output '{item['name']}' is requested more than once")
        names.add(item["name"])
        params = _object(item.get("parameters"), f"{item['name']}.parameters")
        _check_no_shared_memory(params, f"output '{item['name']}'")
        binary = _flag(params, "binary_data")
        outputs.append(RequestedOutput(item["name"], binary, class_count(params, item["name"])))
    return outputs


# --- responses -----------------------------------------------------------------------
def _json_data(array: np.ndarray) -> Any:
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.dtype == np.float16:
        return flat.astype(np.float32)
    if flat.dtype.kind == "O":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    if not flat.dtype.isnative:
        return flat.astype(flat.dtype.newbyteorder("="))
    return flat


def _binary_data(array: np.ndarray) -> bytes:
    if array.dtype.kind == "O":
        parts = []
        for value in array.reshape(-1):
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    outputs: Tensors,
    order: list[str],
    extra_parameters: dict[str, Any] | None = None,
    labels: dict[str, list[str]] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Return the body and the headers that the binary extension needs (if any)."""
    requested = (
        [(wanted.name, wanted.binary, wanted.classification) for wanted in request.outputs]
        if request.outputs
        else [(name, request.binary_output, None) for name in order]
    )
    tensors: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary, classes in requested:
        array = outputs[name]
        if classes is not None:
            array = top_classes(array, classes, (labels or {}).get(name))
        entry: dict[str, Any] = {
            "name": name,
            "datatype": numpy_to_v2(array.dtype),
            "shape": list(array.shape),
        }
        if binary:
            blob = _binary_data(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        tensors.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        doc["id"] = request.id
    if extra_parameters:
        doc["parameters"] = extra_parameters
    doc["outputs"] = tensors
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


# Classification formats each top-k value as text (~3 us each): up to this many values, on
# the event loop; more (256 rows x top-384 held the loop ~300 ms) in a thread.
CLASSIFY_ON_LOOP_MAX_VALUES = 1024


def classification_is_large(request: InferRequest, outputs: Tensors) -> bool:
    """Would encode_infer_response format more classification values than the loop should?"""
    values = 0
    for wanted in request.outputs or []:
        array = outputs.get(wanted.name)
        if wanted.classification is not None and array is not None and array.ndim:
            classes = max(1, array.shape[-1])
            values += array.size // classes * min(wanted.classification, classes)
    return values > CLASSIFY_ON_LOOP_MAX_VALUES


def check_requested_outputs(request: InferRequest, known: dict[str, TensorSpec]) -> None:
    for wanted in request.outputs or []:
        spec = known.get(wanted.name)
        if spec is None:
            raise BadRequest(f"unknown output '{wanted.name}'; model outputs are {sorted(known)}")
        if wanted.classification is not None:
            check_classifiable(spec)
