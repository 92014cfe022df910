"""The header guard (header_guard.py) on a keep-alive connection that carries more than one
request at a time: pipelined requests behind one still being served, and the rest of a body
that the server answered before reading it.

- a pipelined request's headers are held to PODSERVE_MAX_HEADER_BYTES and the header
  deadline like any other request's: 431 / 408 after the answer in flight, then the
  connection closes, and the worker's event loop is never stalled parsing them;
- the rest of a body answered early (401, 404 for an unknown model, 413 by Content-Length)
  is the body, not the next request's headers: exactly one response, and the connection
  serves its next request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess

KEY = "pipelining-test-key-0123456789abcdef"
HEADER_TIMEOUT_S = 1.0
KEEPALIVE_S = 3
MAX_BODY = 4 * 1024 * 1024
MAX_HEADER_BYTES = 65536  # the default
IN_FLIGHT_S = 4.0  # how long an inference request is served (PODSERVE_SIMULATED_IO_MS)
SLACK_S = 2.0  # scheduling noise on a shared 2-core machine
AUTH = f"X-API-Key: {KEY}\r\n".encode()


@pytest.fixture(scope="module")
def guarded(model_repo: Path) -> Iterator[ServerProcess]:
    """One worker, so that a stall of its event loop shows in every other client's latency."""
    env = {
        "PODSERVE_API_KEYS": KEY,
        "PODSERVE_HEADER_READ_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "PODSERVE_KEEPALIVE_S": str(KEEPALIVE_S),
        "PODSERVE_MAX_BODY_BYTES": str(MAX_BODY),
        # Every inference request awaits this long (on the event loop, no CPU): one request
        # that stays in flight while the next ones are pipelined behind it.
        "PODSERVE_SIMULATED_IO_MS": str(int(IN_FLIGHT_S * 1000)),
    }
    with ServerProcess(model_repo, workers=1, env=env) as server:
        yield server


