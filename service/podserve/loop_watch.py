"""Event-loop lag, and a watchdog that shows what blocks a stalled loop.

Every request's awaited I/O resumes on its worker's event loop, so a loop that runs late
makes every `features` phase late (the benchmark's I/O-phase inflation is exactly that).
A tick on the loop every TICK_S measures how late it ran (`podserve_event_loop_lag_seconds`:
the loop was busy, or its thread was not scheduled).

A loop that does not run at all (a synchronous call or a C extension holding the GIL, where
podserve's design allows none) would only end when Gunicorn's worker timeout kills the
worker, and that says nothing of the cause. A watchdog thread notices a loop that has not
ticked for PODSERVE_LOOP_STALL_S, logs the loop thread's Python stack once per stall (the
frame that blocks it) and counts `podserve_event_loop_stalls_total`; when the loop runs
again, it logs how long it was blocked.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

log = logging.getLogger(__name__)

TICK_S = 0.1  # ~10 callbacks a second per worker: a few microseconds each
MAX_STACK_CHARS = 8000


class LoopWatch:
    def __init__(
        self,
        stall_s: float,
        on_lag: Callable[[float], None] | None = None,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self.stall_s = stall_s
        self.on_lag = on_lag  # called on the loop
        self.on_stall = on_stall  # called from the watchdog thread
        self.stalls = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._due = 0.0
        self._last_tick = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call on the loop's own thread."""
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._last_tick = time.monotonic()
        self._schedule(self._last_tick)
        if self.stall_s > 0:
            self._thread = threading.Thread(
                target=self._watch, name="podserve-loop-watchdog", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
        if self._thread is not None:
            self._thread.join(timeout=1.0)

    # --- on the loop ---------------------------------------------------------------------
    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + TICK_S
        self._handle = self._loop.call_later(TICK_S, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._due)
        self._last_tick = now
        if self.stall_s > 0 and lag >= self.stall_s:
            log.warning("event loop ran again after a stall", extra={"blocked_s": round(lag, 3)})
        if self.on_lag is not None:
            self.on_lag(lag)
        if not self._stop.is_set():
            self._schedule(now)

    # --- the watchdog thread ---------------------------------------------------------------
    def _watch(self) -> None:
        reported_tick = None  # the last tick a stall was reported after: once per stall
        while not self._stop.wait(min(1.0, self.stall_s / 4)):
            last_tick = self._last_tick
            silent = time.monotonic() - last_tick - TICK_S
            if silent >= self.stall_s and reported_tick != last_tick:
                reported_tick = last_tick
                self._report(silent)

    def _report(self, silent: float) -> None:
        self.stalls += 1
        frame = sys._current_frames().get(self._loop_thread)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(unknown)"
        log.error(
            "event loop stalled: it has not run for %.1f s; its thread's stack follows",
            silent,
            extra={"stalled_s": round(silent, 3), "stack": stack[-MAX_STACK_CHARS:]},
        )
        if self.on_stall is not None:
            self.on_stall()
