"""Closing a connection whose client is still sending, and the answers to requests that never
reach the app (header_guard.py), on a real server with real clients.

- a `Connection: close` request (urllib sends one on every request) answered before its body
  was read (404, 405, 413 by Content-Length) lost its answer to a reset: the server closed
  with the body unread, and the client's send failed before it read anything. The server now
  half-closes, reads and drops the rest, and closes once the client does, within
  PODSERVE_HEADER_READ_TIMEOUT_S and twice PODSERVE_MAX_BODY_BYTES; the same when podserve
  itself closes the connection after the answer (a draining worker), and after a 400 for a
  request it cannot parse. A close with nothing unread is still an immediate close;
- a body that does not arrive in PODSERVE_BODY_READ_TIMEOUT_S gets its 408 with
  `Connection: close`, and the server closes at once (it held the connection 10 s more);
- a request the parser refuses gets a JSON 400 with the reason (uvicorn's was text/plain,
  "Invalid HTTP request received."), and the guard's own 408 / 431 carry a Date.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from server_process import ServerProcess

HEADER_TIMEOUT_S = 3.0  # also the bound on a lingering close
BODY_TIMEOUT_S = 1.0
MAX_BODY = 4 * 1024 * 1024  # a lingering close drops at most twice this
BIG = 8_000_000  # a body no socket buffer on loopback absorbs (reset from ~4 MB: measured)
SLACK_S = 1.5  # the deadline sweep (a tenth of the timeout) and a shared machine
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # tcpi_state in struct tcp_info (Linux)


@pytest.fixture(scope="module")
def served(affine_repo: Path) -> Iterator[ServerProcess]:
    env = {
        "PODSERVE_HEADER_READ_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "PODSERVE_BODY_READ_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "PODSERVE_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        yield server


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def _post_head(path: str, length: int, extra: str = "Connection: close\r\n") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _read_to_fin(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """What the server sends until its FIN (a reset fails the test)."""
    sock.settimeout(limit_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _tcp_state(sock: socket.socket) -> int:
    """The client side's TCP state, read without reading the socket."""
    return struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[:1])[0]


def _head_and_json(reply: bytes) -> tuple[str, dict[str, str], dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, value in (ln.split(":", 1) for ln in lines)}
    return status, headers, json.loads(body)


# --- early answers to clients that send Connection: close --------------------------------
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("POST", "/v2/models/nope/infer", 404),  # unknown model
        ("POST", "/v2/health/live", 405),  # a GET-only route
        ("POST", "/v2/models/affine/infer", 413),  # by Content-Length, before reading
    ],
)
def test_urllib_gets_the_answer_to_a_big_body_answered_early(
    served: ServerProcess, method: str, path: str, status: int
) -> None:
    """urllib sends the whole body before it reads: with a reset it saw only a send error."""
    for _ in range(3):
        request = urllib.request.Request(
            served.url + path,
            data=b"0" * BIG,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=20)
        assert answer.value.code == status
        assert "error" in json.loads(answer.value.read())


def test_a_draining_worker_lingers_after_the_answer_it_closes_with(affine_repo: Path) -> None:
    """A keep-alive client's request that arrives while its worker drains is answered with
    `Connection: close` (drain_grace.py): podserve closes, not the client, and with the body
    unread that was a reset too."""
    env = {"PODSERVE_DRAIN_IDLE_GRACE_S": "3", "PODSERVE_MAX_BODY_BYTES": str(MAX_BODY)}
    with ServerProcess(affine_repo, workers=1, env=env) as server, _connect(server) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # idle, kept alive
        server.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while '"Shutting down"' not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.05)  # until the worker drains: the connection is in its grace
        sock.sendall(_post_head("/v2/models/nope/infer", BIG, extra="") + b"0" * BIG)
        status, headers, body = _head_and_json(_read_to_fin(sock))
        assert status == "HTTP/1.1 404 Not Found" and headers["connection"] == "close", body
        assert server.proc is not None
        assert server.proc.wait(10) == 0


