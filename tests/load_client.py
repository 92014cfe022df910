"""A small closed-loop HTTP load generator for tests (bounded in time, loopback only)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import orjson

# One row for the `affine` test model (conftest's model_repo), as a V2 request body.
AFFINE = orjson.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
)


@dataclass
class LoadResult:
    statuses: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    workers: Counter = field(default_factory=Counter)
    connections: set[tuple[str, int]] = field(default_factory=set)  # (worker, client port)
    users_answered: set[int] = field(default_factory=set)  # clients that got any response
    closed_by_server: int = 0  # responses with `Connection: close` (the client reconnects)
    retry_after: set[str] = field(default_factory=set)
    server_timings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)


async def closed_loop(
    url: str,
    path: str,
    body: bytes,
    concurrency: int,
    duration_s: float,
    max_requests: int = 100_000,
) -> LoadResult:
    """`concurrency` keep-alive connections, each sending the next request on its reply.

    `duration_s` counts from when every user has its client: making 32 clients took 12 s on a
    loaded 2-core machine (each loaded the CA certificates), so a 2 s loop that counted them
    sent 2 requests and never filled the queue it was meant to (nothing shed, the test failed).
    """
    result = LoadResult()
    deadline = float("inf")  # set once every user is ready
    ready = asyncio.Event()
    waiting = concurrency
    sent = 0
    # One client of one connection per user: a shared pool hands each request its first idle
    # connection, so requests pile onto whichever connections (and workers) answered first.
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # httpx asks for gzip, deflate (and br, zstd when installed) by default; podserve would
    # compress an answer of 1 KiB or more: these tests measure uncompressed answers.
    headers = {"content-type": "application/json", "accept-encoding": "identity"}
    tls = ssl.create_default_context()  # loopback HTTP: unused, but made once, not per client

    async def user(index: int) -> None:
        nonlocal deadline, waiting
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30, verify=tls) as client:
            waiting -= 1
            if waiting == 0:
                deadline = time.monotonic() + duration_s
                ready.set()
            await ready.wait()
            await requests(client, index)

    async def requests(client: httpx.AsyncClient, index: int) -> None:
        nonlocal sent
        while time.monotonic() < deadline and sent < max_requests:
            sent += 1
            start = time.perf_counter()
            try:
                response = await client.post(path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                result.errors.append(repr(exc))
                continue
            result.latencies.append(time.perf_counter() - start)
            result.users_answered.add(index)
            result.statuses[response.status_code] += 1
            worker = response.headers.get("x-podserve-worker")
            result.workers[worker] += 1
            if response.headers.get("connection", "").lower() == "close":
                result.closed_by_server += 1  # its port may be unreadable below: count it here
            stream = response.extensions.get("network_stream")
            if stream is not None:
                with contextlib.suppress(OSError):  # closed on `Connection: close` already
                    result.connections.add((worker, stream.get_extra_info("client_addr")[1]))
            if "retry-after" in response.headers:
                result.retry_after.add(response.headers["retry-after"])
            if response.status_code == 200:
                result.server_timings.append(response.headers.get("server-timing", ""))

    await asyncio.gather(*(user(index) for index in range(concurrency)))
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
