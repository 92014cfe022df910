"""Benchmark aid: await a fixed delay in the `features` phase, as if fetching features.

Off by default. ``PODSERVE_SIMULATED_IO_MS=5`` makes every inference request await 5 ms on
the event loop before it is queued, recorded as the `features` phase of `Server-Timing`.
The benchmark (loadtests/bench.py) uses it to reproduce the "embed, then await a 5 ms I/O
call" workload: if anything blocked the event loop, this phase would take longer than 5 ms,
so its p99 over its idle value measures event-loop blocking.
"""

from __future__ import annotations

import asyncio

from podserve.phases import PhaseTimings
from podserve.settings import get_settings


async def simulated_features(timings: PhaseTimings) -> None:
    """The hook in inference_flow.predict: a no-op unless PODSERVE_SIMULATED_IO_MS > 0."""
    delay = get_settings().simulated_io_ms / 1000  # get_settings is cached
    if delay > 0:
        with timings.measure("features"):
            await asyncio.sleep(delay)
