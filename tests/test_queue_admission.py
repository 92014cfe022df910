"""The per-worker queue bound is shared between models fairly: while a worker serves more
than one model, a model may hold no more queued rows than are left free for the others, so
a flooded model sheds its own requests, not its neighbours' (one flooded model had shed
26-33% of a quiet model's requests with 503). A worker of one model keeps the whole bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from batch_support import until
from model_builders import affine_model, save, slow_model
from pieces_support import rows_body, statuses
from podserve.batcher import Batcher, QueueBudget
from podserve.errors import ClientClosedRequest, DeadlineExceeded, Overloaded, PayloadTooLarge
from podserve.inference_pool import InferencePool
from podserve.model_repository import ModelRepository, load_repository
from podserve.onnx_model import ThreadBudget
from podserve.settings import Settings
from server_process import ServerProcess

A, B, C, QUIET = ("a", "1"), ("b", "1"), ("c", "1"), ("quiet", "1")


def _fill(budget: QueueBudget, model: tuple[str, str], rows: int = 1) -> Overloaded:
    """Reserve `rows` at a time for `model` until refused: the refusal."""
    for _ in range(budget.max_rows + 1):
        try:
            budget.reserve(rows, model)
        except Overloaded as refused:
            return refused
    raise AssertionError("never refused")


def test_a_single_model_worker_queues_up_to_the_whole_bound() -> None:
    for models in ((), {A: object()}):
        budget = QueueBudget(256, 2, models)
        refused = _fill(budget, A)
        assert budget.held(A) == budget.queued_rows == 256
        assert refused.headers["Retry-After"] == "2"
        assert "256 rows queued in this worker (limit 256, PODSERVE_MAX_QUEUE_ROWS)" in str(refused)


def test_a_flooded_model_is_capped_and_a_quiet_one_is_admitted() -> None:
    budget = QueueBudget(256, 2, {A: 1, QUIET: 2})
    refused = _fill(budget, A, rows=8)
    # It held 120, the 128 free took 8 more; then 8 more would exceed the 128 left free.
    assert budget.held(A) == 128
    assert refused.headers["Retry-After"] == "2"
    assert "model 'a' holds 128 of the 128 rows queued in this worker" in str(refused)
    assert "at most the 128 rows free" in str(refused)
    budget.reserve(128, QUIET)  # half the bound, from a model with nothing queued
    assert budget.held(QUIET) == 128 and budget.queued_rows == 256
    with pytest.raises(Overloaded, match="256 rows queued in this worker"):
        budget.reserve(1, QUIET)  # the whole bound still holds


def test_several_flooded_models_each_leave_a_share_free() -> None:
    """n flooders settle at max_rows/(n+1) each: what is left admits a quiet model."""
    budget = QueueBudget(256, 1, {A: 1, B: 2, C: 3, QUIET: 4})
    refused: set[tuple[str, str]] = set()
    while len(refused) < 3:  # round robin, as concurrent clients arrive
        for model in (A, B, C):
            try:
                budget.reserve(1, model)
            except Overloaded:
                refused.add(model)
    assert [budget.held(model) for model in (A, B, C)] == [64, 64, 64]
    budget.reserve(64, QUIET)
    assert budget.queued_rows == 256


def test_a_lone_model_of_several_may_still_send_a_request_of_the_whole_bound() -> None:
    budget = QueueBudget(256, 1, {A: 1, B: 2})
    budget.reserve(256, A)  # nothing queued: it fits what is free
    budget.release(256, A)
    with pytest.raises(PayloadTooLarge):
        budget.reserve(257, A)  # could never be admitted: still a 413
    assert budget.queued_rows == 0 and budget.held(A) == 0


def test_versions_of_one_model_are_one_model_with_one_share() -> None:
    """Two versions alone keep the whole bound; beside another model they share one share
    (the rule had counted each version as a model: 128 of 256 rows, then 503s)."""
    one, two = ("a", "1"), ("a", "2")
    budget = QueueBudget(256, 1, {one: 1, two: 2})
    budget.reserve(200, one)
    budget.reserve(56, two)
    assert budget.queued_rows == 256 and budget.held(one) == budget.held(two) == 256
    budget.release(200, one)
    budget.release(56, two)
    budget = QueueBudget(256, 1, {one: 1, two: 2, B: 3})
    budget.reserve(100, one)
    with pytest.raises(Overloaded, match="model 'a' holds 100"):
        budget.reserve(80, two)  # 180 > the 156 free
    budget.reserve(56, two)
    assert budget.held(two) == 156


def test_the_rule_follows_the_models_served() -> None:
    """The runtime's batchers dict: a model added or removed changes the rule at once."""
    served: dict[tuple[str, str], object] = {A: 1}
    budget = QueueBudget(8, 1, served)
    budget.reserve(6, A)  # alone: the whole bound
    served[B] = 2
    with pytest.raises(Overloaded, match="model 'a' holds 6"):
        budget.reserve(1, A)
    budget.reserve(2, B)
    del served[B]
    budget.release(2, B)
    budget.reserve(2, A)
    assert budget.held(A) == budget.queued_rows == 8 and budget.held(B) == 0


# --- counts on every path of a real batcher ---------------------------------------------

THREADS = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)


@pytest.fixture(scope="module")
def repository(model_repo: Path) -> ModelRepository:
    return load_repository(model_repo, Settings(), THREADS)


@dataclass
class _Connection:
    """A client connection the test closes (client_disconnect.ClientConnection)."""

    lost: bool = False
    on_lost: Callable[[], None] | None = None

    def body_read(self) -> None:
        pass

    def close(self) -> None:
        self.lost = True
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()


