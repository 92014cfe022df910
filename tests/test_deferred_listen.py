"""A worker's own SO_REUSEPORT socket listens only once the worker serves (deferred_listen.py).

Before, Gunicorn's socket listened from the fork, so the kernel sent a starting worker (a
recycle's replacement, a crashed worker's) new connections that waited out its start-up.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import gunicorn.sock
import httpx
import psutil
import pytest

from model_builders import save_slow_start_models
from podserve import deferred_listen
from server_process import ServerProcess


@pytest.fixture
def restore_gunicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """install() patches Gunicorn for the process: undo it after the test."""
    original = gunicorn.sock.BaseSocket.__dict__["_is_listening"]
    monkeypatch.setattr(gunicorn.sock.BaseSocket, "_is_listening", original)


def _arbiter(reuse_port: bool) -> SimpleNamespace:
    return SimpleNamespace(
        cfg=SimpleNamespace(reuse_port=reuse_port), log=logging.getLogger("test")
    )


def _conf(reuse_port: bool) -> SimpleNamespace:
    return SimpleNamespace(
        reuse_port=reuse_port, backlog=16, umask=0, uid=os.getuid(), gid=os.getgid()
    )


def _listens(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def test_this_gunicorn_has_the_check_that_is_patched() -> None:
    # Without it install() only warns, and starting workers take connections again.
    assert deferred_listen._gunicorn_is_listening is not None


@pytest.mark.usefixtures("restore_gunicorn")
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_with_reuse_port_a_worker_tcp_socket_is_bound_but_not_listening(
    host: str, request: pytest.FixtureRequest
) -> None:
    if host == "::1":
        request.getfixturevalue("ipv6_loopback")
    deferred_listen.install(_arbiter(reuse_port=True))
    kind = gunicorn.sock.TCP6Socket if ":" in host else gunicorn.sock.TCPSocket
    listener = kind((host, 0), _conf(True), logging.getLogger())
    try:
        port = listener.sock.getsockname()[1]
        assert port != 0 and not _listens(listener.sock)
        with socket.socket(listener.sock.family) as other, pytest.raises(OSError):
            other.bind((host, port))  # the port is held ...
        with pytest.raises(ConnectionRefusedError):  # ... but nothing is sent to it
            socket.create_connection((host, port), timeout=2)
        listener.sock.listen(16)  # as uvicorn's create_server does once the app started
        socket.create_connection((host, port), timeout=2).close()
    finally:
        listener.close()


@pytest.mark.usefixtures("restore_gunicorn")
def test_unix_sockets_still_listen_at_once() -> None:
    deferred_listen.install(_arbiter(reuse_port=True))
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "podserve.sock")
        # _conf(False): this kernel refuses SO_REUSEPORT on a unix socket (EOPNOTSUPP), which
        # Gunicorn does not catch; what is checked is that the patched check passes them on.
        listener = gunicorn.sock.UnixSocket(path, _conf(False), logging.getLogger())
        try:
            assert _listens(listener.sock)
        finally:
            listener.close()


@pytest.mark.usefixtures("restore_gunicorn")
def test_without_reuse_port_the_master_socket_listens_at_once() -> None:
    # A lone worker serves the master's socket: it must listen while the worker restarts.
    deferred_listen.install(_arbiter(reuse_port=False))
    listener = gunicorn.sock.TCPSocket(("127.0.0.1", 0), _conf(False), logging.getLogger())
    try:
        assert _listens(listener.sock)
    finally:
        listener.close()


@pytest.fixture(scope="module")
def slow_start_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_slow_start_models(tmp_path_factory.mktemp("slow-start"))


def _process_listens(pid: int, port: int) -> bool:
    connections = psutil.Process(pid).net_connections("tcp")
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


def _started(server: ServerProcess, pid: int) -> bool:
    return any(
        "Application startup complete" in line and f'"pid":{pid}' in line
        for line in server.logs().splitlines()
    )


def _replace_a_worker(server: ServerProcess, deadline: float) -> tuple[set[int], int]:
    """SIGTERM one worker; the pid of the replacement Gunicorn forks."""
    before = set(server.worker_pids())
    os.kill(min(before), signal.SIGTERM)
    while not (new := set(server.worker_pids()) - before) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(new) == 1, server.logs()[-3000:]
    return before, new.pop()


def test_a_starting_worker_takes_no_connection_before_it_serves(slow_start_repo: Path) -> None:
    """The replacement holds its slot's socket from the fork (slot_listeners.py: it listens
    throughout, since the exited worker's), but the other worker serves it meanwhile."""
    env = {"PODSERVE_EXPOSE_WORKER_ID": "true"}
    with ServerProcess(slow_start_repo, workers=2, env=env) as server:
        deadline = time.monotonic() + 30
        before, replacement = _replace_a_worker(server, deadline)
        samples: list[tuple[bool, str]] = []  # (replacement listens, worker that answered)
        while time.monotonic() < deadline:
            listens = _process_listens(replacement, server.port)
            answer = httpx.get(f"{server.url}/v2/health/live", headers={"connection": "close"})
            if _started(server, replacement):  # uvicorn listens after this line: stop here
                break
            samples.append((listens, answer.headers["x-podserve-worker"]))
        assert len(samples) >= 5, samples  # its start-up was long enough to watch
        assert all(listens for listens, _ in samples), samples  # the slot's socket, kept
        # Half of them hashed to that socket: without the cover they would wait out the
        # start-up and be answered by the replacement, or fewer samples would fit in it.
        assert {worker for _, worker in samples} == {str(max(before))}, samples


def test_turned_off_a_starting_worker_listens_from_the_fork(slow_start_repo: Path) -> None:
    # PODSERVE_DEFER_LISTEN=false: Gunicorn's own behaviour, the escape hatch if a Gunicorn
    # release changes the check deferred_listen.py answers.
    with ServerProcess(
        slow_start_repo, workers=2, env={"PODSERVE_DEFER_LISTEN": "false"}
    ) as server:
        deadline = time.monotonic() + 30
        _, replacement = _replace_a_worker(server, deadline)
        listened_while_starting = False
        while time.monotonic() < deadline:
            listens = _process_listens(replacement, server.port)
            if _started(server, replacement):  # its start-up line is logged before it listens
                break
            listened_while_starting |= listens
            time.sleep(0.01)
        assert listened_while_starting
