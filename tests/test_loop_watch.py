"""The event-loop watch on a real asyncio loop, blocked by a real synchronous call, and in a
real Gunicorn worker whose loop a signal handler blocks.

The lag histogram on a running server's /metrics is checked in
tests/observability/test_metrics.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from metrics_support import scrape
from podserve.loop_watch import TICK_S, LoopWatch
from server_process import ServerProcess


def block_the_loop_with_a_synchronous_call(seconds: float) -> None:
    time.sleep(seconds)  # what the watchdog must point at


async def _watched(watch: LoopWatch, blocked_s: float, idle_s: float) -> None:
    watch.start(asyncio.get_running_loop())
    try:
        await asyncio.sleep(idle_s)
        if blocked_s:
            block_the_loop_with_a_synchronous_call(blocked_s)
            await asyncio.sleep(2 * TICK_S)  # the next tick sees how late it is
    finally:
        watch.stop()


def test_a_stalled_loop_is_reported_once_with_the_blocking_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lags: list[float] = []
    stalls: list[int] = []
    watch = LoopWatch(0.3, on_lag=lags.append, on_stall=lambda: stalls.append(1))
    with caplog.at_level(logging.WARNING, logger="podserve.loop_watch"):
        asyncio.run(_watched(watch, blocked_s=1.2, idle_s=0.35))
    stalled = [r for r in caplog.records if r.getMessage().startswith("event loop stalled")]
    assert len(stalled) == 1 and stalls == [1] and watch.stalls == 1, caplog.text
    assert "block_the_loop_with_a_synchronous_call" in stalled[0].stack  # type: ignore[attr-defined]
    assert 0.3 <= stalled[0].stalled_s < 1.2  # type: ignore[attr-defined]
    resumed = [r for r in caplog.records if r.getMessage().startswith("event loop ran again")]
    assert len(resumed) == 1 and 1.0 <= resumed[0].blocked_s < 2.0  # type: ignore[attr-defined]
    assert max(lags) >= 1.0  # the tick after the block ran that late
    assert sorted(lags)[len(lags) // 2] < 0.05, lags  # the others ran on time


def test_an_idle_loop_ticks_on_time_and_no_watchdog_when_off() -> None:
    lags: list[float] = []
    watch = LoopWatch(0.0, on_lag=lags.append)
    asyncio.run(_watched(watch, blocked_s=0.0, idle_s=1.0))
    assert watch._thread is None  # stall_s 0: lag only
    assert 7 <= len(lags) <= 11, lags  # a tick every 0.1 s
    assert max(lags) < 0.05, lags


# Loaded by every Python process of the server (sitecustomize): a real-time signal makes the
# worker's main thread, where its event loop runs, sleep as a synchronous call would.
STALL_HOOK = """
import signal, time

def block_the_event_loop_on_signal(signum, frame):
    time.sleep(2.5)

signal.signal(signal.SIGRTMIN + 3, block_the_event_loop_on_signal)
"""


def test_a_worker_whose_loop_stalls_logs_the_blocking_frame(
    model_repo: Path, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(STALL_HOOK)
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "PODSERVE_LOOP_STALL_S": "1",
    }
    with ServerProcess(model_repo, workers=1, env=env) as server:
        (worker,) = server.worker_pids()
        os.kill(worker, signal.SIGRTMIN + 3)
        deadline = time.monotonic() + 15
        while "event loop ran again" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        logs = server.logs()
        time.sleep(1.2)  # the worker writes its counters once a second
        stalls = scrape(server.url).value("podserve_event_loop_stalls_total")
        answered = httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code
    stalled = [line for line in logs.splitlines() if "event loop stalled" in line]
    assert len(stalled) == 1, logs[-3000:]
    assert "block_the_event_loop_on_signal" in stalled[0]  # the stack names the culprit
    assert "event loop ran again after a stall" in logs
    assert stalls == 1 and answered == 200