def test_each_models_count_returns_to_zero_on_every_path(repository: ModelRepository) -> None:
    """Served whole and in pieces, given up while queued (cancelled, deadline, client gone,
    pieces never queued), failed and terminated runs: each model's rows are given back."""
    fast, slow = repository.get("affine", "1"), repository.get("slow")  # 16 and 8 rows a run
    fast_key, slow_key = (fast.name, fast.version), (slow.name, slow.version)

    async def scenario() -> tuple[list[tuple[int, int, int]], int]:
        pool = InferencePool(1)
        batchers: dict[tuple[str, str], Batcher] = {}
        budget = QueueBudget(256, 1, batchers)
        for model in (fast, slow):
            batchers[(model.name, model.version)] = Batcher(model, pool, budget)
            batchers[(model.name, model.version)].start()
        on_fast, on_slow = batchers[fast_key], batchers[slow_key]
        counts = []

        def note() -> None:
            counts.append((budget.held(fast_key), budget.held(slow_key), budget.queued_rows))

        one = fast.validate({"x": np.ones((1, 4), np.float32)})
        forty = fast.validate({"x": np.ones((40, 4), np.float32)})  # three pieces
        wide = slow.validate({"x": np.ones((24, 256), np.float32)})  # three pieces
        one_slow = slow.validate({"x": np.ones((1, 256), np.float32)})
        bad = ({"x": np.ones((1, 4), np.float64)}, 1)  # wrong dtype: its run fails

        await asyncio.gather(on_fast.submit(*one), on_fast.submit(*forty), on_slow.submit(*wide))
        (failed,) = await asyncio.gather(on_fast.submit(*bad), return_exceptions=True)
        assert isinstance(failed, Exception), failed
        note()

        await pool.acquire()  # the only thread is busy: what follows stays queued
        cancelled = asyncio.ensure_future(on_fast.submit(*forty))
        connection = _Connection()
        left = asyncio.ensure_future(on_slow.submit(*wide, client=connection))
        late = asyncio.ensure_future(on_slow.submit(*one_slow, time.perf_counter() + 2))
        await until(lambda: budget.queued_rows == 40 + 24 + 1)
        note()  # pieces hold all their rows, queued or not
        cancelled.cancel()
        connection.close()
        for task, error in ((cancelled, asyncio.CancelledError), (left, ClientClosedRequest)):
            with pytest.raises(error):
                await task
        with pytest.raises(DeadlineExceeded):
            await late
        note()
        pool.release()

        # A run nobody waits for any more is terminated: rows were given back at its start.
        connection = _Connection()
        eight = slow.validate({"x": np.ones((8, 256), np.float32)})  # one run, ~70 ms
        running = asyncio.ensure_future(on_slow.submit(*eight, client=connection))
        await until(lambda: pool.busy == 1)
        await asyncio.sleep(0.02)  # its run has begun (the thread is taken just before)
        connection.close()
        with pytest.raises(ClientClosedRequest):
            await running
        await until(lambda: not pool.busy)
        note()
        for batcher in batchers.values():
            await batcher.stop()
        return counts, on_slow.runs_terminated

    counts, terminated = asyncio.run(scenario())
    assert counts == [(0, 0, 0), (40, 25, 65), (0, 0, 0), (0, 0, 0)]
    assert terminated == 1


# --- end to end -------------------------------------------------------------------------

QUEUE_ROWS = 64
FLOOD_ROWS = 8  # the slow model's max_batch_size: a batch each
FLOODERS = 12  # more than the bound's 8 requests, plus the one running
PROBES = 15


async def _flood(http: httpx.AsyncClient, shed: list[str], stop: asyncio.Event) -> None:
    body = rows_body(np.full((FLOOD_ROWS, 128), 0.01, np.float32))
    while not stop.is_set():
        response = await http.post("/v2/models/slow/infer", content=body)
        if response.status_code == 503:
            shed.append(response.json()["error"])
            await asyncio.sleep(0.02)  # Retry-After is seconds: a tight loop stands for many
        else:
            assert response.status_code == 200, response.text


async def _flood_and_probe(url: str) -> tuple[list[int], list[str]]:
    headers = {"content-type": "application/json"}
    limits = httpx.Limits(max_connections=FLOODERS + 1)
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers, limits=limits) as http:
        shed: list[str] = []
        stop = asyncio.Event()
        flood = [asyncio.create_task(_flood(http, shed, stop)) for _ in range(FLOODERS)]
        await asyncio.sleep(0.5)  # the slow model's queue is full
        body = rows_body(np.ones((1, 4), np.float32))
        probes = []
        try:
            for index in range(PROBES):
                await asyncio.sleep(0.03 + 0.01 * (index % 5))  # at different points of a batch
                response = await http.post("/v2/models/affine/infer", content=body)
                probes.append(response.status_code)
        finally:
            stop.set()
            await asyncio.gather(*flood)
    return probes, shed


def test_a_flooded_model_sheds_its_own_requests_not_another_models(tmp_path: Path) -> None:
    save(slow_model(128, layers=160), tmp_path, "slow", 1, {"max_batch_size": FLOOD_ROWS})
    save(affine_model(), tmp_path, "affine", 1, {"max_batch_size": 16})
    env = {"PODSERVE_POOL_THREADS": "1", "PODSERVE_MAX_QUEUE_ROWS": str(QUEUE_ROWS)}
    with ServerProcess(tmp_path, workers=1, env=env) as server:
        probes, shed = asyncio.run(_flood_and_probe(server.url))
        by_status = statuses(server.url, "slow")
    # One bound for all, first come first served, shed every one of them (15 of 15).
    assert probes == [200] * PROBES, str(probes)
    assert shed, "the flood never went past the bound"  # its own requests were shed
    assert "model 'slow' holds" in shed[0], shed[0]
    assert by_status.keys() <= {"200", "503"}, by_status
