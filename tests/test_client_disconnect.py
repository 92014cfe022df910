"""A queued request whose client disconnects is withdrawn, not run (real Gunicorn server)."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import httpx
import orjson

from metrics_support import scrape
from model_builders import save, slow_model
from server_process import ServerProcess

SLOW = "/v2/models/slow/infer"
ROUTE = "/v2/models/{model_name}/infer"


def _slow_body(rows: int) -> bytes:
    tensor = {"name": "x", "shape": [rows, 256], "datatype": "FP32", "data": [0.01] * (rows * 256)}
    return orjson.dumps({"inputs": [tensor]})


def _raw_request(port: int, body: bytes) -> bytes:
    head = (
        f"POST {SLOW} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _slow_stats(url: str) -> dict:
    (stat,) = httpx.get(f"{url}/v2/models/slow/stats", timeout=10).json()["model_stats"]
    return stat


def _busy_rows(url: str, seconds: float = 2.0, most: int = 200) -> int:
    """Rows for a request that keeps the inference thread for about `seconds` on this host
    (a fixed 128 rows took 0.38 s on a faster one: less than the test's own waits). At most
    `most`, so the leavers' rows still fit the queue (PODSERVE_MAX_QUEUE_ROWS, 256)."""
    headers = {"content-type": "application/json"}
    httpx.post(f"{url}{SLOW}", content=_slow_body(8), headers=headers, timeout=60)  # warm-up
    started = time.perf_counter()
    response = httpx.post(f"{url}{SLOW}", content=_slow_body(8), headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    per_row = (time.perf_counter() - started) / 8
    return max(8, min(most, math.ceil(seconds / per_row)))


async def _occupy_then_leave(
    url: str, port: int, leavers: int, rows: int, leaver_body: bytes | None = None
) -> tuple[float, float, int]:
    """One long request (`rows`) takes the worker's inference thread; `leavers` clients
    queue a request each (`leaver_body`, default one row) behind it and close their
    connections before it ends. Returns when the leavers closed, when the long request
    ended, and its status."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        headers = {"content-type": "application/json"}
        busy = asyncio.create_task(client.post(SLOW, content=_slow_body(rows), headers=headers))
        await asyncio.sleep(0.2)  # it is running: the one inference thread is taken
        writers = []
        for _ in range(leavers):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(_raw_request(port, leaver_body or _slow_body(1)))
            await writer.drain()
            writers.append(writer)
        await asyncio.sleep(0.3)  # read, parsed and queued behind the long request
        for writer in writers:
            writer.close()
        closed_at = time.monotonic()
        response = await busy
        return closed_at, time.monotonic(), response.status_code


def test_a_queued_request_whose_client_left_never_runs(tmp_path: Path) -> None:
    # Four times the shared slow model's layers: the long request needs fewer rows. Batches
    # of up to 256 rows: the long request runs as one session run, not in pieces.
    save(slow_model(layers=96), tmp_path, "slow", 1, {"max_batch_size": 256})
    with ServerProcess(tmp_path, workers=1) as server:
        rows = _busy_rows(server.url)
        before = _slow_stats(server.url)
        closed_at, busy_ended_at, busy_status = asyncio.run(
            _occupy_then_leave(server.url, server.port, leavers=5, rows=rows)
        )
        assert busy_status == 200
        assert busy_ended_at > closed_at + 0.1, "the long request ended before the clients left"
        # A live request after them is served as usual.
        live = httpx.post(
            f"{server.url}{SLOW}",
            content=_slow_body(1),
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert live.status_code == 200, live.text
        deadline = time.monotonic() + 10
        while (statuses := _statuses(server.url)).get("499", 0) < 5:
            assert time.monotonic() < deadline, statuses
            time.sleep(0.2)
        assert statuses.get("200") == 4 and statuses.get("499") == 5, statuses  # 2 calibrate
        after = _slow_stats(server.url)
        # The long request and the live one ran; the 5 queued behind them never did.
        assert after["execution_count"] - before["execution_count"] == 2
        assert after["inference_count"] - before["inference_count"] == rows + 1
        metrics = scrape(server.url)
        assert metrics.value("podserve_queue_rows") == 0  # their rows were freed, too
        # Their wait is in the queue phase, as a 504's is: 2 served + 5 gone.
        queued = metrics.value("podserve_phase_duration_seconds_count", model="slow", phase="queue")
        assert queued == 9, queued  # and the 2 that calibrated


def test_a_queued_request_with_a_large_body_whose_client_left_never_runs(
    tmp_path: Path,
) -> None:
    # uvicorn pauses reading once a body buffers past 64 KiB and resumes only on the app's
    # next receive(), which never comes after the last chunk: the client's close went unseen
    # and the request ran. 256 KiB of trailing whitespace (valid JSON) makes the body large.
    save(slow_model(layers=96), tmp_path, "slow", 1, {"max_batch_size": 256})
    large = _slow_body(1) + b" " * (256 * 1024)
    with ServerProcess(tmp_path, workers=1) as server:
        rows = _busy_rows(server.url)
        before = _slow_stats(server.url)
        closed_at, busy_ended_at, busy_status = asyncio.run(
            _occupy_then_leave(server.url, server.port, leavers=1, rows=rows, leaver_body=large)
        )
        assert busy_status == 200
        assert busy_ended_at > closed_at + 0.1, "the long request ended before the client left"
        deadline = time.monotonic() + 10
        while (statuses := _statuses(server.url)).get("499", 0) < 1:
            assert time.monotonic() < deadline, statuses
            time.sleep(0.2)
        assert statuses.get("200") == 3 and statuses.get("499") == 1, statuses  # 2 calibrate
        after = _slow_stats(server.url)
        assert after["execution_count"] - before["execution_count"] == 1  # the long one only
        assert after["inference_count"] - before["inference_count"] == rows
        assert scrape(server.url).value("podserve_queue_rows") == 0


def _statuses(url: str) -> dict[str, float]:
    samples = scrape(url).find("podserve_requests_total", model="slow", route=ROUTE)
    counts: dict[str, float] = {}
    for sample in samples:
        counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
    return counts
