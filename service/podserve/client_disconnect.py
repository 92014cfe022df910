"""A request whose client has gone leaves the batch queue at once, instead of running.

uvicorn does not cancel a request's task when its client disconnects; it only answers a
later `receive()` with `http.disconnect`, and an inference route has read its body by the
time it queues. So a request whose client gave up (a client timeout, a load balancer's
idle cut, a retry elsewhere) still ran the model, and under overload, exactly when clients
give up, those runs took the inference threads from live requests and held queue rows that
shed live ones with 503s. The connection now tells the batcher when it is lost: a request
still waiting for its batch is withdrawn and answered 499 (nginx's "client closed request",
counted in the metrics and the access log; nobody is left to read it). A request whose batch
has started is answered 499 too; its run goes on for its batch-mates, and is terminated once
none of its requests is waited for (batcher.py).

The protocol class below marks the connection on every request's scope (httptools' parser
hook). One uvicorn connection serves one request at a time (pipelined ones wait their turn),
so it holds one callback.

A close is seen only while the connection is reading. uvicorn pauses reading once a body
has buffered past its high-water mark (64 KiB) and resumes on the app's next receive(),
which never comes after the last chunk: a large request's client could leave unseen.
read_body therefore calls body_read() when a body that large is in (small ones never pause).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

CONNECTION_SCOPE_KEY = "podserve.connection"


class ClientConnection(Protocol):
    lost: bool  # the client closed (or reset) the connection
    on_lost: Callable[[], None] | None  # the waiting request's, while it is queued

    def body_read(self) -> None: ...


def client_connection(scope: dict) -> ClientConnection | None:
    return scope.get(CONNECTION_SCOPE_KEY)


def body_read(scope: dict) -> None:
    """The request's whole body is read: read the connection again, so a close is seen."""
    connection = client_connection(scope)
    if connection is not None:
        connection.body_read()


def disconnect_watch_protocol(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class, telling a queued request that its client left."""
    parent: Any = base

    class DisconnectWatchProtocol(parent):  # type: ignore[misc, valid-type]
        lost = False
        on_lost: Callable[[], None] | None = None

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self.scope[CONNECTION_SCOPE_KEY] = self  # the request's task has not run yet

        def body_read(self) -> None:
            """Resume reading as the app's next receive() would have. Not while a pipelined
            request is queued (uvicorn paused for it; it is read once this one is answered).
            What comes now is the next request's (header_guard bounds those) or the EOF."""
            if self.flow.read_paused and not self.pipeline and not self.transport.is_closing():
                self.flow.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost = True
            super().connection_lost(exc)
            callback, self.on_lost = self.on_lost, None
            if callback is not None:
                callback()

    return DisconnectWatchProtocol
