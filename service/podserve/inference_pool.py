"""A small bounded thread pool for CPU work, with priority slots.

ONNX Runtime releases the GIL, so one thread per worker keeps a core busy without
blocking the event loop. Slots are handed out by priority so background jobs never
delay online requests by more than the session run they hold: a job runs in pieces
(db/jobs.py), and a waiting online batch gets the thread after the current one.

Among waiters of one priority a freed thread goes to the model (its batcher's `Turn`) whose
last run started longest ago, not to whoever asked first: a backlogged model asks again as
soon as its batch starts, so first-come first-served let a flooded slow model book every
next slot before another model's request arrived (an isolation review: a fast model's
request waited for the slow batch running *and* the one booked after it, p50 4.5 -> 181 ms).

The threads are podserve's own, not a ThreadPoolExecutor behind run_in_executor: a work
item is a tuple on a SimpleQueue, and the result goes back with one call_soon_threadsafe.
The executor's round trip (a concurrent Future with its condition, the idle semaphore, the
chaining of two futures) cost ~80 us of CPU per batch here against ~26 us for this one
(`python -m loadtests.bench_thread_handoff`, a no-op function on the 2-core dev machine):
for the tabular model that is more than the inference itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from podserve.time_slice import shorten_slice

T = TypeVar("T")
log = logging.getLogger(__name__)

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


_STOP = None  # a work item that ends one thread


def _deliver(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting request was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _serve_work(work: queue.SimpleQueue, niceness: int, idle_policy: bool, slice_us: float) -> None:
    try:  # scheduling hints only: a failure here must not kill the thread (inference would hang)
        _lower_thread_priority(niceness, idle_policy)
        shorten_slice(slice_us, "inference")  # after nice: sched_setattr keeps the nice it reads
    except Exception:
        log.exception("inference thread runs with the default scheduling")
    while (item := work.get()) is not _STOP:
        fn, args, future, loop = item
        result, error = None, None
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting coroutine, as an executor would
            error = exc
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(_deliver, future, result, error)
        del item, fn, args, future, result, error  # do not hold a batch while idle


class Turn:
    """One caller's place in the pool's rotation (a batcher's): the grant number of its
    last slot. A caller must have at most one waiter at a time, so the number is fixed while
    it waits (the heap's order stays valid)."""

    __slots__ = ("last_start",)

    def __init__(self) -> None:
        self.last_start = -1  # never ran: ahead of every model that has


class InferencePool:
    def __init__(
        self, threads: int, niceness: int = 0, idle_policy: bool = False, slice_us: float = 0
    ) -> None:
        self.capacity = threads
        self.busy = 0
        self._niceness, self._idle_policy, self._slice_us = niceness, idle_policy, slice_us
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []  # started on first use
        self._closed = False
        # (priority, the turn's last grant, arrival, waiter, turn): arrival breaks ties (FIFO)
        self._waiters: list[tuple[int, int, int, asyncio.Future[None], Turn | None]] = []
        self._order = itertools.count()
        self._grants = itertools.count()  # numbers each slot handed out, for Turn.last_start
        # Called when a thread frees up with nobody waiting for it (a batcher waiting to fill
        # a batch only while the pool is busy stops waiting then).
        self.on_release: set[Callable[[], None]] = set()

    async def run_apart(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) in a thread of its own, scheduled as the inference threads are.

        For loading models: a session's ONNX Runtime intra-op threads (more than one where
        a worker has several cores) are made with it and inherit its thread's nice value and
        policy (Linux keeps them per thread), so they too yield the CPU to the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        work: queue.SimpleQueue = queue.SimpleQueue()
        work.put((fn, args, future, loop))
        work.put(_STOP)
        settings = (work, self._niceness, self._idle_policy, self._slice_us)
        threading.Thread(target=_serve_work, args=settings, name="model-load", daemon=True).start()
        return await future

    async def acquire(self, priority: int = ONLINE, turn: Turn | None = None) -> None:
        """Wait for a free thread; lower priority numbers are served first, then the `turn`
        whose last slot is oldest (none: counts as never served), then the first to ask."""
        if self.busy < self.capacity and not self._waiters:
            self.busy += 1
            if turn is not None:
                turn.last_start = next(self._grants)
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        last = -1 if turn is None else turn.last_start
        heapq.heappush(self._waiters, (priority, last, next(self._order), waiter, turn))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            raise

    def release(self) -> None:
        while self._waiters:
            _, _, _, waiter, turn = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)  # hand the slot over: busy stays the same
                if turn is not None:
                    turn.last_start = next(self._grants)
                return
        self.busy -= 1
        for wake in self.on_release:
            wake()

    async def run_in_slot(self, fn: Callable[..., T], *args: object) -> T:
        """Run fn in the pool; the caller must hold a slot (acquire) and release it after."""
        if self._closed:
            raise RuntimeError("the inference pool is shut down")
        if not self._threads:
            self._start_threads()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._work.put((fn, args, future, loop))
        return await future

    def _start_threads(self) -> None:
        for index in range(self.capacity):
            thread = threading.Thread(
                target=_serve_work,
                args=(self._work, self._niceness, self._idle_policy, self._slice_us),
                name=f"podserve-infer_{index}",
                daemon=True,  # shutdown() joins them; never hold up the interpreter's exit
            )
            thread.start()
            self._threads.append(thread)

    async def run(self, fn: Callable[..., T], *args: object, priority: int = ONLINE) -> T:
        await self.acquire(priority)
        try:
            return await self.run_in_slot(fn, *args)
        finally:
            self.release()

    def shutdown(self) -> None:
        """Finish the work already queued, then stop and join the threads."""
        self._closed = True
        for _ in self._threads:
            self._work.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._threads.clear()