def _connect(server: ServerProcess, timeout: float = 30.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `limit_s` passes (False)."""
    data = b""
    deadline = time.monotonic() + limit_s
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk
    return data, False


class Responses:
    """Reads the responses on a connection one at a time (Content-Length framed)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self, limit_s: float = 30.0) -> bytes:
        """The next whole response, or what came before the server closed."""
        self.sock.settimeout(limit_s)
        while True:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if sep:
                lengths = [
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                size = int(lengths[0]) if lengths else 0
                if len(rest) >= size:
                    response = head + sep + rest[:size]
                    self.buffer = rest[size:]
                    return response
            chunk = self.sock.recv(65536)
            if not chunk:
                response, self.buffer = self.buffer, b""
                return response
            self.buffer += chunk


def _read_response(sock: socket.socket) -> bytes:
    return Responses(sock).next()


def _statuses(data: bytes) -> list[str]:
    return [data[i : i + 12].decode() for i in range(len(data)) if data.startswith(b"HTTP/1.1 ", i)]


def _slow_request(model: str = "affine", rows: int = 1) -> bytes:
    """An inference request that is in flight for IN_FLIGHT_S (or more)."""
    width = 256 if model == "slow" else 4
    tensor = {
        "name": "x",
        "shape": [rows, width],
        "datatype": "FP32",
        "data": [0.5] * (rows * width),
    }
    body = json.dumps({"inputs": [tensor]}).encode()
    return (
        b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: t\r\n" % model.encode() + AUTH
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )  # fmt: skip


class Prober(threading.Thread):
    """GET /v2/health/live on fresh connections in a loop: the worst latency seen."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/v2/health/live"
        self.stop = threading.Event()
        self.worst = 0.0
        self.count = 0

    def run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                client.get(self.url, headers={"Connection": "close"})
                self.worst = max(self.worst, time.monotonic() - started)
                self.count += 1
                time.sleep(0.02)


def _send_in_background(sock: socket.socket, parts: Iterator[bytes]) -> threading.Thread:
    """Send until done or the server closes (the receiving side stays free to read)."""

    def send() -> None:
        with contextlib.suppress(OSError):
            for part in parts:
                sock.sendall(part)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


# --- pipelined requests -------------------------------------------------------------------
def test_pipelined_oversized_headers_behind_a_slow_request_get_431(
    guarded: ServerProcess,
) -> None:
    """64 MiB of one header value pipelined behind a request in flight: that request is
    answered, then 431 and close; other clients are not stalled meanwhile (unbounded,
    httptools grew the value for ~4 s of the event loop here: 200, then 200 for it)."""
    prober = Prober(guarded)
    prober.start()
    try:
        time.sleep(0.3)
        with _connect(guarded, timeout=60) as sock:
            sock.sendall(_slow_request())
            time.sleep(0.3)  # the slow request is being served

            def parts() -> Iterator[bytes]:
                yield b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Big: "
                for _ in range(1024):  # 64 MiB
                    yield b"a" * 65536
                yield b"\r\n\r\n"

            sender = _send_in_background(sock, parts())
            data, closed = _read_until_closed(sock, 60)
            sender.join(10)
    finally:
        prober.stop.set()
        prober.join(30)
    assert _statuses(data) == ["HTTP/1.1 200", "HTTP/1.1 431"], data[-300:]
    assert b"request headers exceed %d bytes" % MAX_HEADER_BYTES in data
    assert closed
    assert prober.count > 0
    assert prober.worst < 2.0, f"other clients waited {prober.worst:.2f} s"


def test_pipelined_headers_beyond_the_limit_in_small_pieces_get_431(
    guarded: ServerProcess,
) -> None:
    """Headers just over the bound, pipelined in pieces while a request is served: that
    request's answer (~200 KB) arrives whole, then 431 and close, even to a client that
    reads late. (Closing with its input unread would send a reset, which drops what the
    kernel has not sent yet: the end of the answer and the 431.)"""
    with _connect(guarded) as sock:
        sock.sendall(_slow_request("slow", 64))
        time.sleep(0.2)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n")
        for _ in range(MAX_HEADER_BYTES // 4096 + 1):
            sock.sendall(b"X-Pad: " + b"a" * 4089 + b"\r\n")
        time.sleep(0.2)  # refused: what comes now is not read until the answer is out
        sender = _send_in_background(sock, iter([b"X-Pad: " + b"a" * 4089 + b"\r\n"] * 64))
        time.sleep(IN_FLIGHT_S + 0.5)  # the answer and the 431 are written meanwhile
        data, closed = _read_until_closed(sock, 30)
        sender.join(10)
    assert _statuses(data) == ["HTTP/1.1 200", "HTTP/1.1 431"], data[-300:]
    assert closed
    answer = data[: data.index(b"HTTP/1.1 431")]
    outputs = json.loads(answer.partition(b"\r\n\r\n")[2])["outputs"]
    assert outputs[0]["shape"] == [64, 256]


def test_pipelined_slow_drip_headers_get_408_after_the_answer_in_flight(
    guarded: ServerProcess,
) -> None:
    """A pipelined request whose headers do not complete in time: 408, written after the
    answer to the request in flight (which outlasts the deadline), then close."""
    with _connect(guarded) as sock:
        started = time.monotonic()
        sock.sendall(_slow_request())
        time.sleep(0.2)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nX-Pad: aaa")  # never ends
        data, closed = _read_until_closed(sock, 30)
        seconds = time.monotonic() - started
    assert _statuses(data) == ["HTTP/1.1 200", "HTTP/1.1 408"], data[-300:]
    assert closed
    assert IN_FLIGHT_S <= seconds < IN_FLIGHT_S + SLACK_S, seconds


def test_pipelined_requests_with_large_bodies_are_answered(guarded: ServerProcess) -> None:
    """Pipelined requests whose bodies (over the header bound) arrive while the first is
    served: their bodies are not counted as headers, every request is answered in order."""
    body = b'{"ready": true}' + b" " * 200_000  # JSON allows padding
    post = (
        b"POST /v2/repository/index HTTP/1.1\r\nHost: t\r\n" + AUTH
        + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )  # fmt: skip
    with _connect(guarded) as sock:
        sock.sendall(_slow_request())
        time.sleep(0.2)
        sender = _send_in_background(sock, iter([post, post, post]))
        responses = Responses(sock)
        replies = [responses.next() for _ in range(4)]
        sender.join(10)
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        replies.append(responses.next())
    assert [_statuses(reply) for reply in replies] == [["HTTP/1.1 200"]] * 5, replies


def test_small_pipelined_requests_are_answered(guarded: ServerProcess) -> None:
    """Requests pipelined with the first one and while it is served: answered in order."""
    get = b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n"
    with _connect(guarded) as sock:
        sock.sendall(_slow_request() + get)
        time.sleep(0.2)
        sock.sendall(get * 3)
        responses = Responses(sock)
        replies = [responses.next() for _ in range(5)]
    assert [_statuses(reply) for reply in replies] == [["HTTP/1.1 200"]] * 5, replies


# --- a body answered before it was read ---------------------------------------------------
EARLY_ANSWERS = [
    pytest.param("/v2/models/affine/infer", b"", 1 << 20, 401, id="401-no-key"),
    pytest.param("/v2/models/nope/infer", AUTH, 1 << 20, 404, id="404-unknown-model"),
    pytest.param("/v2/models/affine/infer", AUTH, 8 << 20, 413, id="413-content-length"),
]


@pytest.mark.parametrize(("path", "headers", "size", "status"), EARLY_ANSWERS)
def test_the_rest_of_a_body_answered_early_is_not_the_next_request(
    guarded: ServerProcess, path: str, headers: bytes, size: int, status: int
) -> None:
    """Answered before its body is read: the rest of the body is read and dropped, no second
    (unsolicited 431) response follows, and the connection serves the next request."""
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {size}\r\n"
    body = (b" " * 65536 for _ in range(size // 65536))
    first, second = _early_answer_then_next(guarded, head.encode() + headers + b"\r\n", body)
    assert _statuses(first) == [f"HTTP/1.1 {status}"], first[-300:]
    assert _statuses(second) == ["HTTP/1.1 200"], second[-300:]


def _early_answer_then_next(
    server: ServerProcess, head: bytes, body: Iterator[bytes]
) -> tuple[bytes, bytes]:
    """Send `head`, then `body` in the background; what came back before and after the next
    request on the same connection."""
    with _connect(server) as sock:
        sock.sendall(head)
        sender = _send_in_background(sock, body)
        responses = Responses(sock)
        first = responses.next()
        sender.join(30)
        assert not sender.is_alive()
        sock.sendall(b"GET /v2/models/affine HTTP/1.1\r\nHost: t\r\n" + AUTH + b"\r\n")
        return first, responses.next()


def test_the_rest_of_a_chunked_body_answered_early_is_not_the_next_request(
    guarded: ServerProcess,
) -> None:
    """The same with a chunked body (its end is the parser's to find, not a length)."""
    chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    head = (
        b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: t\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    first, second = _early_answer_then_next(guarded, head, iter([chunk] * 16 + [b"0\r\n\r\n"]))
    assert _statuses(first) == ["HTTP/1.1 401"], first[-300:]
    assert _statuses(second) == ["HTTP/1.1 200"], second[-300:]


def test_http_client_keeps_its_connection_after_an_early_404(guarded: ServerProcess) -> None:
    """http.client reuses the connection without probing it: no stray response may wait."""
    connection = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=30)
    try:
        connection.request(
            "POST",
            "/v2/models/nope/infer",
            body=b" " * (1 << 20),
            headers={"X-API-Key": KEY, "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status == 404
        response.read()
        sock = connection.sock
        connection.request("GET", "/v2/models/affine", headers={"X-API-Key": KEY})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:200]
        response.read()
        assert connection.sock is sock  # the same keep-alive connection
    finally:
        connection.close()


def test_a_dripped_rest_of_a_body_answered_early_gets_no_second_response(
    guarded: ServerProcess,
) -> None:
    """The rest of the body trickles in after a 401: no 408 or 431 is written after the 401;
    the connection is closed without a word once the header deadline has passed."""
    with _connect(guarded) as sock:
        sock.sendall(
            b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n"
        )
        first = _read_response(sock)
        started = time.monotonic()
        data = b""
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT_S + 10 and not closed:
            try:
                sock.sendall(b" ")
            except OSError:
                closed = True
                break
            more, closed = _read_until_closed(sock, 0.2)
            data += more
        seconds = time.monotonic() - started
    assert _statuses(first) == ["HTTP/1.1 401"], first[-300:]
    assert data == b"", data[:300]
    assert closed
    assert seconds < HEADER_TIMEOUT_S + SLACK_S, seconds


def test_an_idle_connection_after_a_body_answered_early_is_closed(
    guarded: ServerProcess,
) -> None:
    """Once the rest of the body is in, the connection idles like any other: closed after
    PODSERVE_KEEPALIVE_S without a word."""
    with _connect(guarded) as sock:
        sock.sendall(
            b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 300000\r\n\r\n"
        )
        first = _read_response(sock)
        sock.sendall(b" " * 300_000)
        started = time.monotonic()
        data, closed = _read_until_closed(sock, KEEPALIVE_S + 10)
        seconds = time.monotonic() - started
    assert _statuses(first) == ["HTTP/1.1 401"], first[-300:]
    assert data == b"", data[:300]
    assert closed
    assert HEADER_TIMEOUT_S + 0.5 < seconds < KEEPALIVE_S + SLACK_S, seconds
