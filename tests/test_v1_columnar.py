"""KServe V1's columnar format (TF Serving's `{"inputs": ...}` -> `{"outputs": ...}`) against
real servers: the same tensors as rows and as columns give the same numbers, in each format's
own answer, and bad columns get the row format's checks (a 4xx that says why, never a 500).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from onnx import TensorProto, helper

from model_builders import OPSET, save
from server_process import ServerProcess

AFFINE = "/v1/models/affine:predict"  # x FP32 [batch, 4]; the default version: y = 3x
MIXED = "/v1/models/mixed:predict"  # ids INT64 [b, 2], weights FP64 [b], flags BOOL [b, 3]
ROWS = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]


def _model(name: str, inputs: list[Any], outputs: list[Any], nodes: list[Any]) -> Any:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    return helper.make_model(graph, opset_imports=OPSET)


def _pairs_model() -> Any:
    """x BYTES [batch, 2] -> y = x."""
    x = helper.make_tensor_value_info("x", TensorProto.STRING, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, ["batch", 2])
    return _model("pairs", [x], [y], [helper.make_node("Identity", ["x"], ["y"])])


def _scaled_model() -> Any:
    """x FP32 [batch, 4] times s, a 0-d FP32: an input the row format cannot send."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    s = helper.make_tensor_value_info("s", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    return _model("scaled", [x, s], [y], [helper.make_node("Mul", ["x", "s"], ["y"])])


def _summed_model() -> Any:
    """x FP32 [batch, 2] -> y = x and total, a 0-d sum: no row per input row."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    total = helper.make_tensor_value_info("total", TensorProto.FLOAT, [])
    nodes = [
        helper.make_node("Identity", ["x"], ["y"]),
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
    ]
    return _model("summed", [x], [y, total], nodes)


@pytest.fixture(scope="module")
def column_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Models the shared server lacks: a [batch, 2] BYTES input, a 0-d input, a 0-d output."""
    repo: Path = tmp_path_factory.mktemp("columnar-models")
    save(_pairs_model(), repo, "pairs")
    save(_scaled_model(), repo, "scaled")
    save(_summed_model(), repo, "summed")
    with ServerProcess(repo, workers=1) as server:
        yield server


