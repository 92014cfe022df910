"""Tiny ONNX models for tests, built with onnx.helper in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def save(
    model: onnx.ModelProto, repo: Path, name: str, version: int = 1, config: dict | None = None
) -> Path:
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    if config is not None:
        (repo / name / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def affine_model(scale: float = 2.0, offset: float = 1.0, width: int = 4) -> onnx.ModelProto:
    """y = x * scale + offset, FP32 [batch, width]."""
    nodes = [helper.make_node("Mul", ["x", "s"], ["t"]), helper.make_node("Add", ["t", "o"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        [
            numpy_helper.from_array(np.array(scale, np.float32), "s"),
            numpy_helper.from_array(np.array(offset, np.float32), "o"),
        ],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def slow_model(size: int = 256, layers: int = 24) -> onnx.ModelProto:
    """x [batch, size] -> [batch, size, size] through `layers` MatMul+Tanh: ms of CPU per row."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    ones = np.ones((size, size), np.float32)
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis1"], ["x3"]),
        helper.make_node("Mul", ["x3", "ones"], ["h"]),
    ]
    previous = "h"
    for i in range(layers):
        nodes += [
            helper.make_node("MatMul", [previous, "w"], [f"m{i}"]),
            helper.make_node("Tanh", [f"m{i}"], [f"h{i}"]),
        ]
        previous = f"h{i}"
    nodes.append(helper.make_node("ReduceMean", [previous], ["y"], axes=[2], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(ones, "ones"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        ],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def save_slow_start_models(repo: Path, count: int = 120) -> Path:
    """`count` slow models: loading and warming them up takes a worker about a second."""
    for index in range(count):
        save(slow_model(), repo, f"slow{index}")
    return repo


def mixed_types_model() -> onnx.ModelProto:
    """ids INT64 [batch, 2], weights FP64 [batch], flags BOOL [batch, 3] -> three outputs."""
    nodes = [
        helper.make_node("ReduceSum", ["ids", "axes"], ["id_sum"], keepdims=0),
        helper.make_node("Mul", ["weights", "two"], ["doubled"]),
        helper.make_node("Not", ["flags"], ["inverted"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mixed",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2]),
            helper.make_tensor_value_info("weights", TensorProto.DOUBLE, ["batch"]),
            helper.make_tensor_value_info("flags", TensorProto.BOOL, ["batch", 3]),
        ],
        [
            helper.make_tensor_value_info("id_sum", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("doubled", TensorProto.DOUBLE, ["batch"]),
            helper.make_tensor_value_info("inverted", TensorProto.BOOL, ["batch", 3]),
        ],
        [
            numpy_helper.from_array(np.array([1], np.int64), "axes"),
            numpy_helper.from_array(np.array(2.0, np.float64), "two"),
        ],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def fixed_batch_model() -> onnx.ModelProto:
    """x FP32 [1, 3] (no dynamic batch dim): served unbatched."""
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def flatten_model(dim_name: str | None = "n") -> onnx.ModelProto:
    """x FP32 [batch, 4] -> y = x flattened, FP32 [n]: 4 values per row, not one row per row.
    `dim_name=None` leaves y's dim 0 unnamed, so the load cannot tell it from the batch."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "flatten",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim_name])],
        [numpy_helper.from_array(np.array([-1], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def _hits_model(test: str, width: int, hits_dim: str | None) -> onnx.ModelProto:
    """x FP32 [batch, width] -> hits INT64 [hits_dim, 2]: (row, col) of each value for which
    `test` (an ONNX comparison with 0) holds, as a detector lists its boxes."""
    nodes = [
        helper.make_node(test, ["x", "zero"], ["chosen"]),
        helper.make_node("NonZero", ["chosen"], ["where"]),
        helper.make_node("Transpose", ["where"], ["hits"], perm=[1, 0]),
    ]
    graph = helper.make_graph(
        nodes,
        f"hits_{test.lower()}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("hits", TensorProto.INT64, [hits_dim, 2])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def detections_model() -> onnx.ModelProto:
    """x FP32 [batch, 4] -> hits INT64 [num_hits, 2]: the positive values, any number of rows
    per input row."""
    return _hits_model("Greater", 4, "num_hits")


def zero_hits_model() -> onnx.ModelProto:
    """x FP32 [batch, 1] -> hits INT64 [?, 2]: the zeros. The warm-up's zeros give one hit per
    row, so only a merged run of real rows shows that it has no row per row."""
    return _hits_model("Equal", 1, None)


def broadcast_model() -> onnx.ModelProto:
    """y = x + [1, 2, 3], x FP32 [batch, n]: n must be 1 or 3, which only the run finds out."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "broadcast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "n"])],
        [numpy_helper.from_array(np.array([1, 2, 3], np.float32), "c")],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def build_test_repository(repo: Path) -> Path:
    """affine (v1 and v2), slow, mixed, fixed: every shape of model the tests need."""
    save(affine_model(2.0, 1.0), repo, "affine", 1, {"max_batch_size": 16})
    save(affine_model(3.0, 0.0), repo, "affine", 2)
    save(slow_model(), repo, "slow", 1, {"max_batch_size": 8})
    save(mixed_types_model(), repo, "mixed", 1)
    save(fixed_batch_model(), repo, "fixed", 1)
    return repo
