"""Triton's classification extension: an output returned as its top classes.

A requested output with `"parameters": {"classification": k}` (tritonclient's
`InferRequestedOutput(name, class_count=k)`) comes back as BYTES with its last dimension
replaced by k: the k highest values along it, highest first (ties: lower index first), each
as "<value>:<index>" or "<value>:<index>:<label>" when the model's config names labels for
that output (`labels:` in config.yaml, a list or a file with one label per line, as Triton's
`label_filename`). As in Triton, k larger than the number of classes returns them all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from podserve.errors import BadRequest
from podserve.model_config import TensorSpec

NOT_NUMERIC = ("BYTES", "BOOL")


def class_count(params: dict, output: str) -> int | None:
    """The requested number of classes, or None if the output is wanted as a tensor."""
    count = params.get("classification")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BadRequest(f"output '{output}': 'classification' must be a positive integer")
    return count


def check_classifiable(spec: TensorSpec) -> None:
    """Before inference: a request that cannot be answered must not use the model.

    A dynamic first dimension is the batch (as for batching), not a class dimension."""
    class_dims = len(spec.shape) - (1 if spec.shape and spec.shape[0] == -1 else 0)
    if spec.datatype in NOT_NUMERIC or class_dims < 1:
        raise BadRequest(
            f"output '{spec.name}' ({spec.datatype}, shape {spec.shape}) cannot be returned as "
            "a classification: it needs a numeric output with a class dimension"
        )


def top_classes(array: np.ndarray, count: int, labels: list[str] | None) -> np.ndarray:
    """[..., classes] -> [..., min(count, classes)] of "value:index[:label]" strings."""
    classes = array.shape[-1]
    k = min(count, classes)
    # Stable ascending sort of the reversed axis, read backwards: highest value first and,
    # among equal values, the lower index first.
    order = classes - 1 - np.argsort(array[..., ::-1], axis=-1, kind="stable")[..., ::-1]
    if array.dtype.kind == "f" and np.isnan(array).any():  # NaN is no high score: rank it last
        is_nan = np.isnan(np.take_along_axis(array, order, axis=-1))
        order = np.take_along_axis(order, np.argsort(is_nan, axis=-1, kind="stable"), axis=-1)
    index = order[..., :k]
    values = np.take_along_axis(array, index, axis=-1)
    out = np.empty(index.shape, dtype=object)
    flat_out, flat_index, flat_values = out.reshape(-1), index.reshape(-1), values.reshape(-1)
    floats = array.dtype.kind == "f"
    for i, (value, idx) in enumerate(zip(flat_values, flat_index.tolist(), strict=True)):
        # The shortest text that reads back as the same value of the output's own type.
        number = np.format_float_positional(value, trim="-") if floats else str(value)
        text = f"{number}:{idx}"
        if labels is not None and idx < len(labels):
            text = f"{text}:{labels[idx]}"
        flat_out[i] = text
    return out


def load_labels(
    config: dict[str, list[str] | str], model_dir: Path, outputs: set[str]
) -> dict[str, list[str]]:
    """Labels per output from the model config; a string names a file in the model's dir."""
    labels: dict[str, list[str]] = {}
    for output, source in config.items():
        if output not in outputs:
            raise ValueError(f"labels given for unknown output '{output}'; outputs: {outputs}")
        if isinstance(source, str):
            path = model_dir / source
            if not path.is_file():
                raise ValueError(f"label file {path} for output '{output}' does not exist")
            source = path.read_text(encoding="utf-8").splitlines()
        labels[output] = list(source)
    return labels
