"""A request still running when a worker's drain time ends: 503 + Retry-After, not a 500.

The drain (PODSERVE_GRACEFUL_TIMEOUT_S - 2 s) lets in-flight requests finish; one that runs
longer is cancelled by uvicorn, which answered it 500 Internal Server Error, as for a server
bug. A real server, a real request kept running by a long `features` phase
(PODSERVE_SIMULATED_IO_MS), a real SIGTERM.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from metrics_support import wait_for_in_flight
from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _sigterm_during_request(
    model_repo: Path, io_ms: int, graceful_s: int
) -> tuple[httpx.Response, int, str]:
    """One request kept running io_ms by its features phase; SIGTERM 0.5 s into it.
    The drain is graceful_s - 2 s. Returns the response, the exit code and the logs."""
    env = {"PODSERVE_SIMULATED_IO_MS": str(io_ms), "PODSERVE_GRACEFUL_TIMEOUT_S": str(graceful_s)}
    with ServerProcess(model_repo, workers=1, env=env) as server, ThreadPoolExecutor(1) as pool:
        url = f"{server.url}/v2/models/affine/infer"
        pending = pool.submit(httpx.post, url, json=BODY, timeout=30)
        wait_for_in_flight(server.url, 1)  # in its features phase (io_ms long)
        server.signal(signal.SIGTERM)
        response = pending.result()
        exit_code = server.proc.wait(20)  # type: ignore[union-attr]
        return response, exit_code, server.logs()


def test_a_request_cut_off_by_the_end_of_the_drain_gets_503_and_retry_after(
    model_repo: Path,
) -> None:
    response, exit_code, logs = _sigterm_during_request(model_repo, io_ms=6000, graceful_s=3)
    assert response.status_code == 503, (response.status_code, response.text, logs[-3000:])
    assert response.headers["retry-after"] == "1"
    assert "drain time" in response.json()["error"]
    assert exit_code == 0, logs[-3000:]
    assert "request cut off at the end of the drain" in logs
    assert "Exception in ASGI application" not in logs, logs[-3000:]


def test_a_request_that_ends_within_the_drain_is_answered_normally(model_repo: Path) -> None:
    response, exit_code, logs = _sigterm_during_request(model_repo, io_ms=1500, graceful_s=6)
    assert response.status_code == 200, (response.status_code, response.text, logs[-3000:])
    assert exit_code == 0, logs[-3000:]
    assert "request cut off" not in logs
