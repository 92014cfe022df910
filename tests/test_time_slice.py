"""The short scheduler slice: the syscall wrapper; a real server's loop and inference threads."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from podserve.inference_pool import InferencePool
from podserve.time_slice import set_thread_slice, slice_us
from server_process import ServerProcess

T = TypeVar("T")
TABULAR = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


def _in_new_thread(fn: Callable[[], T]) -> T:
    """Run fn in a fresh thread (a slice or policy set there dies with it)."""
    result: list[T] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def _kernel_version() -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(found[1]), int(found[2])) if found else (0, 0)


# Not an install step: per-thread slices are a kernel feature. Where the kernel has it, the
# tests run and fail if podserve cannot set the slice.
pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or _kernel_version() < (6, 12),
    reason=f"per-thread time slices need Linux >= 6.12 (this is {platform.platform()})",
)


def test_a_thread_gets_the_slice_it_asks_for_clamped_to_the_kernels_bounds() -> None:
    def ask(requested: float) -> tuple[bool, float | None]:
        return set_thread_slice(requested), slice_us()

    assert _in_new_thread(lambda: ask(250)) == (True, 250)
    assert _in_new_thread(lambda: ask(10)) == (True, 100)  # below the kernel's 0.1 ms
    default = _in_new_thread(slice_us)
    assert default is not None and default > 250  # a new thread starts at the default


def _own_niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_an_inference_thread_gets_the_slice_and_keeps_its_lowered_priority() -> None:
    async def scenario() -> tuple[int, tuple[int, float | None]]:
        pool = InferencePool(1, niceness=10, slice_us=250)
        try:
            return _own_niceness(), await pool.run(lambda: (_own_niceness(), slice_us()))
        finally:
            pool.shutdown()

    loop_nice, (thread_nice, thread_slice) = asyncio.run(scenario())
    assert thread_nice == min(19, loop_nice + 10)  # sched_setattr kept the nice it read
    assert thread_slice == 250


def test_threads_under_another_policy_are_left_alone() -> None:
    def idle_then_ask() -> tuple[bool, int]:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return set_thread_slice(250), os.sched_getscheduler(0)

    assert _in_new_thread(idle_then_ask) == (False, os.SCHED_IDLE)


def _slices(pid: int) -> dict[int, float | None]:
    return {
        int(task.name): slice_us(int(task.name)) for task in Path(f"/proc/{pid}/task").iterdir()
    }


def test_each_workers_loop_and_inference_threads_run_with_a_short_slice(
    server: ServerProcess,
) -> None:
    for _ in range(8):  # over a few connections: the inference threads start on first use
        with httpx.Client(base_url=server.url) as fresh:
            assert fresh.post("/v2/models/tabular/infer", json=TABULAR).status_code == 200
    short = []
    for pid in server.worker_pids():
        slices = _slices(pid)
        assert slices[pid] == 100  # the worker's main thread runs its event loop
        short += [tid for tid, value in slices.items() if tid != pid and value == 100]
    assert short  # the inference threads (Python 3.11 does not name OS threads)


def test_zero_leaves_every_thread_at_the_default(model_repo: Path) -> None:
    env = {"PODSERVE_THREAD_SLICE_US": "0"}
    with ServerProcess(model_repo, workers=1, env=env) as server:
        with httpx.Client(base_url=server.url) as client:
            assert client.post("/v2/models/tabular/infer", json=TABULAR).status_code == 200
        (pid,) = server.worker_pids()
        slices = _slices(pid)
    assert len(slices) >= 2
    assert all(value is not None and value > 100 for value in slices.values()), slices
