"""Measure one system at a list of concurrencies: warm up, repeat, take medians."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loadtests.bench_systems import Server
from loadtests.loadgen import RunResult, closed_loop, encode_request, percentile
from podserve.phases import PHASES, parse_server_timing

MAX_REQUESTS_PER_RUN = 500_000
METRICS_FLUSH_S = 1.1  # podserve workers write their metric tallies once a second


@dataclass
class Sample:
    """One measured run (times in ms, CPU in % of one core)."""

    throughput: float
    p50: float
    p95: float
    p99: float
    io_p50: float | None
    io_p99: float | None
    infer_p50: float | None
    infer_p99: float | None
    phase_means: dict[str, float]
    latency_mean: float
    server_cpu: float
    client_cpu: float
    cpu_ms_per_request: float  # server CPU per answered request: robust to other load
    failures: int
    requests: int
    load1: float  # 1-minute load average after the run: others' CPU use shows here
    statuses: dict[str, int] = field(default_factory=dict)  # HTTP status (or error) -> count
    rows_per_batch: float | None = None  # podserve only: mean rows per ORT session run
    loop_cpu_ms_per_request: float | None = None  # of cpu_ms_per_request: workers' main threads


@dataclass
class Point:
    """Medians over the repeats of one (system, concurrency)."""

    system: str
    concurrency: int
    median: dict[str, float | None]
    phase_means: dict[str, float]
    samples: list[Sample] = field(default_factory=list)


def _run_loop(coro_factory: Callable[[], object]) -> RunResult:
    try:
        import uvloop  # lower client CPU: the generator shares the cores with the server

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro_factory())  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro_factory())  # type: ignore[arg-type]


def rows_per_batch(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def one_run(
    server: Server, concurrency: int, duration_s: float, honor_retry_after: bool = False
) -> tuple[RunResult, float]:
    system = server.system
    request = [
        encode_request("POST", "127.0.0.1", system.port, system.path, body, "application/json")
        for body in system.bodies or [system.body]
    ]
    cpu_before = server.cpu_seconds()
    result = _run_loop(
        lambda: closed_loop(
            "127.0.0.1",
            system.port,
            request,
            concurrency,
            duration_s,
            MAX_REQUESTS_PER_RUN,
            honor_retry_after=honor_retry_after,
        )
    )
    return result, server.cpu_seconds() - cpu_before


def _phase_values(timings: list[str]) -> dict[str, list[float]]:
    values: dict[str, list[float]] = {}
    for header in timings:
        for phase, ms in parse_server_timing(header).items():
            values.setdefault(phase, []).append(ms)
    return values


def summarize(result: RunResult, server_cpu_s: float, io_phase: str | None) -> Sample:
    lat = [x * 1000 for x in result.latencies]
    phases = _phase_values(result.server_timings)
    io = phases.get(io_phase or "", [])
    infer = phases.get("infer", [])
    elapsed = max(result.elapsed_s, 1e-9)
    return Sample(
        throughput=result.throughput,
        p50=percentile(lat, 0.50),
        p95=percentile(lat, 0.95),
        p99=percentile(lat, 0.99),
        io_p50=percentile(io, 0.50) if io else None,
        io_p99=percentile(io, 0.99) if io else None,
        infer_p50=percentile(infer, 0.50) if infer else None,
        infer_p99=percentile(infer, 0.99) if infer else None,
        phase_means={p: statistics.fmean(v) for p, v in phases.items() if p in PHASES},
        latency_mean=statistics.fmean(lat) if lat else float("nan"),
        server_cpu=100 * server_cpu_s / elapsed,
        client_cpu=100 * result.client_cpu_s / elapsed,
        cpu_ms_per_request=1000 * server_cpu_s / result.ok if result.ok else float("nan"),
        failures=result.failures,
        requests=len(lat),
        load1=os.getloadavg()[0],
        statuses={
            **{str(k): v for k, v in result.statuses.items()},
            **({"error": len(result.errors)} if result.errors else {}),
        },
    )


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def measure_once(
    server: Server,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    honor_retry_after: bool = False,
) -> Sample:
    """Warm up (caches, connections, batch sizes), then one measured run."""
    one_run(server, concurrency, warmup_s, honor_retry_after)
    if server.is_podserve:
        time.sleep(METRICS_FLUSH_S)  # every worker has written the warm-up's tallies
    batches_before = server.batch_totals()
    loop_before = server.loop_thread_seconds()
    result, cpu_s = one_run(server, concurrency, duration_s, honor_retry_after)
    loop_s = server.loop_thread_seconds() - loop_before
    time.sleep(0.2)  # let the last replies drain
    sample = summarize(result, cpu_s, server.system.io_phase)
    if result.ok:
        sample.loop_cpu_ms_per_request = 1000 * loop_s / result.ok
    if server.is_podserve:
        time.sleep(METRICS_FLUSH_S)
        sample.rows_per_batch = rows_per_batch(batches_before, server.batch_totals())
    return sample


def describe(system: str, concurrency: int, s: Sample) -> str:
    return (
        f"  {system:<20} c={concurrency:<3} {s.throughput:8.1f}/s p50 {s.p50:7.1f} "
        f"p99 {s.p99:7.1f} ms  io p99 {_fmt(s.io_p99)} srv {s.server_cpu:5.0f}% "
        f"cli {s.client_cpu:4.0f}% fail {s.failures} load {s.load1:.1f}"
    )


def make_point(system: str, concurrency: int, samples: list[Sample]) -> Point:
    """Medians over the repeats of one (system, concurrency)."""
    keys = [k for k in Sample.__dataclass_fields__ if k not in ("phase_means", "statuses")]
    median = {k: _median([getattr(s, k) for s in samples]) for k in keys}
    phases = sorted({p for s in samples for p in s.phase_means}, key=PHASES.index)
    phase_means = {
        p: statistics.median([s.phase_means[p] for s in samples if p in s.phase_means])
        for p in phases
    }
    return Point(system, concurrency, median, phase_means, samples)


def _fmt(value: float | None) -> str:
    return f"{value:6.2f}" if value is not None else "     -"
