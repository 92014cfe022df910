"""One send per response: headers wait for the body, but never longer than a loop iteration.

A real uvicorn server with podserve's protocol class on a loopback socket, a real client;
the only addition is a recorder around the connection's transport that logs each write the
kernel is asked to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from podserve import header_guard
from podserve.write_coalescing import CoalescingTransport

BODY = b'{"ok":true}'


class RecordingTransport:
    """The real transport, with a log of what was handed to it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/upload":
        while (await receive()).get("more_body"):
            pass
    headers = [(b"content-type", b"application/json")]
    if scope["path"] == "/slow-stream":
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await asyncio.sleep(0.5)  # the first chunk comes late: the headers must not wait
        await send({"type": "http.response.body", "body": BODY})
        return
    headers.append((b"content-length", str(len(BODY)).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[int, list[RecordingTransport]]]:
    recorders: list[RecordingTransport] = []

    def wrap(transport: asyncio.Transport, protocol: Any) -> CoalescingTransport:
        recorders.append(RecordingTransport(transport))
        return CoalescingTransport(recorders[-1], protocol)  # type: ignore[arg-type]

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app, http=header_guard.guarded_protocol(10.0, 65536), log_level="warning", lifespan="off"
    )
    uv = uvicorn.Server(config)
    original, header_guard.CoalescingTransport = header_guard.CoalescingTransport, wrap
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    try:
        while not uv.started:
            await asyncio.sleep(0.01)
        yield sock.getsockname()[1], recorders
    finally:
        header_guard.CoalescingTransport = original  # type: ignore[misc]
        uv.should_exit = True
        await task


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.readexactly(len(BODY))


def test_headers_and_body_leave_in_one_write_on_every_keep_alive_request() -> None:
    async def scenario() -> None:
        async with serving() as (port, recorders):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(3):
                reply = await _get(reader, writer, "/")
                assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(BODY)
            writer.close()
            (recorder,) = recorders
            assert len(recorder.writes) == 3  # one per response, not two
            assert all(w.startswith(b"HTTP/1.1 200") and w.endswith(BODY) for w in recorder.writes)

    asyncio.run(scenario())


def test_headers_of_a_response_whose_body_comes_late_are_not_held() -> None:
    async def scenario() -> None:
        async with serving() as (port, recorders):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow-stream HTTP/1.1\r\nHost: t\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.3)  # before the chunk
            assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
            rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
            assert BODY in rest
            writer.close()
            assert len(recorders[0].writes) >= 2

    asyncio.run(scenario())


def test_100_continue_is_sent_before_the_body_is_read() -> None:
    async def scenario() -> None:
        async with serving() as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
            writer.write(head + b"Expect: 100-continue\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.3)
            assert interim.startswith(b"HTTP/1.1 100")
            writer.write(b"abcd")
            final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert final.startswith(b"HTTP/1.1 200")
            assert await reader.readexactly(len(BODY)) == BODY
            writer.close()

    asyncio.run(scenario())


def test_a_refused_request_is_flushed_before_the_connection_closes() -> None:
    """Oversized headers in one burst: the 431 leaves before the close (and is not lost)."""

    async def scenario() -> None:
        async with serving() as (port, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 2)  # until the server closes
            assert reply.startswith(b"HTTP/1.1 431")
            writer.close()

    asyncio.run(scenario())
