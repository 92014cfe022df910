"""The inference pool: priority slots and lowered thread priority."""

from __future__ import annotations

import asyncio
import os
import threading

from podserve import inference_pool
from podserve.inference_pool import BACKGROUND, ONLINE, InferencePool


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
