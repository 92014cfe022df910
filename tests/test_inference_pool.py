"""The inference pool: priority slots and lowered thread priority."""

from __future__ import annotations

import asyncio
import os
import threading

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
