"""Request phases: one vocabulary for spans, metrics and the Server-Timing header."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("parse", "features", "preprocess", "queue", "infer", "postprocess", "log")


@dataclass
class PhaseTimings:
    """Durations in seconds of the phases a request went through, in order."""

    durations: dict[str, float] = field(default_factory=dict)
    # Wall-clock span of each phase (time_ns), for trace spans: first start, last end.
    started_ns: dict[str, int] = field(default_factory=dict)
    ended_ns: dict[str, int] = field(default_factory=dict)

    def record(self, phase: str, seconds: float, start_ns: int | None = None) -> None:
        self.durations[phase] = self.durations.get(phase, 0.0) + seconds
        if start_ns is not None:
            self.started_ns.setdefault(phase, start_ns)
            end_ns = start_ns + int(seconds * 1e9)
            if end_ns > self.ended_ns.get(phase, 0):
                self.ended_ns[phase] = end_ns

    @contextmanager
    def measure(self, phase: str) -> Iterator[None]:
        start_ns = time.time_ns()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(phase, time.perf_counter() - start, start_ns)

    def server_timing(self) -> str:
        """`parse;dur=0.081, infer;dur=2.3` (milliseconds), phases that ran, in phase order."""
        return ", ".join(
            f"{phase};dur={self.durations[phase] * 1000:.3f}"
            for phase in PHASES
            if phase in self.durations
        )


def parse_server_timing(header: str) -> dict[str, float]:
    """Inverse of PhaseTimings.server_timing (milliseconds), for clients and tests."""
    result: dict[str, float] = {}
    for part in header.split(","):
        name, _, params = part.strip().partition(";")
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip() == "dur":
                result[name.strip()] = float(value)
    return result
