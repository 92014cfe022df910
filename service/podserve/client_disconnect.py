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
hook; uvicorn's h11 protocol has none and keeps the old behaviour). One uvicorn connection
serves one request at a time (pipelined ones wait their turn), so it holds one callback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

CONNECTION_SCOPE_KEY = "podserve.connection"


class ClientConnection(Protocol):
    lost: bool  # the client closed (or reset) the connection
    on_lost: Callable[[], None] | None  # the waiting request's, while it is queued


def client_connection(scope: dict) -> ClientConnection | None:
    return scope.get(CONNECTION_SCOPE_KEY)


def disconnect_watch_protocol(base: type[asyncio.Protocol]) -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol class, telling a queued request that its client left."""
    parent: Any = base

    class DisconnectWatchProtocol(parent):  # type: ignore[misc, valid-type]
        lost = False
        on_lost: Callable[[], None] | None = None

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self.scope[CONNECTION_SCOPE_KEY] = self  # the request's task has not run yet

        def connection_lost(self, exc: Exception | None) -> None:
            self.lost = True
            super().connection_lost(exc)
            callback, self.on_lost = self.on_lost, None
            if callback is not None:
                callback()

    return DisconnectWatchProtocol
