"""Client input at the edges of the V2 and V1 protocols: each case was once a 500 or a
silently wrong answer. The rule: bad input gets a 4xx that says why, valid input (Triton's
reading of the spec) gets the right answer.

The parser is tested directly where that is exact (which element the BYTES decoding stops
at, which header value is refused); a real server with string and UINT64 identity models
checks what tritonclient and plain HTTP clients see.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from onnx import TensorProto, helper
from starlette.requests import Request
from tritonclient.utils import InferenceServerException

from model_builders import OPSET, affine_model, save
from podserve import protocol_v2
from podserve.errors import BadRequest, PayloadTooLarge
from podserve.http_body import binary_header_length, read_body
from podserve.model_config import TensorSpec
from podserve.protocol_v1 import encode_predictions, parse_predict_doc
from podserve.protocol_v2 import numeric_array, parse_infer_request
from server_process import ServerProcess

U64_MAX = 2**64 - 1


def _identity(name: str, elem: int, shape: list[Any]) -> Any:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def _binary_body(header: dict, payload: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + payload, len(head)


def _bytes_payload(elements: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def _bytes_request(shape: list[int], payload: bytes, name: str = "x") -> dict:
    return {
        "inputs": [
            {
                "name": name,
                "shape": shape,
                "datatype": "BYTES",
                "parameters": {"binary_data_size": len(payload)},
            }
        ]
    }


# --- the parser, directly ---------------------------------------------------------------------
VALID_INPUT = {"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
WRONG_TYPES = [["FP32"], {"a": 1}, 7, 1.5, True, None, ""]


WRONG_FIELDS = [
    (field, value)
    for field in ("name", "datatype", "shape", "parameters", "data")
    for value in WRONG_TYPES
    if not (field == "parameters" and (value is None or isinstance(value, dict)))  # valid
]


@pytest.mark.parametrize(
    ("field", "value"), WRONG_FIELDS, ids=[f"{f}-{type(v).__name__}" for f, v in WRONG_FIELDS]
)
def test_tensor_header_fields_of_the_wrong_json_type_are_a_400(field: str, value: Any) -> None:
    """A list or object `datatype` raised TypeError (unhashable) in the lookup: a 500."""
    body = json.dumps({"inputs": [VALID_INPUT | {field: value}]}).encode()
    with pytest.raises(BadRequest):
        parse_infer_request(body)


@pytest.mark.parametrize("value", [["FP32"], {"FP32": 1}])
def test_a_non_string_datatype_says_what_is_wrong(value: Any) -> None:
    body = json.dumps({"inputs": [VALID_INPUT | {"datatype": value}]}).encode()
    with pytest.raises(BadRequest, match="'datatype' must be a string"):
        parse_infer_request(body)


BOOLEAN_LIKE = ["false", "true", 0, 1, None, [], {}]


@pytest.mark.parametrize("value", BOOLEAN_LIKE, ids=[repr(v) for v in BOOLEAN_LIKE])
def test_binary_data_flags_must_be_json_booleans(value: Any) -> None:
    """bool("false") is True: the string made the answer binary. Triton refuses it."""
    request = {"inputs": [VALID_INPUT]}
    with pytest.raises(BadRequest, match="Unable to parse 'binary_data_output'"):
        parse_infer_request(
            json.dumps(request | {"parameters": {"binary_data_output": value}}).encode()
        )
    output = {"name": "y", "parameters": {"binary_data": value}}
    with pytest.raises(BadRequest, match="Unable to parse 'binary_data'"):
        parse_infer_request(json.dumps(request | {"outputs": [output]}).encode())


def test_binary_data_flags_true_and_false_still_work() -> None:
    for flag in (True, False):
        request = {
            "inputs": [VALID_INPUT],
            "parameters": {"binary_data_output": flag},
            "outputs": [{"name": "y", "parameters": {"binary_data": not flag}}],
        }
        parsed = parse_infer_request(json.dumps(request).encode())
        assert parsed.binary_output is flag
        assert parsed.outputs is not None and parsed.outputs[0].binary is (not flag)


@pytest.mark.parametrize(
    "data",
    [[U64_MAX, 1], [[U64_MAX], [0]], [2**63, 2**63 - 1], [U64_MAX, U64_MAX]],
)
def test_uint64_takes_its_whole_range(data: list) -> None:
    """Values >= 2**63 next to smaller ones: numpy promotes to float64 ("cannot hold floats")."""
    array = numeric_array("x", "UINT64", data)
    assert array.dtype == np.uint64
    assert array.tolist() == np.array(data, dtype=np.uint64).reshape(-1).tolist()


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT64", [2**64, 1], "out of range for UINT64"),
        ("UINT64", [-1, U64_MAX], "out of range for UINT64"),
        ("UINT64", [1.5, U64_MAX], "cannot hold floats"),
        ("UINT64", [True, U64_MAX], "cannot hold booleans"),
        ("UINT64", [None, U64_MAX], "cannot hold mixed or out-of-range values"),
        ("INT64", [U64_MAX, -1], "out of range for INT64"),
        ("INT64", [10**400, 1], "out of range for INT64"),
        ("INT8", [1.5, 2], "cannot hold floats"),
    ],
)
def test_integers_numpy_cannot_type_get_a_clear_400(
    datatype: str, data: list, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        numeric_array("x", datatype, data)


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("FP32", [True, 1.5]),
        ("FP64", [[0.5, 1.0], [2.0, False]]),
        ("INT64", [1, False]),
        ("INT32", [[[1], [True]]]),
        ("UINT8", [True, 2]),
        ("FP16", [1, 2.5, True]),
    ],
)
def test_booleans_among_numbers_are_refused(datatype: str, data: list) -> None:
    """numpy turned true/false into 1/0 silently (all booleans were already refused)."""
    with pytest.raises(BadRequest, match=f"datatype {datatype} cannot hold booleans"):
        numeric_array("x", datatype, data)


def test_numbers_and_booleans_that_belong_still_parse() -> None:
    assert numeric_array("x", "FP32", [[1, 2.5], [0, 1]]).tolist() == [1.0, 2.5, 0.0, 1.0]
    assert numeric_array("x", "INT64", [0, 1, -1]).tolist() == [0, 1, -1]
    assert numeric_array("x", "BOOL", [True, False]).tolist() == [True, False]


def test_v1_refuses_booleans_among_numbers() -> None:
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1, 2])
    with pytest.raises(BadRequest, match="cannot hold booleans"):
        parse_predict_doc({"instances": [[1.5, 2.0], [True, 0.5]]}, [spec])


def test_binary_bytes_elements_are_decoded_as_utf8() -> None:
    """As bytes, ONNX Runtime fed str(b"hello") = "b'hello'" to a string model."""
    texts = ["hello", "héllo wörld 🚀", "", "nul\x00inside"]
    payload = _bytes_payload([t.encode() for t in texts])
    body, length = _binary_body(_bytes_request([2, 2], payload), payload)
    array = parse_infer_request(body, length).inputs["x"]
    assert array.shape == (2, 2)
    assert array.reshape(-1).tolist() == texts
    assert all(type(v) is str for v in array.flat)


@pytest.mark.parametrize("element", [b"\xff\xfe", b"ok\xc3", b"\xed\xa0\x80"])
def test_binary_bytes_that_are_not_utf8_are_a_400(element: bytes) -> None:
    payload = _bytes_payload([b"fine", element])
    body, length = _binary_body(_bytes_request([2], payload), payload)
    with pytest.raises(BadRequest, match="element 1 is not UTF-8"):
        parse_infer_request(body, length)


def test_bytes_decoding_stops_once_the_shape_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """A million zero-length elements for shape [1, 2]: refused once two are read and data
    is left, not after decoding all of them (seconds of event loop), and without reaching
    the broken tail."""
    payload = b"\0\0\0\0" * 1_000_000 + b"\x01"  # and a truncated length at the end
    body, length = _binary_body(_bytes_request([1, 2], payload), payload)
    reads = 0
    element_length = protocol_v2._ELEMENT_LENGTH

    def counted(data: bytes, offset: int) -> tuple[int]:
        nonlocal reads
        reads += 1
        return element_length(data, offset)

    monkeypatch.setattr(protocol_v2, "_ELEMENT_LENGTH", counted)
    with pytest.raises(BadRequest, match=r"needs 2 elements, binary data holds more"):
        parse_infer_request(body, length)
    assert reads == 2


@pytest.mark.parametrize(
    ("elements", "shape", "tail", "message"),
    [
        ([b"a"], [2], b"", "needs 2 elements, data has 1"),
        ([b"a"], [2], b"\x01\x00", "truncated BYTES element length"),
        ([b"a"], [2], b"\x09\x00\x00\x00abc", "BYTES element longer than the data"),
        ([b"a", b"b", b"c"], [2], b"", "needs 2 elements, binary data holds more"),
        ([b"a"], [0], b"", "needs 0 elements, binary data holds more"),
    ],
)
def test_bytes_element_counts_that_disagree_with_the_shape(
    elements: list[bytes], shape: list[int], tail: bytes, message: str
) -> None:
    payload = _bytes_payload(elements) + tail
    body, length = _binary_body(_bytes_request(shape, payload), payload)
    with pytest.raises(BadRequest, match=message):
        parse_infer_request(body, length)


def _request_with(headers: list[tuple[bytes, bytes]], body: bytes = b"") -> Request:
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope | {"query_string": b""}, receive)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value", ["²".encode("latin-1"), "¹²".encode("latin-1"), b"1" * 5000, b"-1", b"1.0", b""]
)
def test_inference_header_content_length_must_be_ascii_digits(value: bytes) -> None:
    """str.isdigit() is true for "²", which int() refuses; int() also stops at 4300 digits."""
    request = _request_with([(b"inference-header-content-length", value)])
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length must be"):
        binary_header_length(request)


def test_inference_header_content_length_with_leading_zeros_is_a_number() -> None:
    assert binary_header_length(_request_with([(b"inference-header-content-length", b"007")])) == 7


def test_content_length_must_be_ascii_digits() -> None:
    """The HTTP parsers podserve runs behind refuse these first; read_body must not 500
    behind one that does not."""
    request = _request_with([(b"content-length", "²".encode("latin-1"))], b"ab")
    with pytest.raises(BadRequest, match="Content-Length must be a non-negative integer"):
        asyncio.run(read_body(request, 1024, 5))
    request = _request_with([(b"content-length", b"1" * 5000)], b"ab")
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(request, 1024, 5))
    request = _request_with([(b"content-length", b"2")], b"ab")
    assert asyncio.run(read_body(request, 1024, 5)) == b"ab"


def test_v1_bytes_predictions_are_strings() -> None:
    """orjson encodes no object array: a single BYTES output was a 500."""
    single = {"y": np.array(["a", b"b", "\u00e9".encode()], dtype=object)}
    assert encode_predictions(single, ["y"], 3) == {"predictions": ["a", "b", "é"]}
    rows = {"y": np.array([["a", "b"]], dtype=object)}
    assert encode_predictions(rows, ["y"], 1) == {"predictions": [["a", "b"]]}
    several = {"y": np.array([b"a", b"b"], dtype=object), "n": np.array([1, 2], np.int64)}
    assert encode_predictions(several, ["y", "n"], 2) == {
        "predictions": [{"y": "a", "n": 1}, {"y": "b", "n": 2}]
    }


def test_v1_named_instances_for_a_single_input() -> None:
    """TF Serving's row format names the inputs in each instance, for any number of them."""
    spec = TensorSpec(name="input", datatype="FP32", shape=[-1, 3])
    named = parse_predict_doc({"instances": [{"input": [1, 2, 3]}, {"input": [4, 5, 6]}]}, [spec])
    plain = parse_predict_doc({"instances": [[1, 2, 3], [4, 5, 6]]}, [spec])
    np.testing.assert_array_equal(named["input"], plain["input"])
    with pytest.raises(BadRequest, match="all values or all objects"):
        parse_predict_doc({"instances": [{"input": [1, 2, 3]}, [4, 5, 6]]}, [spec])
    with pytest.raises(BadRequest, match="missing from some instances"):
        parse_predict_doc({"instances": [{"input": [1, 2, 3]}, {}]}, [spec])


