"""A TCP proxy the tests put between podserve and PostgreSQL, to cut the database off.

Never stop the machine's shared PostgreSQL. Two ways to lose it:
- `cut()`: every proxied connection is closed and new ones are closed at once (what a
  stopped server looks like to a client: errors come back immediately);
- `blackhole()`: bytes are swallowed and new connections are accepted but never answered
  (a dead network: clients only learn from their timeouts).
`restore()` lets new connections through again (blackholed ones are closed first: they have
lost bytes mid-protocol).

One more fault, on a single connection: `sever_at(marker)`. The next connection to send
`marker` loses its path at that moment: that chunk and every later byte are dropped both
ways, and no FIN or RST reaches the server when the client gives up (a conntrack entry
dropped, a node gone). The server keeps that session, and any transaction open in it, until
its own timeouts end it; the proxy closes it only when it closes.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class TcpProxy:
    DROPPING_MODES: tuple[str, ...] = ("blackhole",)  # modes in which data is swallowed

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections_refused = 0
        self.mode = "pass"  # pass | cut | blackhole (subclasses may add modes)
        self.delay_s = 0.0  # hold every chunk this long before forwarding it
        self.sever_marker: bytes | None = None
        self.severed = 0  # connections whose path was severed
        self._severed: set[socket.socket] = set()
        self._closed = False
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def cut(self) -> None:
        self.mode = "cut"
        self._close_all()

    def blackhole(self) -> None:
        self.mode = "blackhole"

    def sever_at(self, marker: bytes) -> None:
        self.sever_marker = marker

    def restore(self) -> None:
        if self.mode == "blackhole":
            self._close_all()
        self.mode = "pass"

    def close(self) -> None:
        self._closed = True
        self.cut()
        _close(self.listener)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _close_all(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _close(sock)

    def _track(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.update(sockets)

    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.mode == "cut":
                self.connections_refused += 1
                _close(client)
            elif self.mode == "blackhole":
                self._track(client)  # held open, never answered
            else:
                self._connect(client)

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _close(client)
            return
        self._track(client, upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.delay_s:
                    time.sleep(self.delay_s)
                if self.sever_marker is not None and self.sever_marker in data:
                    self._sever(src, dst)
                if self.mode not in self.DROPPING_MODES and src not in self._severed:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            self._end(src, dst)

    def _sever(self, src: socket.socket, dst: socket.socket) -> None:
        with self._lock:
            self.sever_marker = None
            self.severed += 1
            self._severed.update((src, dst))

    def _end(self, src: socket.socket, dst: socket.socket) -> None:
        """One direction ended: close the pair, unless its path was severed (then the far
        end must not learn: only `src` closes, `dst` stays open until the proxy closes)."""
        with self._lock:
            severed = src in self._severed
            self._sockets.discard(src)
            if not severed:
                self._sockets.discard(dst)
        _close(src)
        if not severed:
            _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
