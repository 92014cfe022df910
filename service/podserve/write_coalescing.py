"""One send() per response: the header block waits for the body and they leave together.

uvicorn writes a response's status line and headers on `http.response.start` and the body
on `http.response.body`: two `transport.write` calls, so two send() syscalls and two TCP
segments for every small JSON answer. On loopback each send runs the receiver's TCP path
too; py-spy put the two writes at ~8% of a worker's samples on the tabular model.

The transport below holds the first write of each request cycle (the header block) and
sends it joined with the next write. A call_soon flush is the safety net: a streaming
response whose first chunk comes later, a `100 Continue`, or an error reply still leave
within the same loop iteration. close() flushes first; abort() and connection loss drop it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """Wraps a transport for one HTTP connection; everything but write/close passes through."""

    __slots__ = ("_cycle", "_held", "_loop", "_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol  # uvicorn's: its `cycle` marks a new request, `loop` its loop
        self._loop: asyncio.AbstractEventLoop = protocol.loop
        self._held: bytes | None = None
        self._cycle: object = None

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + data)
            return
        cycle = self._protocol.cycle
        if cycle is not self._cycle and data:
            self._cycle = cycle  # the first write of this cycle: hold it for the next one
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # the rest of the transport API, unchanged
        return getattr(self._transport, name)
