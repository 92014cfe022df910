"""Request phases: one vocabulary for spans, metrics and the Server-Timing header."""

from __future__ import annotations

import time
from types import TracebackType

PHASES = ("parse", "features", "preprocess", "queue", "infer", "postprocess", "log")
# Server-Timing's last entry, not a phase: the request's in-app time until the header was
# built, so the share in no phase shows (no span, no histogram: the request's own have it).
TOTAL = "total"


class PhaseTimings:
    """Durations in seconds of the phases a request went through, in order.

    With `wall_clock` (tracing on), each stretch of a phase as (start, end) in time_ns too,
    for its trace spans; without it the hot path reads only the monotonic clock. A phase
    can run in several stretches (`parse` before and after `features`; `postprocess` in the
    inference thread and in the route): one span from the first start to the last end
    covered what ran between them too.
    """

    __slots__ = ("durations", "stretches_ns", "wall_clock")

    def __init__(self, wall_clock: bool = True) -> None:
        self.durations: dict[str, float] = {}
        self.stretches_ns: dict[str, list[tuple[int, int]]] = {}
        self.wall_clock = wall_clock

    def record(self, phase: str, seconds: float, start_ns: int | None = None) -> None:
        durations = self.durations
        durations[phase] = durations.get(phase, 0.0) + seconds
        if start_ns is not None and self.wall_clock:
            stretch = (start_ns, start_ns + int(seconds * 1e9))
            self.stretches_ns.setdefault(phase, []).append(stretch)

    def measure(self, phase: str) -> _PhaseClock:
        """`with timings.measure("parse"): ...` records the block's duration, errors included."""
        return _PhaseClock(self, phase)

    def server_timing(self, total_s: float | None = None) -> str:
        """`parse;dur=0.081, infer;dur=2.3, total;dur=2.9` (milliseconds): the phases that
        ran, in phase order, then `total` when given (the request's time so far)."""
        durations = self.durations
        parts = [
            f"{phase};dur={durations[phase] * 1000:.3f}" for phase in PHASES if phase in durations
        ]
        if total_s is not None:
            parts.append(f"{TOTAL};dur={total_s * 1000:.3f}")
        return ", ".join(parts)


class _PhaseClock:
    """A plain class, not @contextmanager: a request enters ~5 of these, and a generator-based
    context manager costs ~3x as much CPU per use."""

    __slots__ = ("_phase", "_start", "_start_ns", "_timings")

    def __init__(self, timings: PhaseTimings, phase: str) -> None:
        self._timings = timings
        self._phase = phase

    def __enter__(self) -> None:
        self._start_ns = time.time_ns() if self._timings.wall_clock else None
        self._start = time.perf_counter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._timings.record(self._phase, time.perf_counter() - self._start, self._start_ns)


def parse_server_timing(header: str, with_total: bool = False) -> dict[str, float]:
    """Inverse of PhaseTimings.server_timing (milliseconds), for clients and tests: the
    phases only (their values add up to the phases' time), unless `with_total`."""
    result: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        name = name.strip()
        if name == TOTAL and not with_total:
            continue
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                result[name] = float(value)
    return result