def test_v1_outputs_without_a_row_per_instance_are_a_400_not_cut() -> None:
    """An object per instance needs a row per instance in every output: the second output's
    extra rows were dropped (200), a first one with more rows, or a scalar, was a 500."""
    rows = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    doubled = {"rows": rows, "doubled": np.concatenate([rows, rows])}
    for order in (["rows", "doubled"], ["doubled", "rows"]):
        with pytest.raises(BadRequest, match="output 'doubled' has shape \\[4, 2\\]"):
            encode_predictions(doubled, order, 2)
    scalar = {"total": np.array(10.0, np.float32), "rows": rows}
    with pytest.raises(BadRequest, match="output 'total' has shape \\[\\]"):
        encode_predictions(scalar, ["total", "rows"], 2)
    # A single output is the predictions as they are, a scalar too (orjson: no 0-d array).
    assert encode_predictions({"total": np.array(10.0, np.float32)}, ["total"], 2) == {
        "predictions": 10.0
    }


def test_v1_string_instances_may_be_rows_of_strings() -> None:
    """As numbers may: a [batch, 2] BYTES input took no V1 form at all."""
    pair = TensorSpec(name="s", datatype="BYTES", shape=[-1, 2])
    parsed = parse_predict_doc({"instances": [["a", "b"], ["c", "d"]]}, [pair])["s"]
    assert parsed.shape == (2, 2) and parsed.tolist() == [["a", "b"], ["c", "d"]]
    for bad, message in (
        ([["a", "b"], ["c"]], "ragged"),
        ([["a", "b"], "c"], "ragged"),
        ([[["a", "b"]], [["c", "d"]]], "nested too deep"),
        ([["a", 1], ["b", "c"]], "takes strings"),
        ([["a", ["b"]], ["c", "d"]], "takes strings"),
    ):
        with pytest.raises(BadRequest, match=message):
            parse_predict_doc({"instances": bad}, [pair])
    one = TensorSpec(name="s", datatype="BYTES", shape=[-1, 1])
    for instances in (["a", "b"], [["a"], ["b"]]):  # the answer's form is taken back too
        assert parse_predict_doc({"instances": instances}, [one])["s"].shape == (2, 1)


