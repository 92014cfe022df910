"""The official Triton HTTP client (binary tensor extension by default) against podserve."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server_process import ServerProcess


@pytest.fixture()
def triton_client(server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}")


def test_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("tabular")
    assert triton_client.is_model_ready("affine", "1")
    assert not triton_client.is_model_ready("missing")
    meta = triton_client.get_model_metadata("tabular")
    assert meta["inputs"][0]["name"] == "input"


def test_model_config_as_triton_reports_it(triton_client: triton.InferenceServerClient) -> None:
    tabular = triton_client.get_model_config("tabular")
    assert tabular["max_batch_size"] == 64  # batched: dims leave out the batch dimension
    assert tabular["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "dims": [30], "format": "FORMAT_NONE"}
    ]
    assert {o["name"]: (o["data_type"], o["dims"]) for o in tabular["output"]} == {
        "label": ("TYPE_INT64", []), "probabilities": ("TYPE_FP32", [2])
    }  # fmt: skip
    assert tabular["dynamic_batching"] == {"max_queue_delay_microseconds": 2000}
    assert tabular["platform"] == "onnxruntime_onnx"
    text = triton_client.get_model_config("text")
    assert text["input"][0]["data_type"] == "TYPE_STRING" and text["input"][0]["dims"] == []
    assert triton_client.get_model_config("affine", "1")["max_batch_size"] == 16
    mixed = triton_client.get_model_config("mixed")
    assert [(i["data_type"], i["dims"]) for i in mixed["input"]] == [
        ("TYPE_INT64", [2]), ("TYPE_FP64", []), ("TYPE_BOOL", [3])
    ]  # fmt: skip
    fixed = triton_client.get_model_config("fixed")  # no batch dimension: served unbatched
    assert fixed["max_batch_size"] == 0 and fixed["input"][0]["dims"] == [1, 3]
    assert "dynamic_batching" not in fixed
    for name, version in (("missing", ""), ("affine", "7")):
        with pytest.raises(InferenceServerException) as err:
            triton_client.get_model_config(name, version)
        assert err.value.status() == "404"


def test_repository_index_and_model_control(triton_client: triton.InferenceServerClient) -> None:
    index = triton_client.get_model_repository_index()
    assert {"name": "affine", "version": "2", "state": "READY"} in index
    assert {entry["name"] for entry in index} >= {"affine", "tabular", "text"}
    with pytest.raises(InferenceServerException, match="roll out a new revision") as refused:
        triton_client.load_model("tabular")
    assert refused.value.status() == "400"
    with pytest.raises(InferenceServerException, match="does not unload models"):
        triton_client.unload_model("tabular")


@pytest.mark.parametrize("call", ["load_model", "unload_model"])
def test_model_control_of_an_unknown_model_is_the_same_400(
    triton_client: triton.InferenceServerClient, call: str
) -> None:
    """Triton in model control mode NONE refuses a load or unload before it looks the name
    up; podserve answered an unknown name 404, which told a client to fix the name and retry."""
    with pytest.raises(InferenceServerException) as refused:
        getattr(triton_client, call)("not-a-model")
    assert refused.value.status() == "400"
    message = refused.value.message()
    assert "roll out a new revision" in message
    assert "model 'not-a-model' is not among them" in message and "/v2/repository/index" in message


@pytest.mark.parametrize("binary", [True, False])
def test_tabular_round_trip(triton_client: triton.InferenceServerClient, binary: bool) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rows = data.data[:16].astype(np.float32)
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        triton.InferRequestedOutput("label", binary_data=binary),
        triton.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = triton_client.infer("tabular", [tensor], outputs=outputs, request_id="t-1")
    assert result.get_response()["id"] == "t-1"
    np.testing.assert_array_equal(result.as_numpy("label"), data.target[:16])
    assert result.as_numpy("probabilities").shape == (16, 2)


def test_bytes_tensor_binary(triton_client: triton.InferenceServerClient) -> None:
    texts = np.array(["binary strings", "ünïcödé 🚀"], dtype=object)
    tensor = triton.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(texts)  # binary by default: length-prefixed UTF-8
    result = triton_client.infer("text", [tensor])  # no outputs: all returned as binary
    embedding = result.as_numpy("embedding")
    assert embedding.shape == (2, 32) and embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-5)


def test_all_numeric_types_binary(triton_client: triton.InferenceServerClient) -> None:
    ids = triton.InferInput("ids", [2, 2], "INT64")
    ids.set_data_from_numpy(np.array([[1, 2], [3, 40]], dtype=np.int64))
    weights = triton.InferInput("weights", [2], "FP64")
    weights.set_data_from_numpy(np.array([0.5, -1.5]))
    flags = triton.InferInput("flags", [2, 3], "BOOL")
    flags.set_data_from_numpy(np.array([[True, False, True], [False, False, False]]))
    result = triton_client.infer("mixed", [ids, weights, flags])
    np.testing.assert_array_equal(result.as_numpy("id_sum"), [3, 43])
    np.testing.assert_array_equal(result.as_numpy("doubled"), [1.0, -3.0])
    np.testing.assert_array_equal(
        result.as_numpy("inverted"), [[False, True, False], [True, True, True]]
    )


def test_errors_surface_with_status(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("x", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 3), np.float32))
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer("affine", [tensor])
    assert error.value.status() == "400"
    assert "model expects 4" in error.value.message()
    with pytest.raises(InferenceServerException) as missing:
        triton_client.infer("missing", [tensor])
    assert missing.value.status() == "404"


def test_request_timeout_is_the_deadline(triton_client: triton.InferenceServerClient) -> None:
    """tritonclient's `timeout` (microseconds) bounds the request as X-Podserve-Timeout-Ms does:
    1 us has passed before any batch runs (504); a minute leaves the answer unchanged."""
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    with pytest.raises(InferenceServerException) as late:
        triton_client.infer("affine", [tensor], timeout=1)
    assert late.value.status() == "504"
    result = triton_client.infer("affine", [tensor], timeout=60_000_000)
    assert result.as_numpy("y").shape == (1, 4)
