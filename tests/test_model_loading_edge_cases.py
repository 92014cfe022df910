"""Model repository edge cases: what loads, what fails start-up, and how odd graphs batch.

Each case uses real ONNX models (tests/model_builders.py); the end-to-end ones a real server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnx
import orjson
import pytest
from onnx import TensorProto, helper
from onnxruntime.capi.onnxruntime_pybind11_state import Fail

from batch_support import run_alone, run_concurrently
from model_builders import (
    OPSET,
    affine_model,
    broadcast_model,
    detections_model,
    fixed_batch_model,
    flatten_model,
    save,
    zero_hits_model,
)
from podserve.errors import BadRequest, NotFound
from podserve.model_repository import ModelLoadError, ModelRepository, load_repository
from podserve.onnx_model import OnnxModel, ThreadBudget, UnsplittableBatch
from podserve.settings import Settings
from podserve.triton_model_config import triton_config
from server_process import ServerProcess, serve_to_exit

THREADS = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)


def _load(repo: Path) -> ModelRepository:
    return load_repository(repo, Settings(), THREADS)


def _load_one(model: onnx.ModelProto, tmp_path: Path, config: dict | None = None) -> OnnxModel:
    save(model, tmp_path, "m", 1, config)
    return _load(tmp_path).get("m")


def _renamed_dim0(model: onnx.ModelProto, input_name: str, output_name: str) -> onnx.ModelProto:
    """The model with its (single) input's and output's dim 0 named as an exporter names it."""
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = input_name
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = output_name
    return model


def _rows(count: int) -> list[dict[str, np.ndarray]]:
    """Requests of 1 or 2 rows, each with a different pattern of positive values."""
    return [
        {"x": np.array([[i, -1, -1, i % 3]] * (1 + i % 2), np.float32) - 0.5} for i in range(count)
    ]


# --- 1. dim 0 that is not the batch -------------------------------------------------------
@pytest.mark.parametrize(
    "model",
    [detections_model(), flatten_model("n"), flatten_model(None)],
    ids=["num_hits", "flattened", "flattened-unnamed"],
)
def test_outputs_without_a_row_per_input_row_are_not_batched(
    tmp_path: Path, model: onnx.ModelProto
) -> None:
    served = _load_one(model, tmp_path)
    assert not served.batchable and not served.batching
    assert triton_config(served, 256)["max_batch_size"] == 0
    requests = _rows(8)
    outcomes, records = asyncio.run(run_concurrently(served, requests, return_exceptions=True))
    assert all(len(record.requests) == 1 for record in records)
    for request, outcome in zip(requests, outcomes, strict=True):
        expected = run_alone(served, request)
        for name, array in expected.items():
            np.testing.assert_array_equal(outcome.outputs[name], array)


@pytest.mark.parametrize(
    ("input_dim", "output_dim"),
    [
        ("batch", "batch"),
        ("unk__3", "unk__7"),
        ("x_dynamic_axes_1", "y_dynamic_axes_1"),
        ("B", "Addoutput_dim_0"),  # torch.onnx names an output dim that dynamic_axes left out
    ],
    ids=["shared-name", "tf2onnx", "torch-list-axes", "torch-named-output"],
)
def test_a_shared_or_generated_dim_0_name_keeps_batching(
    tmp_path: Path, input_dim: str, output_dim: str
) -> None:
    served = _load_one(_renamed_dim0(affine_model(), input_dim, output_dim), tmp_path)
    assert served.batching


def test_demo_models_and_fixed_shapes_batch_as_before(model_repo: Path) -> None:
    repository = _load(model_repo)
    assert repository.get("tabular").batching  # skl2onnx: dim 0 unnamed everywhere
    assert repository.get("text").batching  # "batch" on inputs and output
    assert repository.get("affine").batching
    assert not repository.get("fixed").batching


def test_fixed_dim_0_is_not_batched(tmp_path: Path) -> None:
    assert not _load_one(fixed_batch_model(), tmp_path).batching


def test_merged_output_without_a_row_per_row_is_rerun_alone_and_batching_stops(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = _load_one(zero_hits_model(), tmp_path)  # the warm-up's zeros cannot tell
    assert served.batching
    requests = [{"x": np.array([[i % 3]] * (1 + i % 2), np.float32)} for i in range(8)]
    with caplog.at_level(logging.WARNING, logger="podserve.onnx_model"):
        outcomes, records = asyncio.run(run_concurrently(served, requests, return_exceptions=True))
    for request, outcome in zip(requests, outcomes, strict=True):
        np.testing.assert_array_equal(outcome.outputs["hits"], run_alone(served, request)["hits"])
    failed = [record for record in records if record.error is not None]
    assert failed and all(isinstance(r.error, UnsplittableBatch) for r in failed)
    assert all(len(r.requests) > 1 for r in failed)
    assert not served.batching
    assert triton_config(served, 256)["max_batch_size"] == 0
    assert [r.message for r in caplog.records if r.name == "podserve.onnx_model"] == [
        "model output has no row per input row: batching turned off"
    ]
    # From now on each request runs alone, once.
    outcomes, records = asyncio.run(run_concurrently(served, requests, return_exceptions=True))
    assert all(len(r.requests) == 1 and r.error is None for r in records)
    assert len(records) == len(requests)


def test_a_single_request_gets_its_output_whole(tmp_path: Path) -> None:
    served = _load_one(zero_hits_model(), tmp_path)
    x = np.array([[0], [5], [0]], np.float32)
    outputs = run_alone(served, {"x": x})
    np.testing.assert_array_equal(outputs["hits"], [[0, 0], [2, 0]])
    assert served.batching  # nothing merged: nothing learnt


# --- 2. `outputs:` in config.yaml must describe the graph ----------------------------------
@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ({"name": "z", "datatype": "FP32", "shape": [-1, 4]}, "is not an output of the model"),
        ({"name": "y", "datatype": "FP64", "shape": [-1, 4]}, "datatype FP64"),
        ({"name": "y", "datatype": "FP32", "shape": [-1, 5]}, "shape [-1, 5]"),
        ({"name": "y", "datatype": "FP32", "shape": [-1]}, "shape [-1]"),
    ],
    ids=["name", "datatype", "fixed-dim", "rank"],
)
def test_configured_outputs_that_disagree_with_the_graph_fail_the_load(
    tmp_path: Path, output: dict, reason: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        _load_one(affine_model(), tmp_path, {"outputs": [output]})
    assert str(tmp_path / "m" / "1" / "model.onnx") in str(caught.value)
    assert reason in str(caught.value)


def test_configured_outputs_may_fix_a_dynamic_dim(tmp_path: Path) -> None:
    output = {"name": "y", "datatype": "FP32", "shape": [2, 4]}
    served = _load_one(affine_model(), tmp_path, {"outputs": [output]})
    assert [spec.shape for spec in served.outputs] == [[2, 4]]


def test_configured_outputs_of_a_rank_ort_cannot_infer_load(tmp_path: Path) -> None:
    """y = Squeeze(x): ORT reports y's shape as [] (its rank depends on the input), which is
    what configuring the output is for; the check refused every configured shape for it."""
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["x"], ["y"])],
        "squeeze",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "m" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    # As exporters write it: onnx's checker (tests' `save`) wants every output's shape.
    onnx.save(helper.make_model(graph, opset_imports=OPSET), path)
    outputs = [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    (tmp_path / "m" / "config.yaml").write_text(orjson.dumps({"outputs": outputs}).decode())
    served = _load(tmp_path).get("m")
    assert [spec.shape for spec in served.outputs] == [[-1, 4]]


def test_a_wrong_output_name_fails_server_start_up(tmp_path: Path) -> None:
    config = {"outputs": [{"name": "z", "datatype": "FP32", "shape": [-1, 4]}]}
    save(affine_model(), tmp_path, "renamed", 1, config)
    status, output = serve_to_exit(tmp_path, {})
    assert status != 0
    assert str(tmp_path / "renamed" / "1" / "model.onnx") in output
    assert "configured output 'z' is not an output of the model" in output


# --- 3. numbers a served config cannot encode ---------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"max_batch_delay_ms": float("inf")},
        {"max_batch_delay_ms": float("nan")},
        {"max_batch_delay_ms": 1e20},
        {"max_batch_delay_ms": 60_000.5},
        {"max_batch_size": 2**64},
        {"max_batch_size": 2**31},
        {"outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2**64]}]},
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [-2, 4]}]},
    ],
    ids=["inf", "nan", "1e20", "delay>1min", "2^64", "2^31", "dim-2^64", "dim-2"],
)
def test_out_of_range_numbers_in_config_fail_the_load(tmp_path: Path, config: dict) -> None:
    with pytest.raises(ModelLoadError, match=r"config\.yaml: invalid model config"):
        _load_one(affine_model(), tmp_path, config)


def test_the_largest_accepted_numbers_still_encode(tmp_path: Path) -> None:
    config = {"max_batch_size": 2**31 - 1, "max_batch_delay_ms": 60_000}
    served = _load_one(affine_model(), tmp_path, config)
    encoded = orjson.loads(orjson.dumps(triton_config(served, 2**31 - 1)))
    # Shown as the largest request the server takes: the per-request row limit, here.
    assert encoded["max_batch_size"] == served.max_rows_per_request
    assert encoded["dynamic_batching"] == {"max_queue_delay_microseconds": 60_000_000}


# --- 4. shape errors ORT raises as `Fail` ------------------------------------------------
def test_a_broadcast_failure_is_the_clients_error(tmp_path: Path) -> None:
    served = _load_one(broadcast_model(), tmp_path)
    with pytest.raises(BadRequest, match="Attempting to broadcast"):
        run_alone(served, {"x": np.ones((1, 2), np.float32)})


@pytest.mark.parametrize(
    "message",
    [
        "[ONNXRuntimeError] : 1 : FAIL : bad allocation",
        # The node's name says Reshape, and the op's type Shape: neither is the client's.
        "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running Reshape "
        "node. Name:'/encoder/Reshape_3' Status Message: Failed to allocate memory for "
        "requested buffer of size 4294967296",
    ],
    ids=["allocation", "allocation-in-a-reshape-node"],
)
def test_other_ort_failures_stay_internal(tmp_path: Path, message: str) -> None:
    served = _load_one(broadcast_model(), tmp_path)

    class FailingSession:
        def run(self, *_: object) -> None:
            raise Fail(message)

    served.session = FailingSession()  # type: ignore[assignment]
    with pytest.raises(Fail):
        run_alone(served, {"x": np.ones((1, 3), np.float32)})


def test_a_request_with_dims_that_do_not_fit_fails_alone(tmp_path: Path) -> None:
    served = _load_one(broadcast_model(), tmp_path)
    good = [{"x": np.full((1 + i % 2, 3), i, np.float32)} for i in range(6)]
    bad = {"x": np.ones((1, 2), np.float32)}
    outcomes, _ = asyncio.run(
        run_concurrently(served, [*good[:3], bad, *good[3:]], return_exceptions=True)
    )
    assert isinstance(outcomes[3], BadRequest)
    for request, outcome in zip(good, outcomes[:3] + outcomes[4:], strict=True):
        np.testing.assert_array_equal(outcome.outputs["y"], request["x"] + [1, 2, 3])


# --- 5, 6. version directories -----------------------------------------------------------
def test_a_model_without_a_numeric_version_fails_the_load(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "good")
    (tmp_path / "typo" / "v1").mkdir(parents=True)
    onnx.save(affine_model(), tmp_path / "typo" / "v1" / "model.onnx")
    with pytest.raises(ModelLoadError, match="version directories must be numbers") as caught:
        _load(tmp_path)
    assert str(tmp_path / "typo" / "v1") in str(caught.value)


def test_a_model_directory_with_no_versions_fails_the_load(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "good")
    (tmp_path / "empty" / "assets").mkdir(parents=True)
    (tmp_path / "empty" / "config.yaml").write_text("max_batch_size: 8\n")  # meant as a model
    with pytest.raises(ModelLoadError, match="version directories must be numbers") as caught:
        _load(tmp_path)
    assert f"{tmp_path / 'empty'}: no version directory" in str(caught.value)
    assert "modelConfigs" not in str(caught.value)  # it has other content: no Helm hint


def test_a_lone_config_yaml_names_the_chart_s_model_configs(tmp_path: Path) -> None:
    """What the chart's modelConfigs entry for a model missing from the image mounts: the
    pod crash-looped on a message that did not say where the directory came from."""
    save(affine_model(), tmp_path, "good")
    (tmp_path / "ghost").mkdir()
    (tmp_path / "ghost" / "config.yaml").write_text("max_batch_size: 8\n")
    with pytest.raises(ModelLoadError, match="Helm modelConfigs entry for a model the image"):
        _load(tmp_path)


def test_a_folder_that_is_no_model_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No config.yaml, no <version>/model.onnx: a tokenizer shared by models, docs. Such
    folders loaded before versions were checked, and must still."""
    save(affine_model(), tmp_path, "good")
    (tmp_path / "shared_tokenizer").mkdir()
    (tmp_path / "shared_tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "docs" / "images").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="podserve.model_repository"):
        assert set(_load(tmp_path).models) == {"good"}
    skipped = [r for r in caplog.records if r.name == "podserve.model_repository"]
    assert [r.directory for r in skipped] == [
        str(tmp_path / "docs"),
        str(tmp_path / "shared_tokenizer"),
    ]  # type: ignore[attr-defined]


def test_hidden_directories_and_stray_files_are_ignored(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "good")
    save(affine_model(), tmp_path, ".hidden")
    (tmp_path / "..data").mkdir()  # a Kubernetes volume's
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "README").write_text("not a model")
    (tmp_path / "good" / "..data").mkdir()
    (tmp_path / "good" / "tokenizer").mkdir()  # files a processor may need, no model.onnx
    (tmp_path / "good" / "notes.txt").write_text("x")
    repository = _load(tmp_path)
    assert {name: sorted(s.versions) for name, s in repository.models.items()} == {"good": ["1"]}


