"""The inference pool: priority slots and lowered thread priority."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import httpx

from model_builders import affine_model, save
from podserve import inference_pool
from podserve.inference_pool import BACKGROUND, ONLINE, InferencePool, Turn
from server_process import ServerProcess


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_inference_threads_run_at_lower_priority_than_the_loop() -> None:
    async def scenario() -> tuple[int, int]:
        pool = InferencePool(1, niceness=10)
        try:
            return _own_niceness(), await pool.run(_own_niceness)
        finally:
            pool.shutdown()

    loop_nice, thread_nice = asyncio.run(scenario())
    assert thread_nice == min(19, loop_nice + 10)


def test_threads_made_by_work_run_apart_inherit_the_lower_priority() -> None:
    """Model loading runs apart: ONNX Runtime's intra-op threads, made with each session,
    ran at the loop's priority before, and did most of the inference work with several."""

    def spawn_and_read() -> int:
        seen: list[int] = []
        child = threading.Thread(target=lambda: seen.append(_own_niceness()))
        child.start()
        child.join()
        return seen[0]

    async def scenario() -> tuple[int, int]:
        pool = InferencePool(1, niceness=10)
        try:
            return _own_niceness(), await pool.run_apart(spawn_and_read)
        finally:
            pool.shutdown()

    loop_nice, child_nice = asyncio.run(scenario())
    assert child_nice == min(19, loop_nice + 10)


def test_ort_intra_op_threads_of_a_served_model_yield_to_the_loop(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "affine", 1, {"max_batch_size": 8})
    env = {"PODSERVE_ORT_INTRA_OP_THREADS": "3", "PODSERVE_POOL_THREADS": "1"}
    with ServerProcess(tmp_path, workers=1, env=env) as server:
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
        httpx.post(f"{server.url}/v2/models/affine/infer", json=body).raise_for_status()
        (worker,) = server.worker_pids()
        nice = [_thread_nice(worker, task) for task in os.listdir(f"/proc/{worker}/task")]
    # The pool's thread and the session's 2 intra-op threads (the caller is the third).
    assert sum(1 for value in nice if value >= 10) >= 3, nice


def _thread_nice(pid: int, task: str) -> int:
    stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[16])  # field 19: nice


def _own_policy() -> int:
    return os.sched_getscheduler(threading.get_native_id())


def test_inference_threads_can_run_under_sched_idle() -> None:
    async def scenario() -> tuple[int, int]:
        pool = InferencePool(1, idle_policy=True)
        try:
            return _own_policy(), await pool.run(_own_policy)
        finally:
            pool.shutdown()

    loop_policy, thread_policy = asyncio.run(scenario())
    assert loop_policy == os.SCHED_OTHER  # the loop thread keeps the normal policy
    assert thread_policy == os.SCHED_IDLE


def test_a_failing_scheduling_hint_does_not_stop_the_thread(monkeypatch) -> None:
    # A kernel or sandbox that makes the hint raise cannot be produced here, so the hint does.
    def refuse(*_: object) -> None:
        raise OSError("sched_setattr refused")

    monkeypatch.setattr(inference_pool, "shorten_slice", refuse)

    async def scenario() -> int:
        pool = InferencePool(1, slice_us=100)
        try:
            return await asyncio.wait_for(pool.run(lambda: 41 + 1), 10)
        finally:
            pool.shutdown()

    assert asyncio.run(scenario()) == 42


def test_online_work_is_served_before_background_work() -> None:
    async def scenario() -> list[str]:
        pool = InferencePool(1)
        order: list[str] = []
        await pool.acquire()  # the only slot is busy: everything below has to wait
        waiting = [
            asyncio.ensure_future(pool.run(order.append, "job", priority=BACKGROUND)),
            asyncio.ensure_future(pool.run(order.append, "online", priority=ONLINE)),
        ]
        await asyncio.sleep(0.01)
        pool.release()
        await asyncio.gather(*waiting)
        pool.shutdown()
        return order

    assert asyncio.run(scenario()) == ["online", "job"]


def test_a_freed_thread_goes_to_the_model_that_ran_longest_ago() -> None:
    """A backlogged model asks for its next slot as soon as its batch starts, so it asks
    before another model's batch is ready; first-come first-served gave it that slot too."""

    async def scenario() -> list[str]:
        pool = InferencePool(1)
        flooded, fast = Turn(), Turn()
        order: list[str] = []

        async def batch(turn: Turn, name: str, priority: int = ONLINE) -> None:
            await pool.acquire(priority, turn)
            order.append(name)
            pool.release()

        await batch(fast, "fast ran")  # the fast model ran before the flooded one
        await pool.acquire(ONLINE, flooded)  # the flooded model's batch runs now
        waiting = [asyncio.ensure_future(batch(flooded, "flooded"))]  # asks first
        await asyncio.sleep(0)
        waiting.append(asyncio.ensure_future(batch(Turn(), "job", BACKGROUND)))  # never ran
        await asyncio.sleep(0)
        waiting.append(asyncio.ensure_future(batch(fast, "fast")))
        await asyncio.sleep(0.01)
        pool.release()
        await asyncio.gather(*waiting)
        pool.shutdown()
        return order

    # Online before background whatever their turns; among online, the older turn first.
    assert asyncio.run(scenario()) == ["fast ran", "fast", "flooded", "job"]


def _fail(message: str) -> None:
    raise ValueError(message)


def test_results_and_errors_come_back_to_the_awaiting_request() -> None:
    async def scenario() -> tuple[list[str], str, str]:
        pool = InferencePool(2)
        try:
            names = await asyncio.gather(
                *(pool.run(lambda: threading.current_thread().name) for _ in range(20))
            )
            try:
                await pool.run(_fail, "bad batch")
            except ValueError as exc:
                error = str(exc)
            loop_thread = threading.current_thread().name
        finally:
            pool.shutdown()
        return names, error, loop_thread

    names, error, loop_thread = asyncio.run(scenario())
    assert set(names) <= {"podserve-infer_0", "podserve-infer_1"} and loop_thread not in names
    assert error == "bad batch"


def test_a_cancelled_caller_does_not_break_the_pool() -> None:
    async def scenario() -> str:
        pool = InferencePool(1)
        gate = threading.Event()
        try:
            slow = asyncio.ensure_future(pool.run(gate.wait, 5))
            await asyncio.sleep(0.01)
            slow.cancel()  # the client went away while its batch runs
            gate.set()
            return await pool.run(str, "next")
        finally:
            pool.shutdown()

    assert asyncio.run(scenario()) == "next"


def test_shutdown_finishes_queued_work_then_refuses_more() -> None:
    async def scenario() -> tuple[list[int], bool]:
        pool = InferencePool(1)
        before = set(threading.enumerate())
        done: list[int] = []
        # As batchers do, each holding a slot of its own (in-flight batches at shutdown).
        queued = [asyncio.ensure_future(pool.run_in_slot(done.append, i)) for i in range(5)]
        await asyncio.sleep(0)  # all five are on the queue
        await asyncio.to_thread(pool.shutdown)
        await asyncio.gather(*queued)
        assert not {t for t in set(threading.enumerate()) - before if t.name.startswith("podserve")}
        try:
            await pool.run(done.append, 99)
        except RuntimeError:
            return done, True
        return done, False

    done, refused = asyncio.run(scenario())
    assert done == [0, 1, 2, 3, 4] and refused
