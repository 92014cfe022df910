"""The benchmark's load generator against a real podserve: bounded, counts what it sees."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from loadtests.loadgen import closed_loop, encode_request, percentile

from podserve.phases import PhaseTimings, parse_server_timing
from podserve.settings import get_settings
from podserve.simulated_io import simulated_features

TABULAR = orjson.dumps(
    {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1.0] * 30}]}
)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_closed_loop_measures_a_real_server(server) -> None:
    port = _port(server.url)
    request = encode_request(
        "POST", "127.0.0.1", port, "/v2/models/tabular/infer", TABULAR, "application/json"
    )
    started = time.monotonic()
    result = asyncio.run(closed_loop("127.0.0.1", port, request, 4, 1.0, max_requests=3000))
    assert time.monotonic() - started < 15
    assert result.errors == [] and set(result.statuses) == {200}, result.statuses
    assert 0 < result.ok <= 3000 and result.throughput > 0
    assert len(result.latencies) == result.ok
    assert result.client_cpu_s > 0
    phases = parse_server_timing(result.server_timings[0])
    assert {"parse", "queue", "infer"} <= set(phases), phases


def test_closed_loop_counts_error_statuses(server) -> None:
    port = _port(server.url)
    request = encode_request(
        "POST", "127.0.0.1", port, "/v2/models/nope/infer", TABULAR, "application/json"
    )
    result = asyncio.run(closed_loop("127.0.0.1", port, request, 2, 0.3, max_requests=50))
    assert result.statuses[404] > 0 and result.ok == 0
    assert result.failures == sum(result.statuses.values())


def test_each_connection_sends_its_own_request(server) -> None:
    """Connection i sends request i mod their count: here one good, one for no model."""
    port = _port(server.url)
    requests = [
        encode_request("POST", "127.0.0.1", port, f"/v2/models/{name}/infer", TABULAR,
                       "application/json")
        for name in ("tabular", "nope")
    ]  # fmt: skip
    result = asyncio.run(closed_loop("127.0.0.1", port, requests, 2, 0.5, max_requests=200))
    assert result.ok > 0 and result.statuses[404] > 0
    assert set(result.statuses) == {200, 404}


def test_closed_loop_can_honor_retry_after(shedding_server) -> None:
    """Every entity request is answered 503 + Retry-After: 1. Clients that honour it send one
    request per second each; by default they retry at once (what an overload storm looks
    like), many times that."""
    body = orjson.dumps({"parameters": {"entity_ids": ["patient-0001"]}})
    clients, seconds = 4, 2.0
    port = _port(shedding_server.url)
    request = encode_request(
        "POST", "127.0.0.1", port, "/v2/models/tabular/infer", body, "application/json"
    )
    started = time.monotonic()
    polite = asyncio.run(closed_loop("127.0.0.1", port, request, clients, seconds,
                                     max_requests=5000, honor_retry_after=True))  # fmt: skip
    polite_s = time.monotonic() - started
    rude = asyncio.run(closed_loop("127.0.0.1", port, request, clients, seconds,
                                   max_requests=5000))  # fmt: skip
    assert set(polite.statuses) == {503} and set(rude.statuses) == {503}, (polite, rude)
    bound = clients * (seconds + 1)  # one per second each, plus the first
    assert 0 < polite.statuses[503] <= bound, polite.statuses
    assert rude.statuses[503] > 4 * bound, rude.statuses
    assert polite_s < seconds + 2  # the last wait is cut at the end of the run


def test_load_goes_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(closed_loop("10.0.0.1", 80, b"", 1, 0.1))


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN


def test_simulated_io_is_off_by_default_and_recorded_as_features(monkeypatch) -> None:
    get_settings.cache_clear()
    monkeypatch.delenv("PODSERVE_SIMULATED_IO_MS", raising=False)
    timings = PhaseTimings()
    asyncio.run(simulated_features(timings))
    assert "features" not in timings.durations
    monkeypatch.setenv("PODSERVE_SIMULATED_IO_MS", "5")
    get_settings.cache_clear()
    try:
        asyncio.run(simulated_features(timings))
    finally:
        get_settings.cache_clear()
    assert 0.005 <= timings.durations["features"] < 0.5


def test_closed_loop_reconnects_after_connection_close() -> None:
    """A server that answers `Connection: close` and hangs up (as podserve does to even out
    its workers' connections): every answer counts, each is followed by a new connection,
    and none is an error."""
    accepted = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def run() -> object:
        server = await asyncio.start_server(answer_once, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        request = encode_request("GET", "127.0.0.1", port, "/")
        async with server:
            return await closed_loop("127.0.0.1", port, request, 3, 5.0, max_requests=30)

    result = asyncio.run(run())
    assert result.errors == [] and result.statuses == {200: 30}, result
    assert result.reconnects == 30
    assert accepted >= 30  # a new connection for every request after the first three
