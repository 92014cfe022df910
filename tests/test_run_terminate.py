"""A session run whose requests have all given up (deadline passed, client gone) is
terminated: the inference thread is free at once, not when the run would have ended.

A 256-row request got its 504 at 0.32 s but its run kept the worker's only inference thread
~3.4 s more, and the requests to other models behind it got 504s in turn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from metrics_support import scrape
from pieces_support import (
    SMALL_BODY_BYTES,
    WIDTH,
    build_repository,
    infer,
    rows_for,
    seconds_per_row,
    send_then_leave,
    server_timing,
    statuses,
    wait_for_metric,
    zeros_body,
)
from podserve.batcher import Batcher, BatchRecord, QueueBudget, RunTerminated
from podserve.errors import DeadlineExceeded, phases_of
from podserve.inference_pool import InferencePool
from podserve.model_repository import load_repository
from podserve.onnx_model import ThreadBudget
from podserve.settings import Settings
from server_process import ServerProcess

TERMINATED = "podserve_batch_runs_terminated_total"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("terminate"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    with ServerProcess(repo, workers=1) as proc:
        yield proc


@pytest.fixture(scope="module")
def per_row(server: ServerProcess) -> float:
    return seconds_per_row(server.url)


def _one_row(http: httpx.Client) -> float:
    """Seconds a 1-row request to the fast model takes (it needs the inference thread)."""
    started = time.perf_counter()
    assert infer(http, "affine", np.ones((1, 4), np.float32)).status_code == 200
    return time.perf_counter() - started


def test_a_deadline_that_passes_mid_run_ends_the_run(server: ServerProcess, per_row: float) -> None:
    rows = rows_for(2.5, per_row, least=64)  # one run of `wide`, seconds long
    x = np.full((rows, WIDTH), 0.01, np.float32)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        started = time.perf_counter()
        late = infer(http, "wide", x, **{"x-podserve-timeout-ms": "300"})
        answered_s = time.perf_counter() - started
        after_s = _one_row(http)
    assert late.status_code == 504, late.text
    # The thread was free soon after the 504, not once the run would have ended.
    assert after_s < (rows * per_row - answered_s) / 4, (after_s, rows * per_row, answered_s)
    # Its time: a moment in the queue, then ~300 ms in the run (it used to read queue 271).
    phases = server_timing(late)
    assert phases.get("infer", 0) > 150 and phases["queue"] < phases["infer"], phases
    assert wait_for_metric(server.url, TERMINATED, 1, model="wide") == 1
    assert statuses(server.url, "wide").keys() <= {"200", "504"}  # no 500 from the run
    assert scrape(server.url).value("podserve_inference_errors_total") == 0
    assert wait_for_metric(server.url, "podserve_queue_rows", 0) == 0
    assert '"level":"error"' not in server.logs()


def test_a_run_whose_client_left_ends(server: ServerProcess, per_row: float) -> None:
    rows = 120  # one run of `wide` (SMALL_BODY_BYTES: the server must see the client go)
    body = zeros_body(rows)
    assert len(body) < SMALL_BODY_BYTES
    terminated = scrape(server.url).value(TERMINATED, model="wide")
    leave_at = time.monotonic() + min(0.3, rows * per_row / 5)
    send_then_leave(server.port, "wide", body, until=lambda: time.monotonic() > leave_at)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        after_s = _one_row(http)
    assert after_s < rows * per_row / 4, (after_s, rows * per_row)
    assert wait_for_metric(server.url, TERMINATED, terminated + 1, model="wide") == terminated + 1
    assert wait_for_metric(server.url, "podserve_requests_total", 1, model="wide", status="499")
    assert wait_for_metric(server.url, "podserve_queue_rows", 0) == 0
    assert '"level":"error"' not in server.logs()


def test_a_run_goes_on_while_a_batch_mate_waits_and_ends_when_none_does(repo: Path) -> None:
    """In-process, two requests in one run of the real session: one passing its deadline
    leaves the run to the other; both passing theirs end it."""
    model = load_repository(repo, Settings(), ThreadBudget(1, 1, False)).get("wide")
    inputs, rows = model.validate({"x": np.full((40, WIDTH), 0.01, np.float32)})
    records: list[BatchRecord] = []

    async def together(timeouts: list[float | None]) -> tuple[list, int]:
        pool = InferencePool(1)
        batcher = Batcher(model, pool, QueueBudget(256, 1), [records.append])
        batcher.start()
        try:
            await pool.acquire()  # both queue into one batch, which starts about `now`
            now = time.perf_counter()
            tasks = [
                asyncio.ensure_future(
                    batcher.submit(inputs, rows, None if timeout is None else now + timeout)
                )
                for timeout in timeouts
            ]
            while batcher.queued_rows < rows * len(timeouts):
                await asyncio.sleep(0.001)
            pool.release()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            while pool.busy:  # the run is over (terminated or not)
                await asyncio.sleep(0.001)
            return results, batcher.runs_terminated
        finally:
            await batcher.stop()

    (late, served), terminated = asyncio.run(together([0.2, None]))
    assert isinstance(late, DeadlineExceeded) and terminated == 0
    queue_s, ran_s = phases_of(late)  # type: ignore[misc]
    assert ran_s is not None and ran_s > 0.1 and queue_s < ran_s, (queue_s, ran_s)
    np.testing.assert_array_equal(served.outputs["y"].shape, (40, WIDTH))
    full_run = records[-1]
    assert full_run.error is None and len(full_run.requests) == 2

    results, terminated = asyncio.run(together([0.2, 0.2]))
    assert all(isinstance(result, DeadlineExceeded) for result in results), results
    assert terminated == 1
    ended = records[-1]
    assert isinstance(ended.error, RunTerminated) and len(ended.requests) == 2
    ran_ns, full_ns = ended.end_ns - ended.start_ns, full_run.end_ns - full_run.start_ns
    assert ran_ns < full_ns / 2, (ran_ns, full_ns)