def test_versions_are_numbers_not_strings(tmp_path: Path) -> None:
    save(affine_model(3.0, 0.0), tmp_path, "m", 2)
    shutil.move(tmp_path / "m" / "2", tmp_path / "m" / "02")
    save(affine_model(2.0, 1.0), tmp_path, "m", 10)
    repository = _load(tmp_path)
    served = repository.models["m"]
    assert sorted(served.versions, key=int) == ["2", "10"]
    assert served.get("2").version == "2" and served.get("02") is served.get("2")
    assert repository.get("m").version == "10"
    with pytest.raises(NotFound):
        served.get("3")


def test_two_directories_for_one_version_fail_the_load(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "m", 1)
    shutil.copytree(tmp_path / "m" / "1", tmp_path / "m" / "01")
    with pytest.raises(ModelLoadError, match="'01' and '1' are both version 1"):
        _load(tmp_path)


def test_a_typo_version_directory_fails_server_start_up(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "good")
    (tmp_path / "typo" / "v1").mkdir(parents=True)
    onnx.save(affine_model(), tmp_path / "typo" / "v1" / "model.onnx")
    status, output = serve_to_exit(tmp_path, {})
    assert status != 0
    assert f"{tmp_path / 'typo' / 'v1'}: version directories must be numbers" in output


