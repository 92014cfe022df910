"""A lean closed-loop HTTP/1.1 load generator on raw asyncio connections.

Python HTTP clients cost CPU that the server needs on a 2-core machine (httpx: ~1 ms per
request). This one pre-encodes the request once and parses only the status line,
`Content-Length` and `Server-Timing`: ~0.1-0.2 ms CPU per request. Its own CPU time is
measured and reported, because it shares the cores with the server under test.
Requests carry no `Accept-Encoding`, so podserve answers them uncompressed (it compresses only
for clients that ask: response_compression.py).
Loopback only; every run is bounded in time and in request count.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class RunResult:
    """What one closed-loop run measured (latencies in seconds)."""

    concurrency: int
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    server_timings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    reconnects: int = 0  # answers with `Connection: close`, followed by a new connection

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200) + len(self.errors)


def encode_request(
    method: str, host: str, port: int, path: str, body: bytes = b"", content_type: str = ""
) -> bytes:
    """One complete keep-alive request, encoded once and reused for every send."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: keep-alive"]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time (closed loop)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, str]] | None = None
        self.head_end = -1
        self.length = 0
        self.status = 0
        self.timing = ""
        self.retry_after: float | None = None  # seconds, from the last answer's Retry-After
        self.close_after = False  # the last answer said `Connection: close`
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionResetError("connection closed by the server")
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(self.lost)

    def send(self, request: bytes) -> asyncio.Future[tuple[int, str]]:
        if self.lost is not None or self.transport is None:
            raise ConnectionResetError("connection is closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.head_end = -1
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            self._parse_head(bytes(self.buffer[:end]))
        if len(self.buffer) >= self.head_end + self.length:
            del self.buffer[: self.head_end + self.length]
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_result((self.status, self.timing))

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split(b" ", 2)[1])
        self.length, self.timing, self.retry_after, self.close_after = 0, "", None, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                self.length = int(value)
            elif key == b"server-timing":
                self.timing = value.strip().decode()
            elif key == b"retry-after" and value.strip().isdigit():  # delay-seconds only
                self.retry_after = float(value)
            elif key == b"connection" and b"close" in value.lower():
                self.close_after = True  # the server closes once answered: reconnect


async def _open(host: str, port: int) -> _Connection:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(_Connection, host, port)
    return protocol


async def closed_loop(
    host: str,
    port: int,
    request: bytes | Sequence[bytes],
    concurrency: int,
    duration_s: float,
    max_requests: int = 1_000_000,
    timeout_s: float = 30.0,
    honor_retry_after: bool = False,
) -> RunResult:
    """`concurrency` connections, each sending its next request when the reply arrives.

    With several requests, connection i sends request i mod their count, every time (e.g.
    each client looks up its own entity).

    With `honor_retry_after`, a connection answered 503 or 429 with `Retry-After` waits that
    long first (within the run's duration), as a well-behaved client does; without it, it
    retries at once, as a client that ignores the header would.
    """
    if host not in LOOPBACK:
        raise ValueError(f"load is only ever sent to loopback addresses, not {host!r}")
    requests = [request] if isinstance(request, bytes) else list(request)
    result = RunResult(concurrency=concurrency)
    sent = 0
    connections = [await _open(host, port) for _ in range(concurrency)]
    cpu_start, start = time.process_time(), time.perf_counter()
    deadline = start + duration_s

    async def user(slot: int) -> None:
        nonlocal sent
        mine = requests[slot % len(requests)]
        while sent < max_requests and time.perf_counter() < deadline:
            sent += 1
            conn = connections[slot]
            begin = time.perf_counter()
            try:
                status, timing = await asyncio.wait_for(conn.send(mine), timeout_s)
            except (OSError, TimeoutError) as exc:
                result.errors.append(repr(exc))
                connections[slot] = await _reopen(conn, host, port, result)
                continue
            result.latencies.append(time.perf_counter() - begin)
            result.statuses[status] += 1
            if status == 200:
                result.server_timings.append(timing)
            if conn.close_after:  # as any HTTP/1.1 client does; not an error
                result.reconnects += 1
                connections[slot] = await _reopen(conn, host, port, result)
            if honor_retry_after and status in (429, 503) and conn.retry_after:
                await asyncio.sleep(min(conn.retry_after, deadline - time.perf_counter()))

    await asyncio.gather(*(user(slot) for slot in range(concurrency)))
    result.elapsed_s = time.perf_counter() - start
    result.client_cpu_s = time.process_time() - cpu_start
    for conn in connections:
        if conn.transport is not None:
            conn.transport.close()
    return result


async def _reopen(conn: _Connection, host: str, port: int, result: RunResult) -> _Connection:
    if conn.transport is not None:
        conn.transport.close()
    try:
        return await _open(host, port)
    except OSError as exc:
        result.errors.append(repr(exc))
        await asyncio.sleep(0.05)  # server gone: do not spin
        return conn


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]
