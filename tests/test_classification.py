"""Triton's classification extension: top classes of an output, with the model's labels."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from podserve.classification import check_classifiable, class_count, load_labels, top_classes
from podserve.errors import BadRequest
from podserve.model_config import TensorSpec
from server_process import ServerProcess


def test_highest_first_ties_by_index_and_labels_where_known() -> None:
    scores = np.array([[1.1, 3.3, 0.5, 2.4], [1, 1, 2, 0]], np.float32)
    got = top_classes(scores, 3, ["a", "b", "c"])
    assert got.tolist() == [["3.3:1:b", "2.4:3", "1.1:0:a"], ["2:2:c", "1:0:a", "1:1:b"]]
    assert top_classes(np.array([1, 5, 10, 4], np.uint8), 2, None).tolist() == ["10:2", "5:1"]
    assert top_classes(np.array([[0.9, 0.1]]), 5, None).shape == (1, 2)  # k capped, as Triton


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_values_read_back_exactly_in_their_own_type(dtype: type) -> None:
    values = np.random.default_rng(3).random((8, 5)).astype(dtype) / 1000
    for row, texts in zip(values, top_classes(values, 5, None), strict=True):
        read = sorted((dtype(text.split(":")[0]) for text in texts), reverse=True)
        assert read == sorted(row.tolist(), reverse=True)


@pytest.mark.parametrize("value", [0, -1, 2.0, "2", True, [2]])
def test_count_must_be_a_positive_integer(value: object) -> None:
    with pytest.raises(BadRequest, match="positive integer"):
        class_count({"classification": value}, "y")
    assert class_count({}, "y") is None and class_count({"classification": 2}, "y") == 2


@pytest.mark.parametrize(
    "spec",
    [
        TensorSpec(name="label", datatype="INT64", shape=[-1]),  # only the batch dimension
        TensorSpec(name="text", datatype="BYTES", shape=[-1, 3]),
        TensorSpec(name="flag", datatype="BOOL", shape=[4]),
        TensorSpec(name="scalar", datatype="FP32", shape=[]),
    ],
)
def test_outputs_without_classes_are_refused(spec: TensorSpec) -> None:
    with pytest.raises(BadRequest, match="cannot be returned as a classification"):
        check_classifiable(spec)
    check_classifiable(TensorSpec(name="p", datatype="FP32", shape=[-1, 2]))
    check_classifiable(TensorSpec(name="p", datatype="FP32", shape=[10]))  # unbatched


def test_labels_from_a_list_or_a_file(tmp_path: Path) -> None:
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    labels = load_labels({"p": "labels.txt", "q": ["x", "y"]}, tmp_path, {"p", "q"})
    assert labels == {"p": ["cat", "dog"], "q": ["x", "y"]}
    with pytest.raises(ValueError, match="unknown output 'r'"):
        load_labels({"r": ["x"]}, tmp_path, {"p"})
    with pytest.raises(ValueError, match="does not exist"):
        load_labels({"p": "missing.txt"}, tmp_path, {"p"})


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_class_count(server: ServerProcess, binary: bool) -> None:
    from sklearn.datasets import load_breast_cancer

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert "classification" in client.get_server_metadata()["extensions"]
    rows = load_breast_cancer().data[:16].astype(np.float32)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    wanted = [
        triton.InferRequestedOutput("probabilities", binary_data=binary, class_count=1),
        triton.InferRequestedOutput("label", binary_data=binary),
    ]
    result = client.infer("tabular", [tensor], outputs=wanted)
    top = result.as_numpy("probabilities")
    assert top.shape == (16, 1)
    names = ["malignant", "benign"]  # the demo model's labels.txt
    for (text,), label in zip(top, result.as_numpy("label"), strict=True):
        text = text.decode() if isinstance(text, bytes) else text
        value, index, name = text.split(":")
        assert int(index) == label and name == names[label] and 0.5 <= float(value) <= 1.0


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([{"name": "probabilities", "parameters": {"classification": 0}}], "positive integer"),
        ([{"name": "label", "parameters": {"classification": 1}}], "cannot be returned as"),
        (  # two outputs of one name: tritonclient's as_numpy read them with wrong offsets
            [
                {"name": "probabilities", "parameters": {"classification": 1}},
                {"name": "probabilities"},
            ],
            "output 'probabilities' is requested more than once",
        ),
    ],
)
def test_bad_classification_requests_get_a_400(
    client: httpx.Client, outputs: list, message: str
) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32",
                        "data": [1.0] * 30}], "outputs": outputs}  # fmt: skip
    response = client.post("/v2/models/tabular/infer", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