def test_a_client_that_sends_on_is_cut_off_past_the_byte_bound(served: ServerProcess) -> None:
    """Reading and dropping is bounded by bytes as well as time: a client that declares 1 GB
    and streams it without reading is reset after ~2 x PODSERVE_MAX_BODY_BYTES (plus what
    the socket buffers hold), not read for PODSERVE_HEADER_READ_TIMEOUT_S."""
    chunk, total = b"0" * 65536, 96 * 1024 * 1024
    with _connect(served) as sock:
        sock.sendall(_post_head("/v2/models/nope/infer", 1 << 30))
        sent, started = 0, time.monotonic()
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            while sent < total:
                sent += sock.send(chunk)
    # The server's receive buffer may grow to tcp_rmem's maximum (32 MiB here) on top.
    assert sent < 2 * MAX_BODY + 40 * 1024 * 1024, f"the server took {sent} bytes"
    assert time.monotonic() - started < HEADER_TIMEOUT_S


def test_the_linger_ends_at_the_header_timeout(served: ServerProcess) -> None:
    """After the answer and its FIN, what the client sends is read and dropped (no reset)
    until PODSERVE_HEADER_READ_TIMEOUT_S has passed; then the server has closed."""
    with _connect(served) as sock:
        sock.sendall(_post_head("/v2/models/nope/infer", 1_000_000) + b"0" * 1000)
        answered = time.monotonic()
        status, _, _ = _head_and_json(_read_to_fin(sock))
        assert status == "HTTP/1.1 404 Not Found"
        sock.sendall(b"0" * 1000)
        time.sleep(0.5)
        assert _tcp_state(sock) == _TCP_CLOSE_WAIT, "reset while lingering"
        time.sleep(max(0.0, answered + HEADER_TIMEOUT_S + SLACK_S - time.monotonic()))
        sock.sendall(b"0" * 1000)
        time.sleep(0.5)
        assert _tcp_state(sock) == _TCP_CLOSE, "still open past the linger's bound"


def test_bytes_after_a_complete_request_are_not_met_by_a_reset(served: ServerProcess) -> None:
    """The request is complete (the parser is between requests), but the client sends on
    after it: what the kernel holds unread at the close makes it linger too."""
    with _connect(served) as sock:
        sock.sendall(
            b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n" + b"0" * BIG
        )
        assert _read_to_fin(sock).startswith(b"HTTP/1.1 200")


def test_a_close_with_nothing_unread_is_immediate(served: ServerProcess) -> None:
    """The usual close (the request read in full) does not linger: the socket is gone at
    once, and a byte sent after the answer is met by a reset."""
    with _connect(served) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert _read_to_fin(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(b"x")
        time.sleep(0.5)
        assert _tcp_state(sock) == _TCP_CLOSE


# --- a body that does not come ------------------------------------------------------------
def test_a_slow_body_gets_408_with_connection_close_and_a_fin(served: ServerProcess) -> None:
    with _connect(served) as sock:
        sock.sendall(_post_head("/v2/models/affine/infer", 1000, extra="") + b'{"inputs":')
        started = time.monotonic()
        reply = _read_to_fin(sock, limit_s=BODY_TIMEOUT_S + HEADER_TIMEOUT_S + 5)
        waited = time.monotonic() - started
    status, headers, body = _head_and_json(reply)
    assert status == "HTTP/1.1 408 Request Timeout", reply
    assert headers["connection"] == "close"
    assert "request body not received" in body["error"]
    assert waited < BODY_TIMEOUT_S + SLACK_S, f"closed {waited:.1f} s after the request"


# --- requests the parser refuses ----------------------------------------------------------
TLS_CLIENT_HELLO = bytes.fromhex("160301020001") + b"\x00\x01\xfc\x03\x03" + b"\x00" * 64


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"GARBAGE\r\n\r\n", "invalid HTTP request: Invalid method"),
        ("GET /é HTTP/1.1\r\nHost: t\r\n\r\n".encode(), "invalid HTTP request: Invalid char"),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n", "Unexpected whitespace"),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "Transfer-Encoding can't be present with Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
            "Duplicate Content-Length",
        ),
        (b"GET / HTTP/1.1\nHost: t\n\n", "invalid HTTP request: Expected CRLF"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "HTTP/2 connection preface received"),
        (TLS_CLIENT_HELLO, "TLS handshake received: this port speaks plain HTTP/1.1"),
    ],
    ids=["request-line", "raw-utf8", "obs-fold", "cl-te", "two-cl", "bare-lf", "h2", "tls"],
)
def test_a_request_the_parser_refuses_gets_a_json_400(
    served: ServerProcess, request_bytes: bytes, reason: str
) -> None:
    with _connect(served) as sock:
        sock.sendall(request_bytes)
        status, headers, body = _head_and_json(_read_to_fin(sock))
    assert status == "HTTP/1.1 400 Bad Request"
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert parsedate_to_datetime(headers["date"])
    assert reason in body["error"], body


