"""Deadlines of many short waits on one event loop, checked by one periodic sweep.

The header guard and the body reader bound every request's reads with a deadline that
almost never fires. A timer armed and cancelled per request (loop.call_later, or
asyncio.timeout around the body) cost ~2% and ~5% of a worker's CPU at a few thousand
requests/s; a dict entry per request costs next to nothing. A deadline fires within a
tenth of its timeout (at most 1 s) after it passes: nginx-like precision for a guard.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Hashable

log = logging.getLogger(__name__)


class DeadlineSweep:
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.interval_s = min(1.0, max(0.01, timeout_s / 10))
        self._pending: dict[Hashable, tuple[float, Callable[[], None]]] = {}
        self._sweep_handle: asyncio.TimerHandle | None = None

    def arm(self, key: Hashable, on_expiry: Callable[[], None]) -> None:
        """`on_expiry` runs on the loop once `timeout_s` has passed, unless disarmed first."""
        self._pending[key] = (self.loop.time() + self.timeout_s, on_expiry)
        if self._sweep_handle is None:
            self._sweep_handle = self.loop.call_later(self.interval_s, self._sweep)

    def disarm(self, key: Hashable) -> None:
        self._pending.pop(key, None)

    def _sweep(self) -> None:
        now = self.loop.time()
        expired = [key for key, (deadline, _) in self._pending.items() if deadline <= now]
        try:
            for key in expired:
                entry = self._pending.pop(key, None)  # a callback may have disarmed it
                if entry is None:
                    continue
                try:
                    entry[1]()
                except Exception:  # one callback's bug must not fail the deadlines after it
                    log.exception("a deadline's expiry callback failed", extra={"key": repr(key)})
        finally:  # the next sweep, always: else no deadline of this timeout fires again
            self._sweep_handle = (
                self.loop.call_later(self.interval_s, self._sweep) if self._pending else None
            )


_sweeps: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, DeadlineSweep]] = (
    weakref.WeakKeyDictionary()
)


def sweep_for(loop: asyncio.AbstractEventLoop, timeout_s: float) -> DeadlineSweep:
    """The loop's sweep for this timeout (a worker has one loop and a few timeouts)."""
    by_timeout = _sweeps.setdefault(loop, {})
    sweep = by_timeout.get(timeout_s)
    if sweep is None:
        sweep = by_timeout[timeout_s] = DeadlineSweep(loop, timeout_s)
    return sweep
