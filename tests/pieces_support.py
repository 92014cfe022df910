"""Models and helpers for the tests of requests run in pieces and of terminated runs."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import orjson

from metrics_support import scrape
from model_builders import affine_model, save, slow_model
from podserve.phases import parse_server_timing

WIDTH = 256  # slow_model's row width
LAYERS = 96  # four times slow_model's default: rows within the queue bound take seconds
# The tests of clients that leave send bodies under uvicorn's 64 KiB high-water mark, where
# reading never pauses (the larger-body case is tests/test_client_disconnect.py's).
SMALL_BODY_BYTES = 65536


def build_repository(repo: Path) -> Path:
    """slow: max_batch_size 8 (a request of more rows runs in pieces); wide: the same graph
    with max_batch_size 256 (a request up to the queue bound runs whole); affine: fast."""
    save(slow_model(layers=LAYERS), repo, "slow", 1, {"max_batch_size": 8})
    save(slow_model(layers=LAYERS), repo, "wide", 1, {"max_batch_size": 256})
    save(affine_model(2.0, 1.0), repo, "affine", 1, {"max_batch_size": 16})
    return repo


def rows_body(x: np.ndarray) -> bytes:
    tensor = {"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return orjson.dumps({"inputs": [tensor]})


def output(response: httpx.Response) -> np.ndarray:
    (tensor,) = response.json()["outputs"]
    return np.asarray(tensor["data"], np.float32).reshape(tensor["shape"])


def infer(http: httpx.Client, model: str, x: np.ndarray, **headers: str) -> httpx.Response:
    return http.post(
        f"/v2/models/{model}/infer",
        content=rows_body(x),
        headers={"content-type": "application/json", **headers},
    )


def seconds_per_row(url: str) -> float:
    """The slow graph's time per row on this host, from a 32-row run of `wide` (after a
    warm-up): pieces of 8 rows run at about this speed."""
    x = np.full((32, WIDTH), 0.01, np.float32)
    with httpx.Client(base_url=url, timeout=60) as http:
        assert infer(http, "wide", x).status_code == 200
        started = time.perf_counter()
        assert infer(http, "wide", x).status_code == 200
    return (time.perf_counter() - started) / 32


def rows_for(seconds: float, per_row: float, least: int = 32, most: int = 248) -> int:
    """A multiple of 8 rows that keeps the thread about `seconds`, within the queue bound."""
    return max(least, min(most, 8 * math.ceil(seconds / per_row / 8)))


def raw_request(port: int, model: str, body: bytes, timeout_ms: int | None = None) -> bytes:
    extra = f"x-podserve-timeout-ms: {timeout_ms}\r\n" if timeout_ms else ""
    head = (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode() + body


def send_then_leave(port: int, model: str, body: bytes, until: Callable[[], bool]) -> None:
    """A client that sends its request and closes the connection once `until()` holds."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw_request(port, model, body))
        deadline = time.monotonic() + 30
        while not until():
            assert time.monotonic() < deadline, "the condition to leave never held"
            time.sleep(0.05)


def zeros_body(rows: int) -> bytes:
    """`rows` rows of zeros written as `0`: 2 bytes a value, the most rows under 64 KiB."""
    tensor = {"name": "x", "shape": [rows, WIDTH], "datatype": "FP32", "data": [0] * (rows * WIDTH)}
    return orjson.dumps({"inputs": [tensor]})


def _by_label(url: str, metric: str, model: str, label: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for sample in scrape(url).find(metric, model=model):
        key = sample.labels[label]
        counts[key] = counts.get(key, 0) + sample.value
    return counts


def runs(url: str, model: str) -> dict[str, float]:
    """podserve_batch_runs_total of `model` by batch size (rows per session run)."""
    return _by_label(url, "podserve_batch_runs_total", model, "batch_size")


def statuses(url: str, model: str) -> dict[str, float]:
    """podserve_requests_total of `model` by status."""
    return _by_label(url, "podserve_requests_total", model, "status")


def wait_for_metric(url: str, name: str, want: float, timeout: float = 10, **labels: str) -> float:
    """The metric's value once it equals `want` (gauges and counters are written each second)."""
    deadline = time.monotonic() + timeout
    while (value := scrape(url).value(name, **labels)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def server_timing(response: httpx.Response) -> dict[str, float]:
    """Server-Timing's phases, in ms."""
    return parse_server_timing(response.headers.get("server-timing", ""))