def test_a_body_the_parser_refuses_gets_its_400_at_once(served: ServerProcess) -> None:
    """The headers were fine, so the request's app runs, waiting for the body: it is told
    the client left, and the 400 is sent now (not a 408 when the body wait runs out)."""
    with _connect(served) as sock:
        sock.sendall(
            b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        status, _, body = _head_and_json(_read_to_fin(sock, limit_s=BODY_TIMEOUT_S / 2))
    assert status == "HTTP/1.1 400 Bad Request", body
    assert "Invalid character in chunk size" in body["error"]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"GARBAGE\r\n\r\n", "Invalid method"),
        (  # its headers are fine: it is queued behind the first, then its body fails
            b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "Invalid character in chunk size",
        ),
    ],
    ids=["request-line", "chunked-body"],
)
def test_a_bad_request_pipelined_behind_a_good_one_is_answered_after_it(
    served: ServerProcess, bad: bytes, reason: str
) -> None:
    """In one read: a request, then one the parser refuses. The first is answered in full,
    then the 400 (uvicorn wrote its 400 at once, and the first answer never came)."""
    with _connect(served) as sock:
        sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: t\r\n\r\n" + bad)
        reply = _read_to_fin(sock)
    first, sep, second = reply.partition(b'{"live":true}')
    assert first.startswith(b"HTTP/1.1 200 OK") and sep, reply
    status, _, body = _head_and_json(second)
    assert status == "HTTP/1.1 400 Bad Request", reply
    assert reason in body["error"]


def test_the_400_survives_the_rest_of_a_big_unparsable_request(served: ServerProcess) -> None:
    """The parser fails at the start; the client sends on (8 MB) and reads after: the 400
    must not be lost to a reset."""
    with _connect(served) as sock:
        sock.sendall(b"GARBAGE / HTTP/1.1\r\nHost: t\r\n\r\n" + b"0" * BIG)
        status, _, body = _head_and_json(_read_to_fin(sock))
    assert status == "HTTP/1.1 400 Bad Request", body


# --- the guard's own answers --------------------------------------------------------------
@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: t\r\n", 408),  # the headers never end
    ],
)
def test_the_guards_answers_have_a_date(
    served: ServerProcess, request_bytes: bytes, status: int
) -> None:
    with _connect(served) as sock:
        sock.sendall(request_bytes)
        reply = _read_to_fin(sock, limit_s=HEADER_TIMEOUT_S + 5)
    line, headers, body = _head_and_json(reply)
    assert line.startswith(f"HTTP/1.1 {status} ")
    assert parsedate_to_datetime(headers["date"])
    assert headers["content-type"] == "application/json" and "error" in body
