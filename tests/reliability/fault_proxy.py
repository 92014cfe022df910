"""The database engineer's TcpProxy (tests/tcp_proxy.py) plus two more faults.

- `slow(delay_s)`: every chunk is held `delay_s` before it is forwarded, both ways (a slow
  network or an overloaded server: queries take at least 2 x delay_s);
- `reset()`: every proxied connection is aborted with a TCP RST (SO_LINGER 0), and new ones
  are reset as soon as they connect, until `restore()`.
`cut()` (the server stopped: connections closed, new ones closed at once) and `blackhole()`
come from TcpProxy; the shared PostgreSQL itself is never stopped.
"""

from __future__ import annotations

import contextlib
import socket
import struct

from tcp_proxy import TcpProxy

_LINGER_ZERO = struct.pack("ii", 1, 0)


def _abort(sock: socket.socket) -> None:
    """Close with RST instead of FIN.

    SHUT_RD first: a pump thread blocked in recv() holds the socket open past close(), so
    without it neither end would learn (PostgreSQL kept such sessions, and their open
    transactions' locks, for as long as the proxy ran). It sends nothing; the RST goes out
    when the last holder lets go.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy(TcpProxy):
    DROPPING_MODES = ("blackhole", "reset")
    resets = 0

    def slow(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def reset(self) -> None:
        self.mode = "reset"
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            self.resets += 1
            _abort(sock)

    def restore(self) -> None:
        self.delay_s = 0.0
        if self.mode == "reset":
            self.mode = "pass"
        super().restore()

    def _connect(self, client: socket.socket) -> None:
        if self.mode == "reset":
            self.resets += 1
            _abort(client)
            return
        super()._connect(client)
