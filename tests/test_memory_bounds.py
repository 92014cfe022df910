"""A worker's memory under valid heavy requests: request-body bytes held at once are bounded
(PODSERVE_MAX_BODY_BYTES_IN_FLIGHT: 503 + Retry-After past it, given back on every path), the
V2 request id echoed in the answer is bounded, and glibc gives large freed buffers back to
the OS (PODSERVE_MALLOC_MMAP_THRESHOLD_BYTES). RSS is read from /proc/<worker>/status."""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import http.client
import json
import platform
import socket
import struct
import subprocess
import sys
import termios
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import pytest
from pydantic import ValidationError

import postgres
from podserve.errors import BadRequest
from podserve.protocol_v2 import MAX_REQUEST_ID_BYTES, parse_infer_request
from podserve.settings import Settings
from server_process import ServerProcess

MIB = 1024 * 1024
INFER = "/v2/models/affine/infer"
SMALL = 1 * MIB  # PODSERVE_MAX_BODY_BYTES and PODSERVE_MAX_BODY_BYTES_IN_FLIGHT of the tight server
T = TypeVar("T")
PROBE = 128 * 1024  # past the 64 KiB that uvicorn buffers per connection anyway


def _padded(size: int, request_id: str | None = None) -> bytes:
    """A valid affine request of exactly `size` bytes (JSON whitespace before the last brace)."""
    doc: dict = {
        "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]
    }
    if request_id is not None:
        doc["id"] = request_id
    core = json.dumps(doc).encode()
    return core[:-1] + b" " * (size - len(core)) + b"}"


def _vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, MiB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0]) // 1024
    return found


def _post(
    port: int, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (the whole body sent, even if answered early)."""
    head = {"Host": "x", "Content-Type": "application/json", "Content-Length": str(len(body))}
    head |= headers or {}
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items())
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        # Answered and closed before all of it was sent: read the answer all the same.
        with contextlib.suppress(OSError):
            sock.sendall(request.encode() + b"\r\n" + body)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, dict(response.getheaders()), response.read()


def _partial(port: int, path: str, declared: int, sent: bytes) -> socket.socket:
    """A request that declares `declared` bytes and sends only `sent` of them (for now),
    returned once the server's kernel has all of them (the worker reads them at once): the
    budget counts bytes as they arrive, so a request sent next must not race them."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n".encode()
        + sent
    )
    _until(lambda: _unsent(sock) == 0, "the partial body delivered")
    time.sleep(0.05)  # and read by the worker's loop (a few ms at most)
    return sock


