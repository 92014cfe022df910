"""A small bounded thread pool for CPU work, with priority slots.

ONNX Runtime releases the GIL, so one thread per worker keeps a core busy without
blocking the event loop. Slots are handed out by priority so background jobs never
delay online requests.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

ONLINE = 0
BACKGROUND = 10


def _lower_thread_priority(niceness: int, idle_policy: bool) -> None:
    """Make this (inference) thread yield the CPU to the event loop thread under contention.

    Linux applies nice values and policies per thread (on the thread id); lowering them
    needs no privilege. SCHED_IDLE (optional) makes a waking loop preempt inference at once;
    its price is that a loop busy *all* the time (an open-loop flood far above capacity)
    leaves inference almost no CPU, where nice +10 leaves ~10%. README: "The event loop
    wins the CPU" has the measurements.
    """
    if not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        if niceness > 0:
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + niceness)
        if idle_policy:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except OSError:  # not permitted in some sandboxes: keep what could be set
        pass


class InferencePool:
    def __init__(self, threads: int, niceness: int = 0, idle_policy: bool = False) -> None:
        self.capacity = threads
        self.busy = 0
        self._executor = ThreadPoolExecutor(
            threads,
            thread_name_prefix="podserve-infer",
            initializer=_lower_thread_priority,
            initargs=(niceness, idle_policy),
        )
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int = ONLINE) -> None:
        """Wait for a free thread; lower priority numbers are served first."""
        if self.busy < self.capacity and not self._waiters:
            self.busy += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), waiter))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: busy stays the same
                return
        self.busy -= 1

    async def run_in_slot(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn in the pool; the caller must hold a slot (acquire) and release it after."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, fn: Callable[..., T], *args: object, priority: int = ONLINE) -> T:
        await self.acquire(priority)
        try:
            return await self.run_in_slot(fn, *args)
        finally:
            self.release()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