def test_v1_named_instances_with_an_unknown_input_are_a_400() -> None:
    spec = TensorSpec(name="input", datatype="FP32", shape=[-1, 3])
    doc = {"instances": [{"input": [1, 2, 3]}, {"input": [4, 5, 6], "inptu": 1}]}
    with pytest.raises(BadRequest, match=r"instance 1 names unknown inputs \['inptu'\]"):
        parse_predict_doc(doc, [spec])


def test_binary_bool_bytes_other_than_0_and_1_are_a_400() -> None:
    header = {"inputs": [{"name": "b", "datatype": "BOOL", "shape": [3],
                          "parameters": {"binary_data_size": 3}}]}  # fmt: skip
    body, length = _binary_body(header, bytes([1, 0, 1]))
    assert parse_infer_request(body, length).inputs["b"].tolist() == [True, False, True]
    body, length = _binary_body(header, bytes([2, 0, 255]))
    with pytest.raises(BadRequest, match="BOOL binary data must be bytes 0 or 1"):
        parse_infer_request(body, length)


def test_rows_past_the_limit_are_refused_before_the_data_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Declared rows are checked first: numpy never copies a tensor that is refused anyway."""

    def never(*_: Any) -> None:
        raise AssertionError("the data was converted")

    monkeypatch.setattr(protocol_v2, "numeric_array", never)
    tensor = {"name": "x", "datatype": "FP32", "shape": [2000, 4], "data": [0.0] * 8000}
    with pytest.raises(PayloadTooLarge, match="2000 rows exceed the limit of 1024"):
        parse_infer_request(json.dumps({"inputs": [tensor]}).encode(), None, 1024)
    too_much = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0.0] * 8000}
    with pytest.raises(BadRequest, match=r"needs 4 elements, data has 8000\+"):
        parse_infer_request(json.dumps({"inputs": [too_much]}).encode(), None, 1024)
    spec = TensorSpec(name="x", datatype="FP32", shape=[-1, 4])
    with pytest.raises(PayloadTooLarge, match="2000 rows exceed the limit of 1024"):
        parse_predict_doc({"instances": [[0.0] * 4] * 2000}, [spec], 1024)


def test_a_raw_binary_request_says_it_is_not_supported() -> None:
    with pytest.raises(BadRequest, match=r"raw binary request.*not supported"):
        parse_infer_request(b"\x00" * 16, 0)


# --- a real server ----------------------------------------------------------------------------
def _zeros_model() -> Any:
    """y = zeros of shape x: a negative dim fails inside ORT's allocation, a 500."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["x"], ["y"])],
        "zeros",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    return helper.make_model(graph, opset_imports=OPSET)