def _ok(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_one_input_model_takes_its_tensor_as_a_bare_value(client: httpx.Client) -> None:
    columns = _ok(client, AFFINE, {"inputs": ROWS})
    rows = _ok(client, AFFINE, {"instances": ROWS})
    expected = [[3.0, 6.0, 9.0, 12.0], [15.0, 18.0, 21.0, 24.0]]
    assert columns == {"outputs": expected}
    assert rows == {"predictions": expected}  # the row format's answer as it was


def test_named_columns_on_a_one_input_model_with_two_outputs(client: httpx.Client) -> None:
    row = [float(i % 7) for i in range(30)]
    named = _ok(client, "/v1/models/tabular:predict", {"inputs": {"input": [row] * 2}})
    bare = _ok(client, "/v1/models/tabular:predict", {"inputs": [row] * 2})
    rows = _ok(client, "/v1/models/tabular:predict", {"instances": [row] * 2})
    assert named == bare
    assert set(named["outputs"]) == {"label", "probabilities"}
    # The same numbers, one output at a time: the rows' objects are the columns turned, and
    # both write FP32 as orjson does (the shortest that reads back as that float32), as V2
    # does; the rows' had been Python floats (0.7669022679328918 for 0.76690227).
    predictions = rows["predictions"]
    assert [p["label"] for p in predictions] == named["outputs"]["label"]
    assert [p["probabilities"] for p in predictions] == named["outputs"]["probabilities"]


def test_several_inputs_and_outputs_by_name(client: httpx.Client) -> None:
    columns = {
        "ids": [[1, 2], [3, 4]],
        "weights": [1.0, 2.5],
        "flags": [[True, False, True], [False, False, False]],
    }
    answer = _ok(client, MIXED, {"inputs": columns})
    assert answer == {
        "outputs": {
            "id_sum": [3, 7],
            "doubled": [2.0, 5.0],
            "inverted": [[False, True, False], [True, True, True]],
        }
    }
    instances = [{name: value[i] for name, value in columns.items()} for i in range(2)]
    rows = _ok(client, MIXED, {"instances": instances})
    assert rows == {
        "predictions": [
            {"id_sum": 3, "doubled": 2.0, "inverted": [False, True, False]},
            {"id_sum": 7, "doubled": 5.0, "inverted": [True, True, True]},
        ]
    }


def test_strings_as_columns(client: httpx.Client, column_server: ServerProcess) -> None:
    texts = ["one", "two words"]
    columns = _ok(client, "/v1/models/text:predict", {"inputs": {"text": texts}})
    rows = _ok(client, "/v1/models/text:predict", {"instances": texts})
    assert columns["outputs"] == rows["predictions"]
    assert len(columns["outputs"]) == 2 and len(columns["outputs"][0]) == 32
    pairs = [["a", "b"], ["c", "é"]]
    with httpx.Client(base_url=column_server.url, timeout=30) as http:
        assert _ok(http, "/v1/models/pairs:predict", {"inputs": pairs}) == {"outputs": pairs}
        wrong = http.post("/v1/models/pairs:predict", json={"inputs": [["a", 1], ["b", "c"]]})
    assert wrong.status_code == 400 and "takes strings" in wrong.json()["error"]


def test_a_scalar_input_goes_beside_one_row(column_server: ServerProcess) -> None:
    """A 0-d input counts as one row (as in V2): one row of x runs, two do not."""
    with httpx.Client(base_url=column_server.url, timeout=30) as http:
        one = {"x": [[1.0, 2.0, 3.0, 4.0]], "s": 0.5}
        assert _ok(http, "/v1/models/scaled:predict", {"inputs": one}) == {
            "outputs": [[0.5, 1.0, 1.5, 2.0]]
        }
        two = http.post("/v1/models/scaled:predict", json={"inputs": {"x": ROWS, "s": 0.5}})
    assert two.status_code == 400, two.text
    assert "different batch sizes (dim 0) {'x': 2, 's': 1}" in two.json()["error"]


def test_outputs_need_no_row_per_input_row(column_server: ServerProcess) -> None:
    """The row format's object per instance needs a row per instance in every output; the
    column format answers each output whole."""
    with httpx.Client(base_url=column_server.url, timeout=30) as http:
        columns = _ok(http, "/v1/models/summed:predict", {"inputs": [[1.0, 2.0], [3.0, 4.0]]})
        rows = http.post("/v1/models/summed:predict", json={"instances": [[1.0, 2.0]]})
    assert columns == {"outputs": {"y": [[1.0, 2.0], [3.0, 4.0]], "total": 10.0}}
    assert rows.status_code == 400 and "use V2 infer" in rows.json()["error"]


def test_signature_name_is_ignored_in_both_formats(client: httpx.Client) -> None:
    signature = {"signature_name": "serving_default"}
    columns = _ok(client, AFFINE, {**signature, "inputs": ROWS[:1]})
    rows = _ok(client, AFFINE, {**signature, "instances": ROWS[:1]})
    assert columns == {"outputs": [[3.0, 6.0, 9.0, 12.0]]}
    assert rows == {"predictions": [[3.0, 6.0, 9.0, 12.0]]}


_FLAGS = [[True, False, True]]
# fmt: off
BAD_COLUMNS = [
    ("both formats", AFFINE, {"instances": ROWS, "inputs": ROWS}, "not both"),
    ("entity ids too", AFFINE, {"inputs": ROWS, "entity_ids": ["u1"]}, "not both"),
    ("unknown name", AFFINE, {"inputs": {"x": ROWS, "z": ROWS}}, "unknown inputs ['z']"),
    ("missing input", MIXED, {"inputs": {"ids": [[1, 2]], "weights": [1.0]}},
     "lacks input(s) ['flags']"),
    ("null input", MIXED, {"inputs": {"ids": [[1, 2]], "weights": None, "flags": _FLAGS}},
     "lacks input(s) ['weights']"),
    ("bare value, several inputs", MIXED, {"inputs": [[1, 2]]}, "'inputs' must be an object"),
    ("null", AFFINE, {"inputs": None}, "'inputs' is null"),
    ("empty", AFFINE, {"inputs": []}, "input 'x' is empty"),
    ("ragged", AFFINE, {"inputs": [[1, 2, 3, 4], [1]]}, "input 'x': rows are ragged"),
    ("null row", AFFINE, {"inputs": [[1, 2, 3, 4], None]}, "missing from some rows"),
    ("wrong rank", AFFINE, {"inputs": [1, 2, 3, 4]}, "model expects 2"),
    ("strings for FP32", AFFINE, {"inputs": [["a", "b", "c", "d"]]}, "FP32 cannot hold"),
    ("booleans for FP32", AFFINE, {"inputs": [[True, 2, 3, 4]]}, "cannot hold booleans"),
    ("fractions for INT64", MIXED,
     {"inputs": {"ids": [[1.5, 2]], "weights": [1.0], "flags": _FLAGS}}, "INT64 cannot hold"),
    ("past FP32's range", AFFINE, {"inputs": [[1, 2, 3, 1e300]]}, "beyond FP32's range"),
    ("batch sizes differ", MIXED,
     {"inputs": {"ids": [[1, 2], [3, 4]], "weights": [1.0], "flags": _FLAGS * 2}},
     "different batch sizes"),
    ("numbers for BYTES", "/v1/models/text:predict", {"inputs": ["a", 1]}, "takes strings"),
]
# fmt: on


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [case[1:] for case in BAD_COLUMNS],
    ids=[case[0] for case in BAD_COLUMNS],
)
def test_bad_columns_get_a_400_that_says_why(
    client: httpx.Client, path: str, body: dict[str, Any], message: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("value", [0.5, "not even a number"])
def test_too_many_rows_are_a_413_before_the_values_are_read(
    client: httpx.Client, value: Any
) -> None:
    """The limit (1024) counts each column's rows; strings for FP32 would be a 400, so the
    413 shows the count comes first, before any array is built."""
    response = client.post(AFFINE, json={"inputs": {"x": [[value] * 4] * 1025}})
    assert response.status_code == 413, response.text
    assert "1025 rows exceed the limit of 1024" in response.json()["error"]
