"""Pipelined requests a client never reads the answers to (header_guard.py).

- uvicorn parsed every request of a read and queued each before pausing reading: a 256 KiB
  burst of `GET /openapi.json` on one connection, never read, added ~15 MiB to the worker's
  memory. Now a connection queues a few requests and holds the rest of the read unparsed;
- such a connection stayed open for ever (no timeout covers a stalled write): it is now
  aborted once its client has taken nothing for PODSERVE_BODY_READ_TIMEOUT_S, while a slow
  reader that makes progress keeps its connection;
- pipelined requests are still all answered, complete and in order, once the client reads.
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_process import ServerProcess

STALL_S = 4.0  # PODSERVE_BODY_READ_TIMEOUT_S: also bounds a write the client does not read
SLACK_S = 2.0  # scheduling noise on a shared machine
BURST = 256 * 1024  # one read's worth (uvloop reads up to 256 KiB at a time)
CONNECTIONS = 4
OPENAPI = b"GET /openapi.json HTTP/1.1\r\nHost: t\r\n\r\n"
_TCP_ESTABLISHED = 1  # tcpi_state in struct tcp_info (Linux)


@pytest.fixture(scope="module")
def served(affine_repo: Path) -> Iterator[ServerProcess]:
    """One worker, so that its memory shows what every connection costs."""
    env = {"PODSERVE_BODY_READ_TIMEOUT_S": str(STALL_S), "PODSERVE_KEEPALIVE_S": "2"}
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        yield server


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _non_reader(server: ServerProcess) -> socket.socket:
    """A connection whose client keeps a tiny receive window and reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.connect(("127.0.0.1", server.port))
    return sock


def _send_what_fits(sock: socket.socket, data: bytes, limit_s: float = 2.0) -> int:
    """Send without blocking on a server that has stopped reading: how much was taken."""
    sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + limit_s
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


def _established(sock: socket.socket) -> bool:
    """The connection's TCP state, read without reading the socket (which would drain it)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return struct.unpack("B", info[:1])[0] == _TCP_ESTABLISHED


def _warm_up(server: ServerProcess) -> None:
    """Build the OpenAPI document once, so that it does not count as a connection's cost."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(OPENAPI.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        while sock.recv(65536):
            pass


def test_unread_pipelined_requests_hold_little_of_the_worker_memory(
    served: ServerProcess,
) -> None:
    """256 KiB of pipelined `GET /openapi.json` on each of a few connections, never read:
    the worker grows by well under 3 MiB per connection (was ~15 MiB)."""
    _warm_up(served)
    worker = served.worker_pids()[0]
    before = _rss_kib(worker)
    burst = OPENAPI * (BURST // len(OPENAPI))
    socks = [_non_reader(served) for _ in range(CONNECTIONS)]
    try:
        for sock in socks:
            assert _send_what_fits(sock, burst) > 0
        time.sleep(1.0)  # parsed, queued and stalled by now (and not yet cut off)
        grown_mib = (_rss_kib(worker) - before) / 1024
        assert all(_established(sock) for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert grown_mib < 3 * CONNECTIONS, f"+{grown_mib:.1f} MiB for {CONNECTIONS} connections"


def test_a_client_that_never_reads_is_cut_off(served: ServerProcess) -> None:
    """Answers pile up unread (more than the kernel's send buffer takes): the connection is
    aborted PODSERVE_BODY_READ_TIMEOUT_S after the client stopped taking them (it stayed
    open for ever). The client sees the reset without reading."""
    with _non_reader(served) as sock:
        _send_what_fits(sock, OPENAPI * (BURST // len(OPENAPI)))
        started = time.monotonic()
        while _established(sock) and time.monotonic() - started < STALL_S + 10:
            time.sleep(0.05)
        seconds = time.monotonic() - started
        assert not _established(sock), "still open"
    assert STALL_S - 0.5 < seconds < STALL_S + SLACK_S, seconds


def test_a_slow_reader_keeps_its_connection(served: ServerProcess) -> None:
    """A client that reads its answers slowly (~32 KB/s), but steadily, while far more than
    the socket takes waits to be sent: it is not taken for a stalled one, past the bound."""
    with _non_reader(served) as sock:
        _send_what_fits(sock, OPENAPI * (BURST // len(OPENAPI)))
        started, taken = time.monotonic(), 0
        sock.settimeout(10)
        while time.monotonic() - started < 2 * STALL_S + 1:
            chunk = sock.recv(8192)
            assert chunk, f"closed by the server after {time.monotonic() - started:.1f} s"
            taken += len(chunk)
            time.sleep(0.25)
        assert _established(sock)
    assert taken > 100_000


def test_many_pipelined_requests_are_answered_whole_and_in_order(
    served: ServerProcess,
) -> None:
    """Thousands of pipelined requests in one burst, read late: every one is answered, in
    the order sent (each 404 names the model asked for)."""
    count = 6000
    requests = b"".join(
        b"GET /v2/models/m%d/ready HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(count)
    )
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(requests)
        time.sleep(0.5)  # queued (and held) before the first answer is read
        data = b""
        while data.count(b"HTTP/1.1 ") < count or not data.endswith(b"}"):
            chunk = sock.recv(1 << 20)
            assert chunk, f"closed after {data.count(b'HTTP/1.1 ')} answers"
            data += chunk
    assert data.count(b"HTTP/1.1 404") == count
    names = [int(n) for n in re.findall(rb"unknown model 'm(\d+)'", data)]
    assert names == list(range(count))