@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo: Path = tmp_path_factory.mktemp("edge-models")
    save(_identity("strings", TensorProto.STRING, ["batch", 2]), repo, "strings")
    save(_identity("strings1", TensorProto.STRING, ["batch"]), repo, "strings1")
    save(_identity("u64", TensorProto.UINT64, ["batch", 2]), repo, "u64")
    save(affine_model(), repo, "affine")
    save(affine_model(), repo, "big_batches", config={"max_batch_size": 512})
    save(_zeros_model(), repo, "zeros")
    with ServerProcess(repo, workers=1) as server:
        yield server


@pytest.fixture()
def tc(edge_server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{edge_server.port}")


TEXTS = [["hello", "world"], ["héllo wörld 🚀", ""]]


@pytest.mark.parametrize("binary_out", [True, False])
def test_strings_binary_and_json_give_the_same_answer(
    tc: triton.InferenceServerClient, binary_out: bool
) -> None:
    """tritonclient's default (binary, bytes elements) answered "b'hello'" from an Identity
    string model; JSON answered "hello"."""
    answers = []
    for binary_in in (True, False):
        tensor = triton.InferInput("x", [2, 2], "BYTES")
        values = [[t.encode() for t in row] for row in TEXTS] if binary_in else TEXTS
        tensor.set_data_from_numpy(np.array(values, dtype=object), binary_data=binary_in)
        wanted = [triton.InferRequestedOutput("y", binary_data=binary_out)]
        answers.append(tc.infer("strings", [tensor], outputs=wanted).as_numpy("y"))
    # tritonclient gives bytes elements from binary answers, str from JSON ones.
    expected = [[t.encode() if binary_out else t for t in row] for row in TEXTS]
    for answer in answers:
        assert answer.tolist() == expected


def test_strings_not_utf8_get_a_400(tc: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 2], "BYTES")
    tensor.set_data_from_numpy(np.array([[b"ok", b"\xff\xfe"]], dtype=object))
    with pytest.raises(InferenceServerException) as error:
        tc.infer("strings", [tensor])
    assert error.value.status() == "400"
    assert "element 1 is not UTF-8" in error.value.message()