# --- end to end ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edge_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    repo = tmp_path_factory.mktemp("edge-models")
    save(detections_model(), repo, "detect")
    save(flatten_model("n"), repo, "flat")
    save(flatten_model(None), repo, "flat_unnamed")
    save(broadcast_model(), repo, "bcast")
    save(affine_model(), repo, "leading0", 1)
    shutil.move(repo / "leading0" / "1", repo / "leading0" / "01")
    with ServerProcess(repo, workers=1, env={"PODSERVE_POOL_THREADS": "1"}) as server:
        yield server


def _infer(http: httpx.Client, model: str, x: list[float], rows: int = 1) -> httpx.Response:
    body = {
        "inputs": [{"name": "x", "shape": [rows, len(x) // rows], "datatype": "FP32", "data": x}]
    }
    return http.post(f"/v2/models/{model}/infer", json=body)


@pytest.mark.parametrize("model", ["detect", "flat", "flat_unnamed"])
def test_concurrent_requests_get_the_answers_they_get_alone(
    edge_server: ServerProcess, model: str
) -> None:
    def row(i: int) -> list[float]:
        return [float(i), -1.0, -1.0, float(i % 3)]

    with httpx.Client(base_url=edge_server.url, timeout=30) as http:
        alone = {i: _infer(http, model, row(i)).json()["outputs"] for i in range(1, 13)}
        metadata = http.get(f"/v2/models/{model}").json()
    assert metadata["parameters"]["batching"] is False  # the warm-up found no row per row

    def hammer(i: int) -> list[tuple[int, object]]:
        with httpx.Client(base_url=edge_server.url, timeout=30) as http:
            answers = []
            for _ in range(15):
                response = _infer(http, model, row(i))
                answers.append((response.status_code, response.json().get("outputs")))
            return answers

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = dict(zip(range(1, 13), pool.map(hammer, range(1, 13)), strict=True))
    for i, answers in results.items():
        assert answers == [(200, alone[i])] * len(answers), f"row {i}"


def test_a_broadcast_mismatch_is_a_400_with_orts_message(edge_server: ServerProcess) -> None:
    with httpx.Client(base_url=edge_server.url, timeout=30) as http:
        bad = _infer(http, "bcast", [1.0, 2.0])
        good = _infer(http, "bcast", [1.0, 2.0, 3.0])
    assert bad.status_code == 400
    assert "Attempting to broadcast an axis by a dimension other than 1" in bad.json()["error"]
    assert good.status_code == 200 and good.json()["outputs"][0]["data"] == [2.0, 4.0, 6.0]
    assert "Exception in ASGI application" not in edge_server.logs()


def test_a_leading_zero_version_is_served_as_its_number(edge_server: ServerProcess) -> None:
    with httpx.Client(base_url=edge_server.url, timeout=30) as http:
        metadata = http.get("/v2/models/leading0").json()
        by_number = http.get("/v2/models/leading0/versions/1")
        as_written = http.get("/v2/models/leading0/versions/01")
        huge = http.get("/v2/models/leading0/versions/" + "9" * 5000)  # int() refuses 4300+
    assert metadata["versions"] == ["1"]
    assert by_number.status_code == 200 and as_written.status_code == 200
    assert huge.status_code == 404, huge.text
