"""/metrics on real Gunicorn with 2 workers: counts add up exactly, whichever worker answers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from load_client import closed_loop
from metrics_support import Scrape, scrape
from podserve.metrics import REFRESH_S
from server_process import ServerProcess

INFER = "/v2/models/{model_name}/infer"
PREDICT = "/v1/models/{model_name}:predict"
AFFINE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
SLOW = orjson.dumps(
    {"inputs": [{"name": "x", "shape": [4, 256], "datatype": "FP32", "data": [0.01] * 1024}]}
)
STALE = """
from prometheus_client import Counter
Counter("podserve_requests", "stale", ["model", "route", "status"]).labels(
    "affine", "/v2/models/{model_name}/infer", "200").inc(1000)
"""


@pytest.fixture(scope="module")
def metrics_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding samples of an earlier run: the server must start from zero."""
    path = tmp_path_factory.mktemp("metrics")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    subprocess.run([sys.executable, "-c", STALE], env=env, check=True)
    assert list(path.glob("counter_*.db")), "the stale sample was not written"
    return path


@pytest.fixture(scope="module")
def server(model_repo: Path, metrics_dir: Path) -> Iterator[ServerProcess]:
    env = {
        "PODSERVE_PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PODSERVE_TRACING_ENABLED": "false",
        "PODSERVE_MAX_QUEUE_ROWS": "8",
        # The in-flight test holds bodies one byte short while it scrapes: on a loaded machine
        # that may take longer than the default 30 s body-read timeout would allow (a 408).
        "PODSERVE_BODY_READ_TIMEOUT_S": "120",
    }
    with ServerProcess(model_repo, workers=2, env=env) as proc:
        yield proc


def _post(url: str, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
    """A fresh connection per request: the kernel spreads them over both workers."""
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=30)


def _scrape_both_workers(url: str) -> list[Scrape]:
    scrapes: list[Scrape] = []
    for _ in range(60):
        scrapes.append(scrape(url))
        if len({s.worker for s in scrapes}) == 2:
            return scrapes
    raise AssertionError(f"only worker(s) { ({s.worker for s in scrapes}) } answered /metrics")


def _settled_scrapes(url: str) -> list[Scrape]:
    """Scrapes of both workers that agree: each worker flushes its samples once a second
    (metrics.REFRESH_S), so a scrape may lag the last second of the other worker's requests."""
    deadline = time.monotonic() + 10 * REFRESH_S
    while True:
        scrapes = _scrape_both_workers(url)
        if all(_counters(other) == _counters(scrapes[0]) for other in scrapes[1:]):
            return scrapes  # the same totals whichever worker answered
        assert time.monotonic() < deadline, "the workers' totals never agreed"
        time.sleep(REFRESH_S / 4)


def _counters(result: Scrape) -> dict[tuple, float]:
    """Counter and histogram samples, without the scrapes' own (they grow with each scrape)
    and the event-loop lag ticks (they grow ten times a second on their own)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in result.samples
        if s.name.endswith(("_total", "_bucket", "_count"))
        and s.labels.get("route") != "/metrics"
        and not s.name.startswith("podserve_event_loop_lag")
    }


def test_counts_add_up_exactly_across_workers(server: ServerProcess) -> None:
    url = server.url
    workers: Counter[str] = Counter()
    for _ in range(60):
        response = _post(url, "/v2/models/affine/infer", AFFINE)
        assert response.status_code == 200
        workers[response.headers["x-podserve-worker"]] += 1
    assert len(workers) == 2, f"requests did not reach both workers: {workers}"
    assert "x-trace-id" not in response.headers  # tracing is off here
    for _ in range(10):
        assert _post(url, "/v1/models/affine:predict", {"instances": [[1, 2, 3, 4]]}).is_success
    for _ in range(5):
        assert _post(url, "/v2/models/nope/infer", AFFINE).status_code == 404
    for _ in range(3):  # a 1 us deadline passes before any batch can run
        late = _post(url, "/v2/models/affine/infer", AFFINE, {"x-podserve-timeout-ms": "0.001"})
        assert late.status_code == 504, late.text
    load = asyncio.run(closed_loop(url, "/v2/models/slow/infer", SLOW, 32, 2.0, 2000))
    assert load.errors == [] and set(load.statuses) <= {200, 503}, load.statuses
    served, shed = load.statuses[200], load.statuses[503]
    assert served > 0 and shed > 0, load.statuses

    scrapes = _settled_scrapes(url)
    first = scrapes[0]

    requests = "podserve_requests_total"
    assert first.value(requests, model="affine", route=INFER, status="200") == 60
    assert first.value(requests, model="affine", route=PREDICT, status="200") == 10
    assert first.value(requests, model="", route=INFER, status="404") == 5
    assert first.value(requests, model="affine", route=INFER, status="504") == 3
    assert first.value(requests, model="slow", route=INFER, status="200") == served
    assert first.value(requests, model="slow", route=INFER, status="503") == shed
    assert first.value("podserve_rejections_total", reason="shed") == shed
    assert first.value("podserve_rejections_total", reason="deadline") == 3
    assert first.value("podserve_inference_errors_total") == 0

    duration = "podserve_request_duration_seconds"
    assert first.value(f"{duration}_count", model="affine", route=INFER, status="200") == 60
    assert first.value(f"{duration}_bucket", model="slow", route=INFER, status="503",
                       le="+Inf") == shed  # fmt: skip
    buckets = [s.value for s in first.find(f"{duration}_bucket", model="affine", route=INFER,
                                           status="200")]  # fmt: skip
    assert buckets == sorted(buckets) and buckets[-1] == 60

    phases = "podserve_phase_duration_seconds_count"
    assert first.value(phases, model="affine", phase="parse") == 60 + 10 + 3
    assert first.value(phases, model="affine", phase="queue") == 60 + 10 + 3  # 504s waited too
    assert first.value(phases, model="affine", phase="infer") == 60 + 10
    assert first.value(phases, model="slow", phase="parse") == served + shed
    assert first.value(phases, model="slow", phase="infer") == served
    # Every served row went through exactly one batch.
    assert first.value("podserve_batch_size_sum", model="affine") == 70
    assert first.value("podserve_batch_size_sum", model="slow") == 4 * served
    assert first.value("podserve_batch_size_count", model="slow") <= served


def test_gauges_are_summed_over_live_workers(server: ServerProcess) -> None:
    # Gauges are sampled about once a second: wait until earlier tests' load has drained.
    result = _wait_for(
        server.url,
        lambda s: s.value("podserve_queue_rows") == s.value("podserve_pool_busy_threads") == 0,
    )
    assert result.value("podserve_workers") == 2
    assert result.value("podserve_pool_threads") == 2
    assert result.value("podserve_inflight_requests") == 0  # the scrape does not count itself
    assert result.value("podserve_pool_busy_threads") == 0


def test_event_loop_lag_is_measured_and_no_stall_counted(server: ServerProcess) -> None:
    """Each worker's loop ticks every 0.1 s (loop_watch.py); the lag histogram grows with
    the ticks, and an idle server's loops run them on time."""
    count = "podserve_event_loop_lag_seconds_count"
    first = _wait_for(server.url, lambda s: s.value(count) > 0)
    time.sleep(2.5)
    later = scrape(server.url)
    ticks = later.value(count) - first.value(count)
    lag = later.value("podserve_event_loop_lag_seconds_sum") - first.value(
        "podserve_event_loop_lag_seconds_sum"
    )
    assert ticks >= 10, (first, later)  # ~20/s for two workers, written once a second
    assert lag / ticks < 0.05, lag / ticks
    assert later.value("podserve_event_loop_lag_seconds_bucket", le="+Inf") == later.value(count)
    assert later.find("podserve_event_loop_stalls_total"), "the stall counter is exported at 0"
    assert later.value("podserve_event_loop_stalls_total") == 0


