"""A failure in one background duty must not silently stop another.

The pod-settings follower logs a change it cannot apply (naming the setting) and keeps
following; its stop never raises the loop's failure; and the lifespan's shutdown runs each
step (follower, runtime: prediction-log flush, jobs' requeue, batchers, pool; observability)
even if one before it raises, logging each failure with its step's name. A batch observer
(runtime.batch_observers) that raises on a failed batch's rerun path neither keeps the
inference slot (one thread: the worker would hang) nor leaves the batch's requests unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batch_support import until
from model_builders import affine_model, save
from podserve import pod_settings
from podserve.app import create_app
from podserve.batcher import Batcher, BatchRecord, QueueBudget
from podserve.errors import BadRequest
from podserve.inference_pool import InferencePool
from podserve.model_repository import load_repository
from podserve.observability import Observability
from podserve.onnx_model import ThreadBudget
from podserve.runtime import ServingRuntime
from podserve.settings import Settings


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records() -> list[logging.LogRecord]:
    handler = _Records()
    logger = logging.getLogger("podserve")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_the_follower_logs_a_failing_apply_and_keeps_following(
    monkeypatch: pytest.MonkeyPatch, records: list[logging.LogRecord]
) -> None:
    monkeypatch.setattr(pod_settings, "FOLLOW_INTERVAL_S", 0.02)
    applied: list[tuple[int, ...]] = []

    def apply(values: tuple[int, ...]) -> None:
        applied.append(values)
        if values == (7,):
            raise ValueError("a value this worker cannot apply")

    setting = pod_settings.PodSetting("test-bad-apply", 1, apply)
    monkeypatch.setattr(pod_settings, "_SETTINGS", [setting])  # this test's setting only

    async def scenario() -> tuple[bool, str | None]:
        follower = pod_settings.Follower()
        follower.start()
        await asyncio.sleep(0.05)
        setting.shared.write((7,))  # another worker publishes what this one cannot apply
        await asyncio.sleep(0.15)
        setting.shared.write((8,))  # a later change is still followed
        await asyncio.sleep(0.15)
        assert follower._task is not None
        alive = not follower._task.done()
        try:
            await follower.stop()
        except Exception as exc:
            return alive, repr(exc)
        return alive, None

    alive, stop_error = asyncio.run(scenario())
    assert alive and stop_error is None
    assert applied == [(7,), (8,)]  # the failing change once (not retried every look), then 8
    failures = [r for r in records if r.levelno >= logging.ERROR]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    assert getattr(failures[0], "setting", None) == "test-bad-apply"


def test_the_followers_stop_does_not_raise_the_loops_failure(
    records: list[logging.LogRecord],
) -> None:
    async def scenario() -> str | None:
        follower = pod_settings.Follower()

        async def failed() -> None:
            raise RuntimeError("the loop failed")

        follower._task = asyncio.create_task(failed())
        await asyncio.sleep(0)
        try:
            await follower.stop()
        except Exception as exc:
            return repr(exc)
        return None

    assert asyncio.run(scenario()) is None
    assert any("RuntimeError" in str(r.exc_info) for r in records if r.exc_info)


def test_the_followers_stop_passes_on_its_callers_cancellation() -> None:
    """Only the follower's own cancellation is swallowed: a shutdown that is itself
    cancelled (a timeout around it) must still see its CancelledError."""

    async def scenario() -> bool:
        follower = pod_settings.Follower()
        follower.start()
        await asyncio.sleep(0)
        stopping = asyncio.create_task(follower.stop())
        await asyncio.sleep(0)  # stop() now awaits the follower's task
        stopping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopping
        return stopping.cancelled()

    assert asyncio.run(scenario())


def test_a_cancelled_callers_cleanup_still_stops_the_follower_quietly() -> None:
    """A task that was cancelled and stops the follower in its `finally` (asyncio.run
    cancelling the lifespan at teardown) must not get a CancelledError from stop(): the
    shutdown steps after it (the prediction log's flush) would be skipped."""
    after: list[str] = []

    async def lifespan(follower: pod_settings.Follower) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await follower.stop()
            after.append("the next shutdown step")

    async def scenario() -> None:
        follower = pod_settings.Follower()
        follower.start()
        task = asyncio.create_task(lifespan(follower))
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert after == ["the next shutdown step"]


def test_the_lifespan_shutdown_runs_every_step_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, records: list[logging.LogRecord]
) -> None:
    save(affine_model(), tmp_path, "affine")
    ran: list[str] = []

    def step(name: str, fails: bool, real: Any = None) -> Any:
        async def stop(*args: object) -> None:
            ran.append(name)
            if real is not None:
                await real(*args)  # the runtime's threads and pools are really stopped
            if fails:
                raise RuntimeError(f"{name} failed")

        return stop

    async def nothing(*_: object) -> None:
        return None

    monkeypatch.setattr(Observability, "start", nothing)
    monkeypatch.setattr(pod_settings.Follower, "stop", step("follower", True))
    monkeypatch.setattr(ServingRuntime, "stop", step("runtime", True, ServingRuntime.stop))
    monkeypatch.setattr(Observability, "stop", step("observability", False))
    # The lifespan runs on this (pytest's) thread: no shorter time slice for it, which new
    # threads would inherit (tests/test_time_slice.py), and no change to the process's GC.
    quiet = {"thread_slice_us": 0, "gc_freeze": False, "gc_gen0_threshold": 0}
    app = create_app(Settings(model_repository=tmp_path, database_url=None, **quiet))
    records.clear()

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            pass

    asyncio.run(scenario())
    assert ran == ["follower", "runtime", "observability"]
    failed = [getattr(r, "step", None) for r in records if r.levelno >= logging.ERROR]
    assert failed == ["pod-settings follower", "runtime"], [r.getMessage() for r in records]


