"""Scenario 3: three times the measured capacity, offered open-loop for a bounded time.

Excess load is shed with 503 + Retry-After; accepted requests stay within a latency bound
derived from the queue bound and the batch time; worker memory stays flat; the service
answers normally as soon as the load drops.

The bound. A worker admits a request only while at most Q = PODSERVE_MAX_QUEUE_ROWS rows
wait. With one inference thread and batches of up to B rows, an admitted request waits at
most for the batch in flight plus the ceil(Q/B) batches that hold the rows up to and
including its own: (ceil(Q/B) + 1) x t_batch, plus the batch delay. t_batch is the longest
`infer` phase (Server-Timing) seen during the overload itself, so CPU stolen by the load
generator and by other processes counts on both sides. The event loop and the network add
what a rejection costs end to end (the p99 latency of the 503s, measured in the same run),
twice: an accepted request passes the loop on the way in and again on the way out.
Without admission control the queue grows with the excess: at 3x for 8 s the backlog is
~16 s of work, far above this bound.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import soak
from podserve.phases import parse_server_timing
from server_process import ServerProcess
from traffic import Report

QUEUE_ROWS = 8  # PODSERVE_MAX_QUEUE_ROWS per worker
BATCH_ROWS = 8  # max_batch_size of the `slow` test model (its config.yaml)
BATCH_DELAY_MS = 2.0
OVERLOAD_FACTOR = 3.0
OVERLOAD_S = 8.0
WARMUP_S = 2.0
CONNECTIONS = 128
# Inference dominates a request, as in real model serving: a request is 4 rows of the `slow`
# model (tens of ms of CPU), so the offered rate stays within what one client process can send.
ROWS = 4
BODY = json.dumps(
    {
        "inputs": [
            {"name": "x", "shape": [ROWS, 256], "datatype": "FP32", "data": [0.01] * (ROWS * 256)}
        ]
    }
).encode()
REQUEST = soak.encode("POST", "/v2/models/slow/infer", BODY, {"Content-Type": "application/json"})


def _make() -> tuple[bytes, str | None]:
    return REQUEST, None


async def _sample_rss(pids: list[int], stop: asyncio.Event) -> dict[int, int]:
    """Highest RSS (KiB) per worker while the overload runs."""
    peak = dict.fromkeys(pids, 0)
    while not stop.is_set():
        for pid in pids:
            peak[pid] = max(peak[pid], soak.rss_kib(pid))
        await asyncio.sleep(0.5)
    return peak


async def _recovery(port: int, at: float, normal_s: float) -> dict:
    """From `at` on (the load stops), one request at a time until ten in a row are answered
    200 within `normal_s` (unloaded speed). Recovered: when the first of those ten was sent."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    conn = soak.Connection("127.0.0.1", port)
    first_ok: float | None = None
    streak: list[tuple[float, float]] = []  # (sent after `at`, seconds) of normal answers
    while len(streak) < 10 and time.perf_counter() - at < 15:
        sent = time.perf_counter()
        status = (await conn.send(REQUEST)).status
        seconds = time.perf_counter() - sent
        if status == 200 and first_ok is None:
            first_ok = sent - at
        if status == 200 and seconds <= normal_s:
            streak.append((sent - at, seconds))
        else:
            streak = []  # still shed, or still waiting behind the admitted backlog
            await asyncio.sleep(0.01)
    conn.close()
    return {
        "first_200_after_s": first_ok,
        "recovered_after_s": streak[0][0] if len(streak) == 10 else None,
        "streak_ms": [round(1000 * seconds, 1) for _, seconds in streak],
    }


async def _overload(
    port: int, pids: list[int], rate: float, normal_s: float
) -> tuple[soak.Outcome, dict, dict]:
    pool = soak.ConnectionPool("127.0.0.1", port, CONNECTIONS)
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_rss(pids, stop))
    recovery = asyncio.create_task(_recovery(port, time.perf_counter() + OVERLOAD_S, normal_s))
    outcome = await soak.open_loop(pool, _make, rate, OVERLOAD_S, soak.Outcome(keep_timings=True))
    stop.set()
    pool.close()
    return outcome, await sampler, await recovery


async def _burst(port: int, rate: float) -> None:
    pool = soak.ConnectionPool("127.0.0.1", port, CONNECTIONS)
    await soak.open_loop(pool, _make, rate, WARMUP_S)
    pool.close()


