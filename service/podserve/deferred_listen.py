"""A worker's own SO_REUSEPORT socket listens only once the worker serves.

With `reuse_port`, Gunicorn creates each worker's socket right after the fork and calls
listen() on it at once, so the kernel hashes new connections to a worker that is still
loading its models (a recycle's replacement, a crashed worker's): they wait out its whole
start-up although the other workers could answer them. A socket that is bound but not
listening holds the port yet is in no group the kernel picks from; uvicorn's
`create_server` calls listen() after the app's start-up.

Gunicorn (>= 27) skips listen() for a socket that already listens (`_is_listening`, for
sockets handed over by systemd); the master, before it forks, makes that check answer yes
for TCP sockets, so the worker's socket is only bound. Swapping the socket after the fork
instead left a few ms in which it listened, and closing it then reset connections that had
arrived (tests/reliability/test_worker_crash.py caught one).
"""

from __future__ import annotations

import socket
from typing import Any

import gunicorn.sock

_TCP = (socket.AF_INET, socket.AF_INET6)
_gunicorn_is_listening = getattr(gunicorn.sock.BaseSocket, "_is_listening", None)


def _listen_at_start(sock: socket.socket) -> bool:
    """Gunicorn's check "listens already?": yes for TCP, so uvicorn listens when it starts."""
    if sock.family in _TCP:
        return True
    return bool(_gunicorn_is_listening and _gunicorn_is_listening(sock))


def install(server: Any) -> None:
    """on_starting hook (master, before any fork): only workers create sockets then."""
    if not server.cfg.reuse_port:
        return  # one shared socket the master creates: it must listen from the start
    if _gunicorn_is_listening is None:
        server.log.warning(
            "this Gunicorn has no BaseSocket._is_listening: starting workers listen from "
            "the fork and take connections before their models are loaded"
        )
        return
    gunicorn.sock.BaseSocket._is_listening = staticmethod(_listen_at_start)


def gunicorn_hooks() -> dict[str, Any]:
    return {"on_starting": install}
