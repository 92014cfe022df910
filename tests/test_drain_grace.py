"""A draining worker's grace for idle connections (drain_grace.py), on real loopback sockets.

uvicorn's HTTP protocol runs in an asyncio server here, not in Gunicorn, so that a drain can
begin at an exact point: the race it covers (a connection accepted in the same loop pass
that ends the serving loop) is too narrow to hit on purpose in a whole server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from pydantic import ValidationError
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from podserve import drain_grace
from podserve.settings import Settings

GRACE_S = 0.3
REQUEST = b"GET / HTTP/1.1\r\nHost: podserve\r\n\r\n"


async def _ok(scope: dict, receive: object, send: object) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


@asynccontextmanager
async def _server() -> AsyncIterator[tuple[int, ServerState]]:
    config = Config(_ok, lifespan="off", log_config=None, access_log=False)
    config.load()
    state = ServerState()
    protocol = drain_grace.drain_grace_protocol(HttpToolsProtocol, GRACE_S)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: protocol(config=config, server_state=state, app_state={}),  # type: ignore[call-arg]
        "127.0.0.1",
        0,
    )
    try:
        yield server.sockets[0].getsockname()[1], state
    finally:
        server.close()
        for connection in list(state.connections):
            connection.transport.close()


@pytest.fixture
def worker_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    """As DrainingServer.shutdown sets it, undone after the test (module state)."""
    monkeypatch.setattr(drain_grace, "_worker_draining", False)
    drain_grace.begin_worker_drain()


def test_a_connection_made_after_the_drain_began_is_answered_then_closed(
    worker_draining: None,
) -> None:
    async def scenario() -> bytes:
        async with _server() as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST)  # within the grace
            reply = await asyncio.wait_for(reader.read(), timeout=5)  # to EOF: closed after
            writer.close()
            return reply

    reply = asyncio.run(scenario())
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert b"connection: close" in reply.lower(), reply


def test_an_idle_connection_made_after_the_drain_began_is_closed_after_the_grace(
    worker_draining: None,
) -> None:
    """Missed by uvicorn's walk over its connections, it used to stay open until the
    graceful timeout cancelled the worker (23 s by default)."""

    async def scenario() -> tuple[bytes, float, int]:
        async with _server() as (port, state):
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            reply = await asyncio.wait_for(reader.read(), timeout=5)
            waited = loop.time() - started
            writer.close()
            await asyncio.sleep(0.05)  # the server side's connection_lost
            return reply, waited, len(state.connections)

    reply, waited, still_open = asyncio.run(scenario())
    assert reply == b""  # closed without an answer: no request came
    assert GRACE_S * 0.8 <= waited < 5, waited  # after the grace, not at once
    assert still_open == 0


def test_before_a_drain_connections_stay_open() -> None:
    async def scenario() -> bytes:
        async with _server() as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(REQUEST + REQUEST)  # keep-alive: both answered on one connection
            replies = b""
            while replies.count(b"HTTP/1.1 200") < 2:
                replies += await asyncio.wait_for(reader.read(4096), timeout=5)
            with pytest.raises(TimeoutError):  # still open after the grace
                await asyncio.wait_for(reader.read(1), timeout=GRACE_S * 2)
            writer.close()
            return replies

    replies = asyncio.run(scenario())
    assert b"connection: close" not in replies.lower(), replies


@pytest.mark.parametrize(
    ("grace", "graceful_timeout"),
    [(23.0, 25.0), (5.0, 6.0), (2.0, 3.5), (11.0, 60.0), (float("inf"), 25.0)],
)
def test_a_grace_as_long_as_the_drain_is_refused(grace: float, graceful_timeout: float) -> None:
    with pytest.raises(ValidationError, match="drain_idle_grace_s"):
        Settings(drain_idle_grace_s=grace, graceful_timeout_s=graceful_timeout)


def test_the_default_grace_fits_a_short_drain() -> None:
    assert Settings(graceful_timeout_s=3).drain_idle_grace_s == 0.5
    # Gunicorn's timeout is whole seconds, rounded up: 3.5 s gives a 2 s drain.
    assert Settings(graceful_timeout_s=3.5, drain_idle_grace_s=1.5).worker_drain_s == 2
