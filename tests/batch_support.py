"""Running requests through a real Batcher, merged or one at a time, for batching tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from podserve.batcher import Batcher, BatchRecord, QueueBudget
from podserve.inference_pool import InferencePool
from podserve.onnx_model import OnnxModel


async def run_concurrently(
    model: OnnxModel,
    requests: list[dict[str, np.ndarray]],
    max_queue_rows: int = 4096,
    return_exceptions: bool = False,
) -> tuple[list, list[BatchRecord]]:
    """Submit all requests at once to one batcher with one inference thread: they merge."""
    records: list[BatchRecord] = []
    batcher = Batcher(model, InferencePool(1), QueueBudget(max_queue_rows, 1), [records.append])
    batcher.start()
    try:
        validated = [model.validate(request) for request in requests]
        outcomes = await asyncio.gather(
            *(batcher.submit(inputs, rows) for inputs, rows in validated),
            return_exceptions=return_exceptions,
        )
    finally:
        await batcher.stop()
    return outcomes, records


def run_alone(model: OnnxModel, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One request's outputs from a session run of its own."""
    inputs, rows = model.validate(request)
    return model.run_batch([inputs], [rows]).outputs[0]


async def until(condition: Callable[[], bool]) -> None:
    """Poll `condition` every millisecond, for up to ~3 s (a test's batcher state)."""
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")
