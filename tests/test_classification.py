"""Triton's classification extension: top classes of an output, with the model's labels."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from podserve.classification import check_classifiable, class_count, load_labels, top_classes
from podserve.errors import BadRequest
from podserve.model_config import TensorSpec
from podserve.phases import parse_server_timing
from server_process import ServerProcess


def test_highest_first_ties_by_index_and_labels_where_known() -> None:
    scores = np.array([[1.1, 3.3, 0.5, 2.4], [1, 1, 2, 0]], np.float32)
    got = top_classes(scores, 3, ["a", "b", "c"])
    assert got.tolist() == [["3.3:1:b", "2.4:3", "1.1:0:a"], ["2:2:c", "1:0:a", "1:1:b"]]
    assert top_classes(np.array([1, 5, 10, 4], np.uint8), 2, None).tolist() == ["10:2", "5:1"]
    assert top_classes(np.array([[0.9, 0.1]]), 5, None).shape == (1, 2)  # k capped, as Triton


def test_nan_ranks_last() -> None:
    """Reachable with allow_nonfinite: "the k highest values" never starts with a NaN."""
    scores = np.array([[1, np.nan, 3, 2], [np.nan, np.nan, -np.inf, 0]], np.float32)
    assert top_classes(scores, 2, None).tolist() == [["3:2", "2:3"], ["0:3", "-inf:2"]]


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


def test_a_large_classification_is_formatted_off_the_event_loop(tmp_path: Path) -> None:
    """200 rows x top-1024 is ~200k values formatted as text: in a thread, so the loop
    answers other requests meanwhile (it stalled for the whole postprocess phase before)."""
    from model_builders import affine_model, save

    save(affine_model(width=1024), tmp_path, "wide", 1, {"max_batch_size": 256})
    rows = np.random.default_rng(5).random((200, 1024)).astype(np.float32)
    body = {
        "inputs": [{"name": "x", "shape": [200, 1024], "datatype": "FP32",
                    "data": rows.ravel().tolist()}],
        "outputs": [{"name": "y", "parameters": {"classification": 1024}}],
    }  # fmt: skip
    content = orjson.dumps(body)  # encoded here: httpx's json= would hold this test's loop
    with ServerProcess(tmp_path, workers=1) as server:

        async def scenario() -> tuple[httpx.Response, list[float]]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                big = asyncio.create_task(client.post("/v2/models/wide/infer", content=content))
                probes: list[float] = []
                async with httpx.AsyncClient(base_url=server.url, timeout=60) as probe:
                    while not big.done():
                        start = time.perf_counter()
                        assert (await probe.get("/v2/health/live")).status_code == 200
                        probes.append(time.perf_counter() - start)
                        await asyncio.sleep(0.005)
                return await big, probes

        response, probes = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["shape"] == [200, 1024] and output["datatype"] == "BYTES"
    top = output["data"][0].split(":")
    assert int(top[1]) == int(np.argmax(rows[0]))  # y = 2x + 1: the same order as x
    postprocess_ms = parse_server_timing(response.headers["server-timing"])["postprocess"]
    assert postprocess_ms > 50, postprocess_ms  # long enough to see a stall, were there one
    assert max(probes) * 1000 < postprocess_ms / 3, (max(probes), postprocess_ms)
