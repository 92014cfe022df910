"""A served model as Triton's model configuration (`GET /v2/models/{name}/config`).

tritonclient's `get_model_config()` and the tools built on it (perf_analyzer, the client
examples) read `max_batch_size` and the tensors' `dims` from it to shape their requests.
Triton's convention applies: a model that batches reports its `max_batch_size` and dims
without the batch dimension; one that does not reports 0 and its full shapes. Only fields
with a true value here are filled in (no instance groups or optimisation settings: podserve
sizes its workers and threads from the pod's CPU quota, see the README's "How a request
flows").
"""

from __future__ import annotations

from typing import Any

from podserve.model_config import TensorSpec
from podserve.onnx_model import OnnxModel

PLATFORM = "onnxruntime_onnx"  # also the V2 model metadata's `platform`
# Open Inference Protocol datatype -> Triton's model-config enum (BYTES is TYPE_STRING).
TRITON_TYPES = {"BYTES": "TYPE_STRING"}


def triton_config(model: OnnxModel, queue_rows: int) -> dict[str, Any]:
    """`queue_rows`: the worker's queue bound, which no request may exceed (413), whatever
    the model's own `max_batch_size`: clients size their requests from the value shown."""
    batched = model.batching
    largest = min(model.max_batch_size, model.max_rows_per_request, queue_rows)

    def tensor(spec: TensorSpec) -> dict[str, Any]:
        dims = spec.shape[1:] if batched else spec.shape
        return {
            "name": spec.name,
            "data_type": TRITON_TYPES.get(spec.datatype, f"TYPE_{spec.datatype}"),
            "dims": dims,
        }

    config: dict[str, Any] = {
        "name": model.name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"all": {}},  # every version in the repository is served
        "max_batch_size": largest if batched else 0,
        "input": [tensor(spec) | {"format": "FORMAT_NONE"} for spec in model.inputs],
        "output": [tensor(spec) for spec in model.outputs],
        "default_model_filename": model.path.name,
    }
    if batched:
        delay_us = round(model.max_batch_delay_s * 1e6)
        config["dynamic_batching"] = {"max_queue_delay_microseconds": delay_us}
    return config