def _unsent(sock: socket.socket) -> int:
    """Bytes of `sock` the peer has not acknowledged yet (Linux SIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _until(predicate: Callable[[], T | None], what: str, timeout: float = 20.0) -> T:
    """Polls for a state the server reaches on its own schedule (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def _refused(port: int, path: str = INFER) -> tuple[int, dict[str, str], bytes] | None:
    answer = _post(port, path, _padded(PROBE))
    return answer if answer[0] == 503 else None


@pytest.fixture()
def tight(affine_repo: Path) -> Iterator[ServerProcess]:
    """One worker whose budget holds exactly one maximal body."""
    env = {
        "PODSERVE_MAX_BODY_BYTES": str(SMALL),
        "PODSERVE_MAX_BODY_BYTES_IN_FLIGHT": str(SMALL),
        "PODSERVE_BODY_READ_TIMEOUT_S": "1",
        "PODSERVE_RETRY_AFTER_S": "3",
    }
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        yield server


def test_bodies_past_the_budget_are_refused_and_every_path_gives_it_back(
    tight: ServerProcess,
) -> None:
    port = tight.port
    # Headers declaring a maximal body, and nothing sent: nothing is held (bytes are counted
    # as they arrive), so a maximal body still fits.
    idle = _partial(port, INFER, SMALL, b"")
    assert _post(port, INFER, _padded(SMALL))[0] == 200
    idle.close()
    # A body mostly sent holds the budget: the next large one is refused as it arrives,
    # with Retry-After and the setting to raise.
    holder = _partial(port, INFER, SMALL, b" " * (SMALL - 1000))
    _, headers, text = _until(lambda: _refused(port), "a 503 while a body is held")
    assert headers["retry-after"] == "3"
    assert "PODSERVE_MAX_BODY_BYTES_IN_FLIGHT" in text.decode(), text
    # A chunked body is counted as it arrives.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request(
        "POST", INFER, body=iter([_padded(PROBE)[:70_000], _padded(PROBE)[70_000:]]),
        headers={"Content-Type": "application/json"}, encode_chunked=True,
    )  # fmt: skip
    assert connection.getresponse().status == 503
    connection.close()
    # Small bodies are not counted (uvicorn buffers 64 KiB per connection anyway).
    assert _post(port, INFER, _padded(1000))[0] == 200

    # The holder disconnects: its share comes back (a maximal body fits again).
    holder.close()
    _until(lambda: _post(port, INFER, _padded(SMALL))[0] == 200, "the budget given back")

    # Failures on every path, each after holding some of the budget:
    bomb = gzip.compress(b" " * (4 * SMALL))  # inflates past PODSERVE_MAX_BODY_BYTES
    assert _post(port, INFER, bomb, {"Content-Encoding": "gzip"})[0] == 413
    corrupt = bytearray(gzip.compress(_padded(SMALL), 1))
    corrupt[len(corrupt) // 2 :] = b"\xff" * (len(corrupt) - len(corrupt) // 2)
    assert _post(port, INFER, bytes(corrupt), {"Content-Encoding": "gzip"})[0] == 400
    big = _padded(200_000)
    assert _post(port, INFER, zlib.compress(big), {"Content-Encoding": "deflate"})[0] == 200
    raw_deflate = zlib.compressobj(6, zlib.DEFLATED, -15)  # the raw-deflate retry path
    raw = raw_deflate.compress(big) + raw_deflate.flush()
    assert _post(port, INFER, raw, {"Content-Encoding": "deflate"})[0] == 200
    stalled = _partial(port, INFER, SMALL, b" " * 100_000)  # PODSERVE_BODY_READ_TIMEOUT_S
    stalled.settimeout(30)
    assert stalled.recv(100).startswith(b"HTTP/1.1 408")
    stalled.close()
    for _ in range(3):  # disconnects mid-body
        _partial(port, INFER, SMALL, b" " * 300_000).close()
    burst = [_padded(SMALL)] * 6  # concurrent: some refused
    with ThreadPoolExecutor(6) as pool:
        statuses = Counter(answer[0] for answer in pool.map(lambda b: _post(port, INFER, b), burst))
    assert set(statuses) <= {200, 503} and statuses[200] >= 1, statuses

    # Nothing leaked: a maximal body needs the whole budget, and gets it.
    _until(lambda: _post(port, INFER, _padded(SMALL))[0] == 200, "the whole budget back")
    for _ in range(3):
        assert _post(port, INFER, _padded(SMALL))[0] == 200


def _scraped(port: int) -> dict[str, float]:
    """The worker's /metrics: sample (name and labels) -> value."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        text = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
    body = text.partition("\r\n\r\n")[2]
    lines = [x.rsplit(" ", 1) for x in body.splitlines() if x and not x.startswith("#")]
    return {sample: float(value) for sample, value in lines}


def test_refusals_have_their_own_reason_and_the_held_bytes_a_gauge(tight: ServerProcess) -> None:
    """Refused for the body budget: `body_budget`, not the full queue's `shed`; the bytes held
    and the budget are gauges (a declared body is held whole once its first 64 KiB arrived)."""
    holder = _partial(tight.port, INFER, SMALL, b" " * (SMALL - 1000))
    _until(lambda: _refused(tight.port), "a 503 while a body is held")
    held = _scraped(tight.port)
    assert held["podserve_request_body_bytes_held"] == SMALL
    assert held["podserve_request_body_bytes_budget"] == SMALL
    assert held['podserve_rejections_total{reason="body_budget"}'] >= 1
    assert held['podserve_rejections_total{reason="shed"}'] == 0
    holder.close()
    held_now = "podserve_request_body_bytes_held"
    _until(lambda: _scraped(tight.port)[held_now] == 0, "the bytes given back")


def test_a_stalled_declared_body_keeps_only_what_it_sent(affine_repo: Path) -> None:
    """A declared body is held whole once 64 KiB of it arrived, but one that stalls cannot
    arrive before its read deadline: within a tenth or two of the timeout it holds only what it
    sent (it held its declared size until its 408). Resumed, it is counted as it arrives."""
    env = {
        "PODSERVE_MAX_BODY_BYTES": str(SMALL),
        "PODSERVE_MAX_BODY_BYTES_IN_FLIGHT": str(SMALL),
        "PODSERVE_BODY_READ_TIMEOUT_S": "20",
    }
    body = _padded(SMALL)
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        stalled = _partial(server.port, INFER, SMALL, body[:100_000])
        assert _post(server.port, INFER, _padded(PROBE))[0] == 503  # held whole at first
        started = time.monotonic()
        _until(lambda: _post(server.port, INFER, _padded(PROBE))[0] == 200, "the stall let go")
        assert time.monotonic() - started < 10  # before its 408 (20 s)
        held = "podserve_request_body_bytes_held"
        _until(lambda: _scraped(server.port)[held] == 100_000, "only what it sent held")
        stalled.sendall(body[100_000:])
        response = http.client.HTTPResponse(stalled)
        response.begin()
        assert response.status == 200, response.read()
        stalled.close()


def test_many_concurrent_maximal_bodies_stay_within_a_worker_s_memory(affine_repo: Path) -> None:
    """Findings 1 and 2 of the memory review, default settings: 48 gzip bodies of ~16 KB that
    each inflate to 16 MiB took a worker past 1.3 GiB; 32 plain 16 MiB bodies past 600 MiB."""
    limit = 16 * MIB
    plain = _padded(limit)
    packed = gzip.compress(plain, 9)
    with ServerProcess(affine_repo, workers=1) as server:
        pid = server.worker_pids()[0]
        before = _vm(pid)["VmRSS"]
        for body, headers, count in (
            (packed, {"Content-Encoding": "gzip"}, 48),
            (plain, {}, 32),
        ):
            requests = [(body, headers)] * count
            with ThreadPoolExecutor(count) as pool:
                answers = list(pool.map(lambda r: _post(server.port, INFER, *r), requests))
            statuses = Counter(answer[0] for answer in answers)
            assert set(statuses) <= {200, 503} and statuses[200] >= 1, statuses
        peak = _vm(pid)["VmHWM"]
        assert peak - before < 350, f"worker peak {peak} MiB from {before} MiB"
        # Freed large buffers went back to the OS (PODSERVE_MALLOC_MMAP_THRESHOLD_BYTES).
        after = _vm(pid)["VmRSS"]
        assert after - before < 150, f"worker RSS {after} MiB after the bursts, {before} before"
        assert "malloc mmap threshold set" in server.logs()


_RETENTION = """
import sys
sys.path.insert(0, {service!r})
from podserve.malloc_tuning import set_mmap_threshold
threshold = int(sys.argv[1])
if threshold:
    assert set_mmap_threshold(threshold)
def rss():
    line = next(l for l in open('/proc/self/status') if l.startswith('VmRSS'))
    return int(line.split()[1]) // 1024
base = rss()
warm = bytearray(16 << 20); del warm  # glibc's dynamic threshold rises to 16 MiB after this
held, pins = [], []
for _ in range(24):  # each buffer followed by a small live one: the heap cannot shrink past it
    held.append(b"x" * (16 << 20))
    pins.append(bytearray(600))
del held
print(rss() - base)
"""


def test_the_mmap_threshold_gives_large_freed_buffers_back() -> None:
    """glibc only: with its default (dynamic) threshold, 24 freed 16 MiB buffers stay in the
    heap; fixed at 1 MiB they are unmapped on free."""
    if platform.libc_ver()[0] != "glibc":  # musl (Alpine) has no mallopt thresholds
        pytest.skip("glibc's malloc only: this C library has no M_MMAP_THRESHOLD")
    script = _RETENTION.format(service=str(Path(__file__).parents[1] / "service"))

    def retained(threshold: int) -> int:
        out = subprocess.run(
            [sys.executable, "-c", script, str(threshold)],
            capture_output=True,
            text=True,
            check=True,
        )
        return int(out.stdout.split()[-1])

    assert retained(1 * MIB) < 50
    assert retained(0) > 200  # the control: glibc's default keeps them (what the fix is for)


def test_request_id_is_bounded() -> None:
    """The id is echoed in the answer: 15 MiB of it (15 KB of gzip) made a 16.9 MB answer."""
    ok = parse_infer_request(_padded(2000, "é" * (MAX_REQUEST_ID_BYTES // 2)), None, 10)
    assert ok.id == "é" * (MAX_REQUEST_ID_BYTES // 2)
    for too_long in ("a" * (MAX_REQUEST_ID_BYTES + 1), "é" * (MAX_REQUEST_ID_BYTES // 2 + 1)):
        with pytest.raises(BadRequest, match=f"'id' is longer than {MAX_REQUEST_ID_BYTES} bytes"):
            parse_infer_request(_padded(4000, too_long), None, 10)


def test_request_id_over_the_bound_is_a_400_over_http(tight: ServerProcess) -> None:
    status, _, text = _post(tight.port, INFER, _padded(PROBE, "x" * 100_000))
    assert status == 400 and b"'id' is longer than" in text, text


def test_in_flight_budget_setting() -> None:
    assert Settings().body_bytes_in_flight_limit == 4 * Settings().max_body_bytes
    exact = Settings(max_body_bytes_in_flight=2048, max_body_bytes=2048)
    assert exact.body_bytes_in_flight_limit == 2048
    with pytest.raises(ValidationError, match="must be at least max_body_bytes"):
        Settings(max_body_bytes=4096, max_body_bytes_in_flight=2048)


def test_the_jobs_api_is_held_to_the_same_budget(
    pg_server: postgres.PostgresServer, affine_repo: Path, tmp_path: Path
) -> None:
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        env = postgres.server_env(
            url,
            tmp_path,
            PODSERVE_MAX_BODY_BYTES=str(SMALL),
            PODSERVE_MAX_BODY_BYTES_IN_FLIGHT=str(SMALL),
        )
        with ServerProcess(affine_repo, workers=1, env=env) as server:
            holder = _partial(server.port, INFER, SMALL, b" " * (SMALL - 1000))
            jobs = "/v2/models/affine/jobs"
            _, _, text = _until(lambda: _refused(server.port, jobs), "a 503 from the jobs API")
            assert b"PODSERVE_MAX_BODY_BYTES_IN_FLIGHT" in text
            holder.close()
            _until(lambda: _post(server.port, jobs, _padded(SMALL))[0] == 202, "a job accepted")


def test_no_glibc_mallopt_is_logged_and_ignored(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """musl has no mallopt (AttributeError), a missing C library an OSError: a warning, and
    the server goes on."""
    from podserve import malloc_tuning

    assert malloc_tuning.set_mmap_threshold(0) is False  # 0: glibc's default, nothing done

    def no_libc(*args: object, **kwargs: object) -> None:
        raise OSError("no C library here")

    monkeypatch.setattr(malloc_tuning.ctypes, "CDLL", no_libc)
    assert malloc_tuning.set_mmap_threshold(MIB) is False
    assert "no glibc mallopt (no C library here)" in caplog.text


def test_the_body_budget_reads_the_runtime_where_the_runtime_puts_itself() -> None:
    """http_body names the scope key as a literal (importing runtime would be a cycle)."""
    from podserve import http_body, runtime

    assert http_body._RUNTIME_SCOPE_KEY == runtime.RUNTIME_SCOPE_KEY