def test_overload_sheds_excess_keeps_latency_bounded_and_recovers(
    model_repo: Path, report: Report
) -> None:
    env = {
        "PODSERVE_MAX_QUEUE_ROWS": str(QUEUE_ROWS),
        "PODSERVE_RETRY_AFTER_S": "1",
        "PODSERVE_MAX_BATCH_DELAY_MS": str(BATCH_DELAY_MS),
    }
    with ServerProcess(model_repo, workers=2, env=env) as server:
        pids = server.worker_pids()
        # Two users per worker fill a batch (2 x 4 rows) and never exceed the queue bound.
        # The better of two runs: a stall of the shared machine during one would make the
        # "3x" load too light to need shedding (seen once: 15 instead of ~40 req/s).
        capacity = max(
            (asyncio.run(soak.closed_loop("127.0.0.1", server.port, _make, 4, 4.0))
             for _ in range(2)),
            key=lambda run: run.ok / run.elapsed_s,
        )  # fmt: skip
        capacity_rps = capacity.ok / capacity.elapsed_s
        normal_s = 2 * soak.percentile(capacity.latencies, 0.99) + 0.05  # unloaded speed
        # A short burst first: connections, 503 paths and allocator arenas warm up, so the
        # comparison below shows growth under sustained overload, not first use.
        asyncio.run(_burst(server.port, OVERLOAD_FACTOR * capacity_rps))
        rss_before = {pid: soak.rss_kib(pid) for pid in pids}
        outcome, rss_peak, recovery = asyncio.run(
            _overload(server.port, pids, OVERLOAD_FACTOR * capacity_rps, normal_s)
        )
        rss_after = {pid: soak.rss_kib(pid) for pid in pids}
        assert server.worker_pids() == pids, "a worker died under overload"

    infer_ms = [parse_server_timing(t)["infer"] for t in outcome.server_timings]
    shed_p99_ms = soak.percentile(outcome.shed_latencies, 0.99) * 1000
    batches = math.ceil(QUEUE_ROWS / BATCH_ROWS) + 1
    bound_ms = BATCH_DELAY_MS + batches * max(infer_ms) + 2 * shed_p99_ms
    p99_ms = soak.percentile(outcome.latencies, 0.99) * 1000
    growth = {pid: rss_after[pid] / rss_before[pid] - 1 for pid in pids}
    report(
        "overload",
        capacity_rps=round(capacity_rps, 1),
        capacity_run_shed=capacity.shed,
        offered_rps=round(OVERLOAD_FACTOR * capacity_rps, 1),
        **outcome.summary(),
        accepted_per_s=round(outcome.ok / outcome.elapsed_s, 1),
        retry_after=dict(outcome.retry_after),
        bound_ms=round(bound_ms, 1),
        accepted_p99_ms=round(p99_ms, 1),
        infer_max_ms=max(infer_ms),
        shed_p99_ms=round(shed_p99_ms, 1),
        rss_kib_before=rss_before,
        rss_kib_peak=rss_peak,
        rss_kib_after=rss_after,
        rss_growth_pct={p: round(100 * g, 2) for p, g in growth.items()},
        recovery_first_200_s=recovery["first_200_after_s"],
        recovered_after_s=recovery["recovered_after_s"],
        recovery_streak_ms=recovery["streak_ms"],
    )

    # Sends that fell behind schedule (a stalled machine) still arrive as excess load; that
    # the load was real shows in the shedding asserted below.
    assert not outcome.errors, outcome.errors
    assert set(outcome.statuses) == {200, 503}, outcome.statuses
    assert outcome.shed > outcome.sent / 3, "3x capacity must shed a good part of the load"
    assert set(outcome.retry_after) == {"1"}, outcome.retry_after
    assert p99_ms <= bound_ms, (p99_ms, bound_ms)
    assert outcome.ok >= 0.3 * capacity.ok * OVERLOAD_S / capacity.elapsed_s, "goodput collapsed"
    assert all(g < 0.05 for g in growth.values()), growth
    # Recovered at once: after the load, requests are answered at unloaded speed again as
    # soon as the backlog admitted before has drained (at most the latency bound).
    assert recovery["recovered_after_s"] is not None, recovery
    assert recovery["recovered_after_s"] < bound_ms / 1000 + 0.5, recovery
