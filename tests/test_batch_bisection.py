"""A batch whose session run fails is rerun in halves, not one request at a time: one bad
request among n costs ~2*log2(n) more runs, and every request is answered once. Where both
halves fail (most of the batch is bad) their requests run alone: never twice the runs."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from batch_support import until
from podserve.batcher import Batcher, BatchRecord, QueueBudget
from podserve.errors import BadRequest
from podserve.inference_pool import InferencePool
from podserve.model_repository import load_repository
from podserve.onnx_model import OnnxModel, ThreadBudget
from podserve.settings import Settings

THREADS = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)
REQUESTS = 16  # the affine_repo model's max_batch_size: one batch


@pytest.fixture
def model(affine_repo: Path) -> OnnxModel:
    """y = 2x + 1 on [batch, 4]; a fresh load per test, since tests wrap its run_batch."""
    return load_repository(affine_repo, Settings(), THREADS).get("affine", "1")


def _run_batch_of(
    model: OnnxModel, bad: set[int], monkeypatch: pytest.MonkeyPatch
) -> tuple[list, list[int], list[BatchRecord]]:
    """REQUESTS one-row requests in one batch, those at `bad` of the wrong dtype (FP64: ONNX
    Runtime fails any run they are in); the results, each session run's request count, and
    what the observers saw."""
    run_batch, runs = model.run_batch, []

    def counting(inputs: list, rows: list, *options: object) -> object:
        runs.append(len(inputs))
        return run_batch(inputs, rows, *options)

    monkeypatch.setattr(model, "run_batch", counting)

    async def scenario() -> tuple[list, list[BatchRecord]]:
        records: list[BatchRecord] = []
        pool = InferencePool(1)
        batcher = Batcher(model, pool, QueueBudget(100, 1), [records.append])
        batcher.start()
        await pool.acquire()  # all of them queue into one batch
        requests = [
            ({"x": np.full((1, 4), i, np.float64)}, 1)
            if i in bad
            else model.validate({"x": np.full((1, 4), i, np.float32)})
            for i in range(REQUESTS)
        ]
        tasks = [asyncio.ensure_future(batcher.submit(*request)) for request in requests]
        await until(lambda: batcher.queued_rows == REQUESTS)
        pool.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results, records

    results, records = asyncio.run(scenario())
    return results, runs, records


def _assert_answers(results: list, bad: set[int], records: list[BatchRecord]) -> None:
    """Good requests get x * 2 + 1, bad ones their 400; each ran once in a successful run or
    failed once alone."""
    for index, result in enumerate(results):
        if index in bad:
            assert isinstance(result, BadRequest), result
            assert "rejected the input" in str(result)
        else:
            np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), index * 2 + 1))
    answered = [
        int(item.inputs["x"][0, 0])
        for record in records
        if record.error is None or len(record.requests) == 1
        for item in record.requests
    ]
    assert sorted(answered) == list(range(REQUESTS))  # once each


def test_one_bad_request_costs_about_two_log_n_reruns_not_n(
    model: OnnxModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    results, runs, records = _run_batch_of(model, {11}, monkeypatch)
    _assert_answers(results, {11}, records)
    bound = 1 + 2 * math.ceil(math.log2(REQUESTS))  # the failed batch, then 2 runs a level
    assert len(runs) <= bound and len(runs) < REQUESTS, runs
    # Halves of contiguous requests, in batch order: [0, 8) runs; [8, 16) fails, ...
    assert runs == [16, 8, 8, 4, 4, 2, 2, 1, 1]
    assert [len(r.requests) for r in records if r.error is not None] == [16, 8, 4, 2, 1]
    assert len(records) == len(runs)  # every session run reached the observers


def test_two_bad_requests_in_one_half_are_found_and_every_good_one_answered_once(
    model: OnnxModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = {9, 14}
    results, runs, records = _run_batch_of(model, bad, monkeypatch)
    _assert_answers(results, bad, records)
    # [0, 8) runs; [8, 16) fails; both its quarters fail: their 8 requests run alone.
    assert runs == [16, 8, 8, 4, 4] + [1] * 8, runs
    assert len(records) == len(runs)


@pytest.mark.parametrize("bad", [set(range(REQUESTS)), {0, 15}])
def test_a_mostly_bad_batch_costs_at_most_two_runs_more_than_each_alone(
    model: OnnxModel, monkeypatch: pytest.MonkeyPatch, bad: set[int]
) -> None:
    """Halving on would cost up to 2n - 2 reruns (30 for 16 bad requests); both halves
    failing sends their requests to run alone."""
    results, runs, records = _run_batch_of(model, bad, monkeypatch)
    _assert_answers(results, bad, records)
    assert runs == [16, 8, 8] + [1] * REQUESTS, runs
    assert len(records) == len(runs)
