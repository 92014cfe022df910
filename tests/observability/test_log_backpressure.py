"""Logs when stderr does not take them (a full pipe: a log collector that stalls).

Measured before the fix (2 workers, PODSERVE_ACCESS_LOG=true, stderr a pipe nobody read):
401 requests answered (~64 KiB of lines), then every request and /v2/health/live timed
out: the write blocked each worker's event loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from server_process import PODSERVE, ServerProcess

TABULAR = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def test_a_full_stderr_pipe_drops_and_counts_lines_instead_of_blocking() -> None:
    from podserve.logs import BackgroundStderrHandler, JsonFormatter

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w")
    handler = BackgroundStderrHandler(stream, capacity=50)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("podserve.test_backpressure")
    log.propagate, log.handlers = False, [handler]
    done = threading.Event()

    def storm() -> None:
        for i in range(2000):  # ~200 bytes each: 6x what a 64 KiB pipe holds
            log.warning("line %d %s", i, "x" * 100)
        done.set()

    threading.Thread(target=storm, daemon=True).start()
    assert done.wait(5), "logging blocked on a full stderr pipe"
    collected: list[bytes] = []
    reader = threading.Thread(target=lambda: collected.append(_read_all(read_end)))
    reader.start()
    handler.flush()
    log.warning("after the pipe is read again")
    handler.flush()
    stream.close()
    reader.join(10)
    lines = [json.loads(line) for line in collected[0].decode().splitlines()]  # all JSON
    dropped = [line for line in lines if line["msg"].startswith("log lines dropped")]
    assert dropped and dropped[0]["level"] == "warning" and dropped[0]["pid"] == os.getpid()
    written = [line for line in lines if line["msg"].startswith("line ")]
    assert len(written) + sum(line["dropped"] for line in dropped) == 2000
    assert lines[-1]["msg"] == "after the pipe is read again"


def test_a_line_longer_in_bytes_than_the_room_left_is_not_written_in_the_callers_thread() -> None:
    """Room is counted in bytes: a line of 2,100 'é' is ~2,200 characters but ~4,300 bytes.
    Measured before the fix: with one page (4,096 bytes) free, the call wrote it at once and
    blocked the caller until the pipe was read."""
    from podserve.logs import BackgroundStderrHandler, JsonFormatter

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    for size in (4096, 1):  # full, to the last byte
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(write_end, b"\n" * size)
    os.set_blocking(write_end, True)
    os.read(read_end, 4096)  # one page free: room for a line of up to 4,096 bytes
    stream = os.fdopen(write_end, "w", encoding="utf-8")
    handler = BackgroundStderrHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("podserve.test_backpressure_bytes")
    log.propagate, log.handlers = False, [handler]
    done = threading.Event()
    threading.Thread(target=lambda: (log.warning("é" * 2100), done.set()), daemon=True).start()
    returned = done.wait(5)
    collected: list[bytes] = []  # read either way: a blocked write must not hang the run
    reader = threading.Thread(target=lambda: collected.append(_read_all(read_end)))
    reader.start()
    done.wait(10)
    handler.flush()
    stream.close()
    reader.join(10)
    assert returned, "logging blocked on a pipe with room for the characters, not the bytes"
    (line,) = [json.loads(line) for line in collected[0].decode().splitlines() if line]
    assert line["msg"] == "é" * 2100


def test_a_server_whose_stderr_nobody_reads_keeps_serving(model_repo: Path) -> None:
    server = ServerProcess(model_repo, workers=2, env={"PODSERVE_ACCESS_LOG": "true"})
    read_end, write_end = os.pipe()
    server.proc = subprocess.Popen([*PODSERVE, "serve"], env=server.env, stdout=write_end,
                                   stderr=write_end)  # fmt: skip
    os.close(write_end)
    reading = threading.Event()
    reading.set()

    def reader() -> None:  # reads the start-up lines, then stops until told again
        while os.read(read_end, 1 << 16):
            if not reading.is_set():
                reading.wait()

    drain = threading.Thread(target=reader, daemon=True)
    drain.start()
    try:
        server.wait_ready(90)
        reading.clear()
        time.sleep(0.2)
        with httpx.Client(base_url=server.url, timeout=3) as client:

            def infer(_: int) -> int:
                return client.post("/v2/models/tabular/infer", json=TABULAR).status_code

            with ThreadPoolExecutor(8) as pool:  # ~160 bytes a line: ~10 pipes' worth
                codes = list(pool.map(infer, range(4000)))
            assert codes == [200] * len(codes)
            assert client.get("/v2/health/live").status_code == 200
    finally:
        reading.set()
        server.stop()
        drain.join(10)  # EOF once the server and its workers are gone
        os.close(read_end)


def _fail(value: int) -> None:
    raise RuntimeError(f"boom {value}")


def _exception_record(
    value: int, created: float, msg: str = "unhandled error"
) -> logging.LogRecord:
    try:
        _fail(value)
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("podserve.app", logging.ERROR, __file__, 1, msg, (), exc_info)
    record.created = created
    return record


def test_a_storm_of_one_failure_logs_its_traceback_once_per_window() -> None:
    """A 500 storm (measured: 50 requests to a route that raises) wrote two full tracebacks
    per request, podserve.app's and uvicorn's: 413 KB. Now the first of each site in
    TRACEBACK_WINDOW_S is whole, the repeats say which it repeats and how many (42 KB)."""
    from podserve.logs import TRACEBACK_WINDOW_S, JsonFormatter

    formatter = JsonFormatter()
    start = time.time()
    lines = [json.loads(formatter.format(_exception_record(i, start + i / 10))) for i in range(100)]
    assert lines[0]["exc"].startswith("Traceback") and "boom 0" in lines[0]["exc"]
    assert [line.get("exc_repeat") for line in lines[1:]] == list(range(1, 100))
    assert lines[7]["exc"].startswith("RuntimeError: boom 7 (traceback as logged at")
    assert all(len(json.dumps(line)) < 300 < len(json.dumps(lines[0])) for line in lines[1:])
    other = json.loads(formatter.format(_exception_record(0, start + 1, "another message")))
    assert other["exc"].startswith("Traceback")  # another site: its own traceback
    later = json.loads(formatter.format(_exception_record(1, start + TRACEBACK_WINDOW_S + 1)))
    assert later["exc"].startswith("Traceback") and later["exc_repeats_last_window"] == 99
