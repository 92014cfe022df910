"""Dynamic batching with real ONNX Runtime sessions: batched == unbatched, bounds, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from batch_support import run_alone, run_concurrently, until
from podserve.batcher import Batcher, BatchRecord, QueueBudget
from podserve.errors import (
    BadRequest,
    DeadlineExceeded,
    Overloaded,
    PayloadTooLarge,
    phases_of,
)
from podserve.inference_pool import InferencePool
from podserve.model_repository import ModelRepository, load_repository
from podserve.onnx_model import OnnxModel, ThreadBudget
from podserve.settings import Settings

THREADS = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)


@pytest.fixture(scope="module")
def repository(model_repo: Path) -> ModelRepository:
    return load_repository(model_repo, Settings(), THREADS)


def test_tabular_batched_equals_unbatched(repository: ModelRepository) -> None:
    from sklearn.datasets import load_breast_cancer

    model = repository.get("tabular")
    features = load_breast_cancer().data.astype(np.float32)
    requests = [{"input": features[i : i + 1 + i % 3]} for i in range(0, 120, 4)]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    assert max(len(r.requests) for r in records) > 1, "requests were never batched"
    for request, outcome in zip(requests, outcomes, strict=True):
        expected = run_alone(model, request)
        np.testing.assert_array_equal(outcome.outputs["label"], expected["label"])
        np.testing.assert_allclose(outcome.outputs["probabilities"], expected["probabilities"])


def test_text_batched_equals_unbatched(repository: ModelRepository) -> None:
    model = repository.get("text")
    sentences = [
        "a short one",
        "a considerably longer sentence that forces padding of the shorter ones in its batch",
        "the asyncio event loop never runs the model",
        "ünïcödé and emoji 🚀 survive the tokenizer",
    ] * 6
    requests = [{"text": np.array(sentences[i : i + 1 + i % 2], dtype=object)} for i in range(20)]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    assert max(len(r.requests) for r in records) > 1, "requests were never batched"
    for request, outcome in zip(requests, outcomes, strict=True):
        embedding = outcome.outputs["embedding"]
        assert embedding.shape == (len(request["text"]), 32)
        np.testing.assert_allclose(embedding, run_alone(model, request)["embedding"], atol=1e-5)


def test_each_request_gets_its_own_rows_of_the_preprocessed_batch(
    repository: ModelRepository,
) -> None:
    """What the tokenizer made of a request (for trace_level TENSORS): its own rows of the
    batch's token ids, padded to the batch's longest; models without a pre-processor have
    none (their session inputs are the request's own)."""
    model = repository.get("text")
    words = ["one", "two words here", "three", "a much longer sentence than the others are"]
    requests = [
        {"text": np.array(words[i % 4 : i % 4 + 1 + i % 2], dtype=object)} for i in range(16)
    ]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    assert max(len(r.requests) for r in records) > 1, "requests were never batched"
    for request, outcome in zip(requests, outcomes, strict=True):
        inputs, rows = model.validate(request)
        alone = model.run_batch([inputs], [rows]).feed
        assert alone is not None
        mine = outcome.model_inputs()
        assert mine is not None and set(mine) == set(alone)
        width = alone["input_ids"].shape[1]
        np.testing.assert_array_equal(mine["input_ids"][:, :width], alone["input_ids"])
        np.testing.assert_array_equal(mine["attention_mask"][:, :width], alone["attention_mask"])
        assert not mine["attention_mask"][:, width:].any()  # the batch's padding, masked

    tabular = repository.get("tabular")
    row = {"input": np.zeros((1, 30), dtype=np.float32)}
    (outcome,), _ = asyncio.run(run_concurrently(tabular, [row]))
    assert outcome.model_inputs() is None


def test_batches_respect_max_batch_size(repository: ModelRepository) -> None:
    model = repository.get("affine", "1")  # max_batch_size 16
    requests = [{"x": np.full((3, 4), i, np.float32)} for i in range(40)]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    assert all(sum(p.rows for p in r.requests) <= 16 for r in records)
    for i, outcome in enumerate(outcomes):
        np.testing.assert_array_equal(outcome.outputs["y"], np.full((3, 4), i * 2 + 1))


def test_different_trailing_shapes_are_not_mixed(repository: ModelRepository) -> None:
    model = repository.get("slow")
    requests = [{"x": np.ones((1, 256), np.float32)} for _ in range(6)]
    outcomes, _ = asyncio.run(run_concurrently(model, requests))
    assert all(o.outputs["y"].shape == (1, 256) for o in outcomes)


def test_queue_bound_rejects_with_retry_after() -> None:
    budget = QueueBudget(max_rows=10, retry_after_s=2)
    budget.reserve(8)
    with pytest.raises(Overloaded) as rejected:
        budget.reserve(3)
    assert rejected.value.headers["Retry-After"] == "2"
    with pytest.raises(PayloadTooLarge, match=r"11 rows exceed .*PODSERVE_MAX_QUEUE_ROWS.*job"):
        budget.reserve(11)  # could never be admitted: a 413 that says what to do
    budget.release(8)
    budget.reserve(10)
    assert budget.queued_rows == 10


def test_overload_sheds_and_recovers(repository: ModelRepository) -> None:
    model = repository.get("slow")

    async def scenario() -> tuple[int, int, int]:
        budget = QueueBudget(max_rows=4, retry_after_s=1)
        batcher = Batcher(model, InferencePool(1), budget)
        batcher.start()
        request = model.validate({"x": np.ones((1, 256), np.float32)})
        results = await asyncio.gather(
            *(batcher.submit(*request) for _ in range(30)), return_exceptions=True
        )
        shed = sum(isinstance(r, Overloaded) for r in results)
        served = sum(not isinstance(r, BaseException) for r in results)
        after = await batcher.submit(*request)  # queue drained: accepted again
        await batcher.stop()
        return shed, served, int(after.outputs["y"].shape[0]) + budget.queued_rows

    shed, served, after = asyncio.run(scenario())
    assert shed > 0 and served > 0 and shed + served == 30
    assert after == 1  # one row back, nothing left queued


def test_deadline_gives_504_instead_of_late_work(repository: ModelRepository) -> None:
    model = repository.get("slow")

    async def scenario() -> list:
        batcher = Batcher(model, InferencePool(1), QueueBudget(1000, 1))
        batcher.start()
        heavy = model.validate({"x": np.ones((64, 256), np.float32)})
        light = model.validate({"x": np.ones((1, 256), np.float32)})
        first = asyncio.ensure_future(batcher.submit(*heavy))
        await asyncio.sleep(0.005)  # the heavy batch occupies the only thread
        late = batcher.submit(*light, deadline=time.perf_counter() + 0.001)
        results = await asyncio.gather(first, late, return_exceptions=True)
        await batcher.stop()
        return results

    first, late = asyncio.run(scenario())
    assert first.outputs["y"].shape == (64, 256)
    assert isinstance(late, DeadlineExceeded)


def test_failing_request_does_not_fail_its_batch_mates(repository: ModelRepository) -> None:
    model = repository.get("affine", "1")

    async def scenario() -> list:
        batcher = Batcher(model, InferencePool(1), QueueBudget(100, 1))
        batcher.start()
        goods = [model.validate({"x": np.full((1, 4), i, np.float32)}) for i in range(6)]
        # Same batch key, wrong dtype (bypassing validation): the batch run fails in ORT.
        bad = ({"x": np.ones((1, 4), np.float64)}, 1)
        results = await asyncio.gather(
            *(batcher.submit(*g) for g in goods[:3]),
            batcher.submit(*bad),
            *(batcher.submit(*g) for g in goods[3:]),
            return_exceptions=True,
        )
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert isinstance(results[3], Exception)
    good = results[:3] + results[4:]
    for i, outcome in enumerate(good):
        np.testing.assert_array_equal(outcome.outputs["y"], np.full((1, 4), i * 2 + 1))


def test_nonfinite_values_fail_only_their_requests_and_the_rest_run_as_one_batch(
    repository: ModelRepository,
) -> None:
    """Online requests leave the NaN/Inf scan to the inference thread (one scan per batch):
    a batch with bad values runs no session; the bad requests get their 400, the others run
    together once, not each alone."""
    model = repository.get("affine", "1")
    goods = [{"x": np.full((1, 4), i, np.float32)} for i in range(6)]
    bads = [
        {"x": np.array([[1, np.nan, 2, 3]], np.float32)},
        {"x": np.full((2, 4), np.inf, np.float32)},
    ]
    requests = goods[:1] + bads[:1] + goods[1:4] + bads[1:] + goods[4:]

    async def scenario() -> tuple[list, list[BatchRecord]]:
        records: list[BatchRecord] = []
        batcher = Batcher(model, InferencePool(1), QueueBudget(100, 1), [records.append])
        batcher.start()
        validated = [model.validate(r, values=False) for r in requests]  # as the online path
        results = await asyncio.gather(
            *(batcher.submit(*v) for v in validated), return_exceptions=True
        )
        await batcher.stop()
        return results, records

    results, records = asyncio.run(scenario())
    for request, result in zip(requests, results, strict=True):
        if any(request is bad for bad in bads):
            assert isinstance(result, BadRequest), result
            assert "input 'x': NaN or Inf values are not allowed" in str(result)
        else:
            np.testing.assert_array_equal(result.outputs["y"], request["x"] * 2 + 1)
    ran = [item.inputs["x"] for record in records for item in record.requests]
    assert len(ran) == len(goods), "a good request ran twice, or a bad one ran"
    assert all(np.isfinite(x).all() for x in ran)
    assert max(len(record.requests) for record in records) > 1, "the good ones ran alone"


def test_value_checks_run_at_validation_or_in_the_session_run(
    repository: ModelRepository,
) -> None:
    model = repository.get("affine", "1")
    bad = {"x": np.array([[0, 0, np.inf, 0]], np.float32)}
    with pytest.raises(BadRequest, match="NaN or Inf"):
        model.validate(bad)  # jobs: checked before they are stored
    inputs, rows = model.validate(bad, values=False)
    with pytest.raises(BadRequest, match="input 'x': NaN or Inf values are not allowed"):
        model.run_batch([inputs], [rows])  # a batch of one raises the client's error itself


def test_allow_nonfinite_lets_nan_through(model_repo: Path) -> None:
    model = load_repository(model_repo, Settings(allow_nonfinite=True), THREADS).get("affine", "1")
    inputs, rows = model.validate({"x": np.array([[np.nan, 1, np.inf, 2]], np.float32)})
    y = model.run_batch([inputs, inputs], [rows, rows]).outputs[1]["y"]
    assert np.isnan(y[0, 0]) and np.isinf(y[0, 2]) and y[0, 1] == 3


def _gated(monkeypatch: pytest.MonkeyPatch, model: OnnxModel) -> threading.Event:
    """The model's session runs wait until the returned event is set: a batch keeps its
    thread busy exactly as long as a test needs, however slow or fast the machine is."""
    gate = threading.Event()
    run_batch = model.run_batch

    def gated(*args: object) -> object:
        assert gate.wait(30), "the test never opened the gate"
        return run_batch(*args)

    monkeypatch.setattr(model, "run_batch", gated)
    return gate


def test_waits_for_more_rows_only_while_the_pool_is_busy(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two threads, one busy: the next batch waits up to max_batch_delay_ms to fill up."""
    model = load_repository(model_repo, Settings(max_batch_delay_ms=2000), THREADS).get("slow")
    gate = _gated(monkeypatch, model)
    one_row = {"x": np.ones((1, 256), np.float32)}

    async def scenario() -> list[BatchRecord]:
        records: list[BatchRecord] = []
        pool = InferencePool(2)
        batcher = Batcher(model, pool, QueueBudget(1000, 1), [records.append])
        batcher.start()
        heavy = asyncio.ensure_future(
            batcher.submit(*model.validate({"x": np.ones((8, 256), np.float32)}))
        )
        await until(lambda: pool.busy == 1 and not batcher.queued_rows)  # thread 1 is busy
        small = []
        for _ in range(3):
            small.append(asyncio.ensure_future(batcher.submit(*model.validate(one_row))))
            await asyncio.sleep(0.01)
        assert pool.busy == 2 and batcher.queued_rows == 3  # waiting for more rows
        gate.set()
        await asyncio.gather(heavy, *small)
        await batcher.stop()
        return records

    records = asyncio.run(scenario())
    sizes = sorted(len(r.requests) for r in records)
    assert sizes == [1, 3], sizes  # the three small requests shared one batch


def test_a_thread_freeing_up_ends_the_wait_for_more_rows(
    model_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiting to fill a batch only pays while the pool is busy: once the busy batch ends,
    the waiting one goes at once, not after the rest of a (here 30 s) delay."""
    model = load_repository(model_repo, Settings(max_batch_delay_ms=30_000), THREADS).get("slow")
    gate = _gated(monkeypatch, model)

    async def scenario() -> float:
        pool = InferencePool(2)
        batcher = Batcher(model, pool, QueueBudget(1000, 1))
        batcher.start()
        heavy = asyncio.ensure_future(
            batcher.submit(*model.validate({"x": np.ones((8, 256), np.float32)}))
        )
        await until(lambda: pool.busy == 1 and not batcher.queued_rows)
        small = asyncio.ensure_future(
            batcher.submit(*model.validate({"x": np.ones((1, 256), np.float32)}))
        )
        await until(lambda: pool.busy == 2)  # the dispatcher holds a thread, and waits
        gate.set()
        await heavy
        outcome = await asyncio.wait_for(small, 15)  # the whole delay would be 30 s
        await batcher.stop()
        return outcome.queue_s

    assert asyncio.run(scenario()) < 15


def test_idle_pool_dispatches_at_once(model_repo: Path) -> None:
    """A lone request never pays the batch delay when a thread is idle."""
    config = Settings(max_batch_delay_ms=5000)
    model = load_repository(model_repo, config, THREADS).get("affine", "1")

    async def scenario() -> float:
        batcher = Batcher(model, InferencePool(1), QueueBudget(100, 1))
        batcher.start()
        outcome = await batcher.submit(*model.validate({"x": np.ones((1, 4), np.float32)}))
        await batcher.stop()
        return outcome.queue_s

    assert asyncio.run(scenario()) < 1.0  # far below the 5 s delay


def test_batch_mates_resume_one_loop_iteration_apart(repository: ModelRepository) -> None:
    """A finished batch wakes its requests in turn, so due timers run between responses."""
    model = repository.get("affine", "1")

    async def scenario() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        iterations = [0]

        def tick() -> None:  # one call per loop iteration
            iterations[0] += 1
            loop.call_soon(tick)

        records: list[BatchRecord] = []
        pool = InferencePool(1)
        batcher = Batcher(model, pool, QueueBudget(100, 1), [records.append])
        batcher.start()
        await pool.acquire()  # the only thread is busy: the requests below queue up
        seen: list[int] = []

        async def one() -> None:
            await batcher.submit(*model.validate({"x": np.ones((1, 4), np.float32)}))
            seen.append(iterations[0])

        requests = [asyncio.ensure_future(one()) for _ in range(4)]
        await asyncio.sleep(0.05)
        pool.release()  # now they run as one batch
        loop.call_soon(tick)
        await asyncio.gather(*requests)
        await batcher.stop()
        return seen, max(len(r.requests) for r in records)

    seen, largest_batch = asyncio.run(scenario())
    assert largest_batch == 4  # one batch ...
    assert seen == sorted(set(seen)), seen  # ... whose requests resumed in distinct iterations


def test_requests_that_give_up_while_queued_free_their_rows_at_once(
    repository: ModelRepository,
) -> None:
    """A request cancelled (client gone, drain cut-off) or past its deadline while queued
    frees its rows then, not when a thread next takes a batch: meanwhile they would shed
    live requests with 503 and inflate podserve_queue_rows, the autoscaling signal."""
    model = repository.get("affine", "1")
    one_row = model.validate({"x": np.ones((1, 4), np.float32)})

    async def scenario() -> tuple[list[int], list, np.ndarray]:
        pool = InferencePool(1)
        budget = QueueBudget(max_rows=8, retry_after_s=1)
        batcher = Batcher(model, pool, budget)
        batcher.start()
        await pool.acquire()  # the only thread is busy: requests stay queued
        queued = []
        cancelled = [asyncio.ensure_future(batcher.submit(*one_row)) for _ in range(8)]
        await until(lambda: budget.queued_rows == 8)
        for task in cancelled:
            task.cancel()
        await asyncio.gather(*cancelled, return_exceptions=True)
        queued.append(budget.queued_rows)
        late = time.perf_counter() + 0.02
        timed_out = await asyncio.gather(
            *(batcher.submit(*one_row, deadline=late) for _ in range(8)), return_exceptions=True
        )
        queued.append(budget.queued_rows)
        live = asyncio.ensure_future(batcher.submit(*one_row))  # admitted: nothing is queued
        await until(lambda: budget.queued_rows == 1)
        pool.release()
        outcome = await live
        queued.append(budget.queued_rows)
        await batcher.stop()
        return queued, timed_out, outcome.outputs["y"]

    queued, timed_out, y = asyncio.run(scenario())
    assert queued == [0, 0, 0]
    assert all(isinstance(result, DeadlineExceeded) for result in timed_out), timed_out
    np.testing.assert_array_equal(y, np.full((1, 4), 3))


def test_a_failed_batch_and_its_reruns_reach_the_observers(
    repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that fails is rerun in halves: every session run is a record (the metrics'
    batch sizes, Triton's execution counts, the batch spans), and a request that gave up
    meanwhile is not rerun for nobody."""
    model = repository.get("affine", "1")
    run_batch, runs = model.run_batch, []
    gone = threading.Event()

    def counting(inputs: list, rows: list, *options: object) -> object:
        runs.append(len(inputs))
        if len(inputs) > 1:
            assert gone.wait(30)  # the batch fails after one of its requests gave up
        return run_batch(inputs, rows, *options)

    monkeypatch.setattr(model, "run_batch", counting)

    async def scenario() -> tuple[list, list[BatchRecord]]:
        records: list[BatchRecord] = []
        pool = InferencePool(1)
        batcher = Batcher(model, pool, QueueBudget(100, 1), [records.append])
        batcher.start()
        await pool.acquire()  # all of them queue into one batch
        goods = [model.validate({"x": np.full((1, 4), i, np.float32)}) for i in range(4)]
        bad = ({"x": np.ones((1, 4), np.float64)}, 1)  # wrong dtype: ORT fails the batch
        tasks = [asyncio.ensure_future(batcher.submit(*r)) for r in [*goods[:3], bad, goods[3]]]
        await until(lambda: batcher.queued_rows == 5)
        pool.release()
        await until(lambda: runs == [5])  # the batch is running
        tasks[1].cancel()
        tasks[1].add_done_callback(lambda _: gone.set())
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results, records

    results, records = asyncio.run(scenario())
    # The cancelled request was not rerun: the 4 others in halves, then the failed half's two.
    assert runs == [5, 2, 2, 1, 1]
    assert isinstance(results[1], asyncio.CancelledError)
    assert isinstance(results[3], Exception)  # the bad one
    for index, value in ((0, 0), (2, 2), (4, 3)):  # the good ones: x * 2 + 1
        np.testing.assert_array_equal(results[index].outputs["y"], np.full((1, 4), value * 2 + 1))
    failed, *reruns = records
    assert len(failed.requests) == 5 and failed.error is not None and failed.result is None
    assert [len(record.requests) for record in reruns] == [2, 2, 1, 1]
    assert [record.error is not None for record in reruns] == [False, True, True, False]
    assert all(record.result is not None for record in reruns if record.error is None)


def test_a_failed_merged_run_is_queue_time_for_its_reruns(
    repository: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each request waits until its own rerun: the failed merged run (0.2 s here) is in its
    queue phase, the bad one's error says how long it waited and ran. Both were missing
    from Server-Timing (a 400 showed only its parse)."""
    model = repository.get("affine", "1")
    run_batch = model.run_batch

    def slow_when_merged(inputs: list, rows: list, *options: object) -> object:
        if len(inputs) > 1:
            time.sleep(0.2)
        return run_batch(inputs, rows, *options)

    monkeypatch.setattr(model, "run_batch", slow_when_merged)

    async def scenario() -> list:
        pool = InferencePool(1)
        batcher = Batcher(model, pool, QueueBudget(100, 1), [])
        batcher.start()
        await pool.acquire()  # all of them queue into one batch
        goods = [model.validate({"x": np.full((1, 4), i, np.float32)}) for i in range(3)]
        bad = ({"x": np.ones((1, 4), np.float64)}, 1)  # wrong dtype: ORT fails the batch
        tasks = [asyncio.ensure_future(batcher.submit(*r)) for r in [*goods, bad]]
        await until(lambda: batcher.queued_rows == 4)
        pool.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return results

    *goods, bad = asyncio.run(scenario())
    assert all(outcome.queue_s >= 0.2 for outcome in goods), [o.queue_s for o in goods]
    assert isinstance(bad, BadRequest)
    spent = phases_of(bad)
    assert spent is not None and spent[0] >= 0.2 and spent[1] > 0, spent