@pytest.mark.parametrize("binary", [True, False])
def test_uint64_whole_range_round_trip(tc: triton.InferenceServerClient, binary: bool) -> None:
    values = np.array([[U64_MAX, 1], [2**63, 0]], dtype=np.uint64)
    tensor = triton.InferInput("x", [2, 2], "UINT64")
    tensor.set_data_from_numpy(values, binary_data=binary)
    wanted = [triton.InferRequestedOutput("y", binary_data=binary)]
    np.testing.assert_array_equal(tc.infer("u64", [tensor], outputs=wanted).as_numpy("y"), values)


def test_v1_single_bytes_output(edge_server: ServerProcess) -> None:
    response = httpx.post(
        f"{edge_server.url}/v1/models/strings1:predict",
        json={"instances": ["a", "b", "é"]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": ["a", "b", "é"]}


def test_v1_named_instance_on_a_single_input_model(edge_server: ServerProcess) -> None:
    url = f"{edge_server.url}/v1/models/affine:predict"
    named = httpx.post(url, json={"instances": [{"x": [1, 2, 3, 4]}]}, timeout=30)
    plain = httpx.post(url, json={"instances": [[1, 2, 3, 4]]}, timeout=30)
    assert named.status_code == 200, named.text
    assert named.json() == plain.json() == {"predictions": [[3.0, 5.0, 7.0, 9.0]]}


def test_bytes_element_bomb_is_refused_without_stalling_the_loop(
    edge_server: ServerProcess,
) -> None:
    """16 KB of gzip: 4,194,240 zero-length elements for a [1, 2] tensor. Decoding them all
    before the count check held the (only) worker's event loop for seconds."""
    count = 4 * 1024 * 1024 - 64
    payload = b"\0\0\0\0" * count
    body, length = _binary_body(_bytes_request([1, 2], payload), payload)
    compressed = gzip.compress(body)
    assert len(compressed) < 64 * 1024
    answer: dict[str, httpx.Response] = {}

    def bomb() -> None:
        answer["bomb"] = httpx.post(
            f"{edge_server.url}/v2/models/strings/infer",
            content=compressed,
            timeout=60,
            headers={
                "content-type": "application/octet-stream",
                "content-encoding": "gzip",
                "inference-header-content-length": str(length),
            },
        )

    sender = threading.Thread(target=bomb)
    sender.start()
    time.sleep(0.5)  # the bomb is in: inflated and parsed in threads, off the loop
    live = httpx.get(f"{edge_server.url}/v2/health/live", timeout=60)
    sender.join(60)
    assert live.status_code == 200
    # Generous: the loop answers in milliseconds, it was held for seconds. That the decoding
    # stops at the shape's count is test_bytes_decoding_stops_once_the_shape_is_full's.
    assert live.elapsed.total_seconds() < 2.0
    response = answer["bomb"]
    assert response.status_code == 400, response.text
    assert "needs 2 elements, binary data holds more" in response.json()["error"]
    assert response.elapsed.total_seconds() < 5.0


def test_empty_strings_in_binary_form_are_still_fine(edge_server: ServerProcess) -> None:
    payload = _bytes_payload([b"", b""])
    body, length = _binary_body(_bytes_request([1, 2], payload), payload)
    response = httpx.post(
        f"{edge_server.url}/v2/models/strings/infer",
        content=body,
        timeout=30,
        headers={
            "content-type": "application/octet-stream",
            "inference-header-content-length": str(length),
        },
    )
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == ["", ""]


def test_v1_string_rows_round_trip(edge_server: ServerProcess) -> None:
    response = httpx.post(
        f"{edge_server.url}/v1/models/strings:predict",
        json={"instances": [["a", "b"], ["c", "é"]]},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [["a", "b"], ["c", "é"]]}


def test_a_500_closes_its_connection_and_says_so(edge_server: ServerProcess) -> None:
    """uvicorn closes the connection after a 500; without `Connection: close` a keep-alive
    client sent its next request into the closed socket (a reset)."""
    url = f"{edge_server.url}/v2/models/zeros/infer"
    tensor = {"name": "x", "datatype": "INT64", "shape": [2]}
    with httpx.Client(timeout=30) as client:
        for _ in range(3):
            failed = client.post(url, json={"inputs": [{**tensor, "data": [-1, 2]}]})
            assert failed.status_code == 500, failed.text
            assert failed.headers["connection"] == "close"
            answered = client.post(url, json={"inputs": [{**tensor, "data": [1, 2]}]})
            assert answered.status_code == 200, answered.text
            assert answered.json()["outputs"][0]["data"] == [0.0, 0.0]


def test_triton_config_shows_the_largest_request_the_server_takes(
    tc: triton.InferenceServerClient, edge_server: ServerProcess
) -> None:
    """A config.yaml max_batch_size of 512 over a queue of 256 rows: perf_analyzer and other
    clients size requests from the config, and 257 rows are a 413."""
    assert tc.get_model_config("big_batches")["max_batch_size"] == 256
    url = f"{edge_server.url}/v2/models/big_batches/infer"
    for rows, status in ((256, 200), (257, 413)):
        tensor = {"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": [0.5] * rows * 4}
        assert httpx.post(url, json={"inputs": [tensor]}, timeout=30).status_code == status


def test_a_number_past_fp32s_range_says_why_it_is_inf(edge_server: ServerProcess) -> None:
    """JSON has no Inf: the cast to FP32 made 1e300 one, and "NaN or Inf" alone puzzled."""
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1.0, 2.0, 3.0, 1e300]}
    response = httpx.post(
        f"{edge_server.url}/v2/models/affine/infer", json={"inputs": [tensor]}, timeout=30
    )
    assert response.status_code == 400
    assert "beyond FP32's range" in response.json()["error"]


def test_large_bodies_are_parsed_one_at_a_time() -> None:
    """A 15 KiB deflated body is 15 MiB of JSON zeros, ~200 MiB of Python objects while it is
    parsed: six at once took a worker's peak memory up 190-470 MiB more than one did (one
    at a time: 40-90 MiB, their inflated bodies). The parse holds the GIL: no time is lost."""
    from podserve.http_body import PARSE_ON_LOOP_MAX_BYTES, parse_body

    running, most = 0, 0
    lock = threading.Lock()

    def parse(body: bytes) -> int:
        nonlocal running, most
        if len(body) <= PARSE_ON_LOOP_MAX_BYTES:
            return len(body)  # on the loop, at once: not held back by large ones
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return len(body)

    async def six() -> list[int]:
        large, small = b"x" * (PARSE_ON_LOOP_MAX_BYTES + 1), b"{}"
        return await asyncio.gather(*(parse_body(parse, large) for _ in range(6)),
                                    parse_body(parse, small))  # fmt: skip

    assert asyncio.run(six()) == [PARSE_ON_LOOP_MAX_BYTES + 1] * 6 + [2]
    assert most == 1
