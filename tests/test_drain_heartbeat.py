"""A draining worker keeps telling the master it is alive; the graceful timeout leaves a margin.

uvicorn notifies Gunicorn (callback_notify, every worker timeout / 2) only from main_loop's
on_tick, which has ended once the drain begins. During a full stop the master does not
check the workers' heartbeats, but it does while a worker drains for a recycle
(PODSERVE_MAX_REQUESTS), a reload (HUP) or a TTOU: a drain longer than about half of
PODSERVE_WORKER_TIMEOUT_S ended in "WORKER TIMEOUT", SIGABRT, and the in-flight requests
disconnected without an answer.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from uvicorn.config import Config

from podserve.settings import Settings
from podserve.worker import DrainingServer
from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def test_a_recycling_worker_outlives_the_worker_timeout_while_it_drains(
    affine_repo: Path,
) -> None:
    """The reviewer's setup, scaled down: worker timeout 3 s, drain 8 s, two requests of 5 s in
    flight when the worker reaches its request limit. Before: WORKER TIMEOUT ~2-3 s into the
    drain, both requests disconnected."""
    env = {
        "PODSERVE_SIMULATED_IO_MS": "5000",
        "PODSERVE_GRACEFUL_TIMEOUT_S": "10",
        "PODSERVE_WORKER_TIMEOUT_S": "3",
        "PODSERVE_MAX_REQUESTS": "10",  # + jitter of up to 1
    }
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        results: list[object] = []

        def infer() -> None:
            try:
                response = httpx.post(f"{server.url}/v2/models/affine/infer", json=BODY, timeout=30)
                results.append(response.status_code)
            except httpx.HTTPError as exc:
                results.append(repr(exc))

        slow = [threading.Thread(target=infer) for _ in range(2)]
        for thread in slow:
            thread.start()
            time.sleep(0.2)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(15):  # the worker reaches its limit with the two in flight
                client.get("/v2/health/live")
        for thread in slow:
            thread.join()
        deadline = time.monotonic() + 5  # the recycled worker's lifespan shutdown
        while "Finished server process" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        logs = server.logs()
    assert "Maximum request limit" in logs, logs[-3000:]
    assert results == [200, 200], (results, logs[-3000:])
    assert "WORKER TIMEOUT" not in logs, logs[-3000:]
    assert "Finished server process" in logs, logs[-3000:]


def test_the_drain_heartbeat_notifies_every_quarter_of_the_worker_timeout_and_stops() -> None:
    notified: list[float] = []

    async def notify() -> None:
        notified.append(time.monotonic())

    # Gunicorn hands uvicorn half its worker timeout (here 0.4 s of 0.8 s): every 0.2 s.
    server = DrainingServer(Config(app=lambda: None, callback_notify=notify, timeout_notify=0.4))

    async def scenario() -> None:
        # A drain's: for the graceful timeout; one stuck longer is left to die.
        task = asyncio.create_task(server._heartbeat(for_s=1.0))
        await asyncio.sleep(2.5)  # the 1 s deadline, with room for a loaded machine
        assert task.done()

    asyncio.run(scenario())
    assert 3 <= len(notified) <= 6, notified  # every 0.2 s for 1 s, then no more
    gaps = [later - earlier for earlier, later in itertools.pairwise(notified)]
    assert max(gaps) < 0.6, gaps  # far below the master's 0.8 s


def test_no_heartbeat_outside_gunicorn() -> None:
    server = DrainingServer(Config(app=lambda: None))
    asyncio.run(asyncio.wait_for(server._heartbeat(for_s=None), timeout=1))


@pytest.mark.parametrize("graceful_timeout", [1, 1.0, 0.5, 0.01])
def test_a_graceful_timeout_with_no_room_after_the_drain_is_refused(
    graceful_timeout: float,
) -> None:
    """At 1 s the worker's drain, max(1, ceil(1) - 2) = 1 s, ended with Gunicorn's SIGKILL:
    the request in flight was disconnected without the drain's 503, and lifespan shutdown
    (prediction-log flush, job hand-back) never ran."""
    with pytest.raises(ValidationError, match=r"PODSERVE_GRACEFUL_TIMEOUT_S .* more than 1 s"):
        Settings(graceful_timeout_s=graceful_timeout)


@pytest.mark.parametrize(("graceful_timeout", "drain"), [(1.5, 1), (2, 1), (3, 1), (25, 23)])
def test_a_graceful_timeout_with_room_after_the_drain_is_accepted(
    graceful_timeout: float, drain: int
) -> None:
    settings = Settings(graceful_timeout_s=graceful_timeout)
    assert settings.worker_drain_s == drain
    assert settings.worker_drain_s < math.ceil(graceful_timeout)  # Gunicorn: whole seconds