@pytest.mark.parametrize("raises", ["first", "always"])
def test_a_raising_batch_observer_neither_keeps_the_slot_nor_strands_the_batch(
    affine_repo: Path, raises: str, records: list[logging.LogRecord]
) -> None:
    """A batch of 8 with one bad request (FP64: ONNX Runtime fails the run) goes the rerun
    path; the observer raises on the failed run's record ("first") or on every record."""
    threads = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)
    model = load_repository(affine_repo, Settings(), threads).get("affine", "1")
    seen: list[BatchRecord] = []

    def observer(record: BatchRecord) -> None:
        seen.append(record)
        if raises == "always" or len(seen) == 1:
            raise RuntimeError("observer bug")

    async def scenario() -> tuple[list[object], int, object]:
        pool = InferencePool(1)
        batcher = Batcher(model, pool, QueueBudget(100, 1), [observer])
        batcher.start()
        try:
            await pool.acquire()  # all of them queue into one batch
            requests = [
                ({"x": np.full((1, 4), i, np.float64)}, 1)
                if i == 3
                else model.validate({"x": np.full((1, 4), i, np.float32)})
                for i in range(8)
            ]
            tasks = [asyncio.ensure_future(batcher.submit(*request)) for request in requests]
            await until(lambda: batcher.queued_rows == 8)
            pool.release()
            done, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            results = [
                task.exception() or task.result() if task in done else "unanswered"
                for task in tasks
            ]
            await asyncio.sleep(0.05)
            busy = pool.busy
            # The slot is free: a later request is answered.
            later = await asyncio.wait_for(
                batcher.submit(*model.validate({"x": np.full((1, 4), 9, np.float32)})), 5
            )
            return results, busy, later
        finally:
            await batcher.stop()

    results, busy, later = asyncio.run(scenario())
    assert "unanswered" not in results, results
    assert busy == 0
    np.testing.assert_array_equal(later.outputs["y"], np.full((1, 4), 19))
    # Whichever records raise, each request gets its own answer: the bad one its 400, its
    # batch-mates their outputs (an observer's bug must not fail them).
    assert isinstance(results[3], BadRequest), results[3]
    for index, result in enumerate(results):
        if index != 3:
            np.testing.assert_array_equal(result.outputs["y"], np.full((1, 4), index * 2 + 1))
    assert any(r.getMessage() == "a batch observer failed" for r in records)