def test_in_flight_requests_are_visible_to_a_scrape_of_either_worker(
    server: ServerProcess,
) -> None:
    """Requests whose bodies stall one byte short stay in flight for as long as the test
    wants, so the count is exact: a load loop's requests (a few ms each, and shed ones less)
    could all be between two of a worker's once-a-second samples (peak 1 of 6 in one CI run)."""
    body = orjson.dumps(AFFINE)
    head = (
        f"POST /v2/models/affine/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(6)]
    try:
        for sock in held:
            sock.sendall(head + body[:-1])
        # Both workers' answers must count all 6 (the kernel spread the connections over them).
        seen: set[str] = set()
        deadline = time.monotonic() + 30 * REFRESH_S
        while len(seen) < 2:
            result = scrape(server.url)
            if result.value("podserve_inflight_requests") == 6:
                seen.add(result.worker)
            assert time.monotonic() < deadline, (seen, result.value("podserve_inflight_requests"))
            time.sleep(0.05)
        for sock in held:
            sock.sendall(body[-1:])
        for sock in held:
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    finally:
        for sock in held:
            sock.close()
    # Nothing leaked: the count goes back to 0 once the answers are sent.
    _wait_for(server.url, lambda s: s.value("podserve_inflight_requests") == 0, 10 * REFRESH_S)


def test_a_dead_workers_gauges_go_and_its_counts_stay(
    server: ServerProcess, metrics_dir: Path
) -> None:
    before = _wait_for(server.url, lambda s: s.value("podserve_workers") == 2)
    served = before.value("podserve_requests_total", model="affine", route=INFER)
    victim = server.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)  # no clean shutdown: only the master's hook can clean up
    # Its replacement first: the master cleans up (child_exit) before it forks a new worker.
    # A scrape taken before that clean-up counted the dead worker's gauge, so the next test's
    # scrape could see 1 worker while the new one started.
    deadline = time.monotonic() + 30
    while len(pids := _worker_pids(server)) != 2 or str(victim) in pids:
        assert time.monotonic() < deadline, f"worker {victim} not replaced: {pids}"
        time.sleep(0.1)
    after = _wait_for(server.url, lambda s: s.value("podserve_workers") == 2)
    # Its files are gone, its counts folded into the archives (test_metrics_archive.py).
    assert not list(metrics_dir.glob(f"*_{victim}.db"))
    assert list(metrics_dir.glob("counter_archive.db"))
    assert after.value("podserve_requests_total", model="affine", route=INFER) == served
    assert after.value("podserve_pool_threads") == 2


def test_openmetrics_format_on_request(server: ServerProcess) -> None:
    result = scrape(server.url, openmetrics=True)
    assert result.value("podserve_workers") == 2
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")


def _worker_pids(server: ServerProcess) -> set[str]:
    return {str(pid) for pid in server.worker_pids()}


def _wait_for(url: str, ready: Callable[[Scrape], bool], timeout: float = 30.0) -> Scrape:
    deadline = time.monotonic() + timeout
    result = None
    while time.monotonic() < deadline:
        try:
            result = scrape(url)
        except httpx.HTTPError:
            result = None
        if result is not None and ready(result):
            return result
        time.sleep(0.2)
    raise AssertionError(f"metrics never matched: {result}")
