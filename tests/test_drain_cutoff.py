"""A request still running when a worker's drain time ends: 503 + Retry-After, not a 500.

The drain (PODSERVE_GRACEFUL_TIMEOUT_S - 2 s) lets in-flight requests finish; one that runs
longer is cancelled by uvicorn, which answered it 500 Internal Server Error, as for a server
bug. A real server, a real request kept running by a long `features` phase
(PODSERVE_SIMULATED_IO_MS), a real SIGTERM.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def test_a_request_cut_off_by_the_end_of_the_drain_gets_503_and_retry_after(
    model_repo: Path,
) -> None:
    env = {"PODSERVE_SIMULATED_IO_MS": "6000", "PODSERVE_GRACEFUL_TIMEOUT_S": "3"}  # drain: 1 s
    with ServerProcess(model_repo, workers=1, env=env) as server, ThreadPoolExecutor(1) as pool:
        url = f"{server.url}/v2/models/affine/infer"
        pending = pool.submit(httpx.post, url, json=BODY, timeout=30)
        time.sleep(0.5)  # the request is in its 6 s features phase
        server.signal(signal.SIGTERM)
        response = pending.result()
        exit_code = server.proc.wait(20)  # type: ignore[union-attr]
        logs = server.logs()
    assert response.status_code == 503, (response.status_code, response.text, logs[-3000:])
    assert response.headers["retry-after"] == "1"
    assert "drain time" in response.json()["error"]
    assert exit_code == 0, logs[-3000:]
    assert "request cut off at the end of the drain" in logs
    assert "Exception in ASGI application" not in logs, logs[-3000:]


def test_a_request_that_ends_within_the_drain_is_answered_normally(model_repo: Path) -> None:
    env = {"PODSERVE_SIMULATED_IO_MS": "1500", "PODSERVE_GRACEFUL_TIMEOUT_S": "6"}  # drain: 4 s
    with ServerProcess(model_repo, workers=1, env=env) as server, ThreadPoolExecutor(1) as pool:
        url = f"{server.url}/v2/models/affine/infer"
        pending = pool.submit(httpx.post, url, json=BODY, timeout=30)
        time.sleep(0.5)
        server.signal(signal.SIGTERM)
        response = pending.result()
        logs = server.logs()
    assert response.status_code == 200, (response.status_code, response.text, logs[-3000:])
    assert "request cut off" not in logs
