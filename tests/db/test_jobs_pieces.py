"""Durable jobs run in pieces: a job of a model the batcher merges requests for runs as
session runs of at most the model's max_batch_size rows, each awaiting the inference thread
at BACKGROUND priority, so an online request waits for one piece, not for the whole job (one
1,024-row run held the only thread for 6.5 s). The pieces' outputs, concatenated, are what
one run makes; a model whose requests run alone still runs a job whole.

The runner runs in this process against the module's PostgreSQL and a real ServingRuntime
(ONNX Runtime, one inference thread).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import pytest
from job_harness import Harness, job_body, job_harness

import postgres
from model_builders import affine_model, detections_model, save, slow_model, zero_hits_model

KNOBS = {"jobs_concurrency": 1, "pool_threads": 1}
PIECE = 8  # max_batch_size of the slow models
FINISHED = ("succeeded", "failed")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("piece-models")
    save(affine_model(2.0, 1.0), repo, "affine", 1, {"max_batch_size": 16})
    save(slow_model(), repo, "slow", 1, {"max_batch_size": PIECE})  # ~10 ms of CPU a row
    save(slow_model(), repo, "slow_alone", 1, {"max_batch_size": PIECE, "batching": False})
    # Outputs without a row per input row: the warm-up serves it unbatched.
    save(detections_model(), repo, "detections", 1, {"max_batch_size": 2})
    # The warm-up's zeros give a row per row: batched, until real rows show otherwise.
    save(zero_hits_model(), repo, "zero_hits", 1, {"max_batch_size": 2})
    return repo


@pytest.fixture(autouse=True)
def _empty_queue(db_url: str) -> None:
    postgres.query(db_url, "TRUNCATE podserve_jobs")


@dataclass
class Call:
    rows: int  # of the session run
    started: float
    ended: float = 0.0


def _record_runs(h: Harness, after: Callable[[], None] | None = None) -> list[Call]:
    """The job's session runs (online batches take the pool's slots another way)."""
    calls: list[Call] = []
    real_run = h.runtime.pool.run

    async def recorded(fn: Any, *args: Any, priority: int) -> Any:
        call = Call(args[1][0], time.perf_counter())
        calls.append(call)
        try:
            return await real_run(fn, *args, priority=priority)
        finally:
            call.ended = time.perf_counter()
            if after is not None:
                after()

    h.runtime.pool.run = recorded  # type: ignore[method-assign]
    return calls


async def _until(done: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def _one_run(models: Path, model: str, x: np.ndarray) -> list[np.ndarray]:
    """The whole input through ONNX Runtime at once."""
    session = ort.InferenceSession(str(models / model / "1" / "model.onnx"))
    return session.run(None, {"x": x})


def _outputs(result: bytes) -> list[np.ndarray]:
    outputs = orjson.loads(result)["outputs"]
    return [np.array(out["data"]).reshape(out["shape"]) for out in outputs]


async def _run_job(models: Path, db_url: str, model: str, x: np.ndarray) -> dict[str, Any]:
    async with job_harness(db_url, models, **KNOBS) as h:
        calls = _record_runs(h)
        job = await h.store.submit(model, "1", job_body(x.tolist()), None)
        h.runner.start()
        row = await h.finished(job)
        return {"row": row, "pieces": [call.rows for call in calls]}


def test_online_requests_wait_for_one_piece_of_a_job_not_the_whole_job(
    db_url: str, models: Path
) -> None:
    """With one inference thread, online requests of another model are sent one after the
    other while a 96-row job of the slow model runs (12 pieces of 8 rows). Each waits in the
    queue for at most about one piece: never a quarter of the job's run (before: the first
    one waited for nearly the whole job)."""
    rows = 12 * PIECE
    x = np.random.default_rng(1).uniform(-1, 1, (rows, 256)).astype(np.float32)

    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models, **KNOBS) as h:
            calls = _record_runs(h)
            affine = h.runtime.model("affine", "1")
            online, online_rows = affine.validate({"x": np.ones((1, 4), np.float32)}, values=False)
            job = await h.store.submit("slow", "1", job_body(x.tolist()), None)
            h.runner.start()
            assert await _until(lambda: bool(calls))  # the job's first session run
            waits: list[float] = []
            while (await h.row(job))["status"] not in FINISHED:
                outcome = await h.runtime.infer(affine, online, online_rows, None)
                waits.append(outcome.queue_s)
                await asyncio.sleep(0.02)
            return {
                "row": await h.row(job),
                "waits": waits,
                "pieces": [call.rows for call in calls],
                "job_s": calls[-1].ended - calls[0].started,
            }

    result = postgres.run(scenario())
    assert result["row"]["status"] == "succeeded", result["row"]["error"]
    waits, job_s = result["waits"], result["job_s"]
    assert waits, result
    assert max(waits) < job_s / 4, (max(waits), job_s, result["pieces"])  # ~job_s / 12
    assert len(waits) >= 4, (waits, job_s)  # answered all along the job
    assert result["pieces"] == [PIECE] * 12, result["pieces"]


def test_a_job_run_in_pieces_gives_what_one_run_gives(db_url: str, models: Path) -> None:
    """21 rows in pieces of 8, 8 and 5: the stored outputs are the whole input's, in order."""
    x = np.random.default_rng(2).uniform(-1, 1, (21, 256)).astype(np.float32)
    result = postgres.run(_run_job(models, db_url, "slow", x))
    row = result["row"]
    assert row["status"] == "succeeded", row["error"]
    assert result["pieces"] == [8, 8, 5], result["pieces"]
    (got,) = _outputs(row["result"])
    (want,) = _one_run(models, "slow", x)
    assert got.shape == want.shape == (21, 256)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("model", "x"),
    [
        # batching: false in its config: every request runs alone
        ("slow_alone", np.random.default_rng(3).uniform(-1, 1, (20, 256)).astype(np.float32)),
        # a detector's hits: no row per input row (the warm-up finds out)
        ("detections", np.array([[1, -1, 0, 2], [0, 0, 0, 0], [3, 3, -3, 3]] * 2, np.float32)),
    ],
)
def test_a_model_that_runs_requests_alone_runs_a_job_whole(
    db_url: str, models: Path, model: str, x: np.ndarray
) -> None:
    result = postgres.run(_run_job(models, db_url, model, x))
    row = result["row"]
    assert row["status"] == "succeeded", row["error"]
    assert result["pieces"] == [len(x)], result["pieces"]
    for got, want in zip(_outputs(row["result"]), _one_run(models, model, x), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pieces_without_a_row_per_row_are_run_again_as_one(db_url: str, models: Path) -> None:
    """zero_hits batches (the warm-up's zeros give one hit a row), but real rows do not: the
    pieces' hits cannot be put together (their row numbers count from each piece's start),
    so the job runs again whole and stores one run's hits."""
    x = np.array([[0], [1], [0], [0], [5]], np.float32)
    result = postgres.run(_run_job(models, db_url, "zero_hits", x))
    row = result["row"]
    assert row["status"] == "succeeded", row["error"]
    assert result["pieces"] == [2, 2, 1, 5], result["pieces"]
    (got,) = _outputs(row["result"])
    (want,) = _one_run(models, "zero_hits", x)
    np.testing.assert_array_equal(got, want)  # [[0, 0], [2, 0], [3, 0]]


def test_a_lease_lost_between_two_pieces_runs_no_further_piece(db_url: str, models: Path) -> None:
    """The renewer finds the lease lost after the first piece: no further piece runs, and
    the attempt is discarded (neither failed nor requeued)."""
    x = np.random.default_rng(4).uniform(-1, 1, (4 * PIECE, 256)).astype(np.float32)

    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models, **KNOBS) as h:

            def lose_lease() -> None:
                for key in list(h.runner.running):
                    h.runner._abandon(key)  # as the renewer does on a lost lease

            calls = _record_runs(h, after=lose_lease)
            job: uuid.UUID = await h.store.submit("slow", "1", job_body(x.tolist()), None)
            h.runner.start()
            assert await _until(lambda: h.runner.results_discarded == 1)
            await _until(lambda: not h.runner.running, timeout=2)
            return {
                "pieces": [call.rows for call in calls],
                "row": await h.row(job),
                "counts": (h.runner.jobs_failed, h.runner.jobs_requeued),
            }

    result = postgres.run(scenario())
    assert result["pieces"] == [PIECE], result["pieces"]
    assert result["row"]["status"] == "running", result  # left to whoever holds it now
    assert result["counts"] == (0, 0), result
