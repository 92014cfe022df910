"""A busy port stops `podserve serve` with a clear error instead of sharing it (SO_REUSEPORT)."""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from gunicorn.config import Config

from model_builders import affine_model, save
from podserve import bind_check
from server_process import ServerProcess, free_port, serve_to_exit


def _serve(repo: Path, port: int, workers: int = 1) -> tuple[int, str]:
    """Without the check this would not stop: it would serve, or re-fork failing workers."""
    return serve_to_exit(repo, {"PODSERVE_PORT": str(port), "PODSERVE_WORKERS": str(workers)})


def _listener(port: int = 0, reuse_addr: bool = False) -> socket.socket:
    """A plain listening socket, without SO_REUSEPORT, as most programs open one."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_addr))
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


@pytest.mark.parametrize("workers", [1, 2])  # the master's own socket / one per worker
def test_port_held_by_another_program_stops_the_server(tmp_path: Path, workers: int) -> None:
    save(affine_model(), tmp_path, "affine")
    with _listener() as holder:
        port = holder.getsockname()[1]
        status, output = _serve(tmp_path, port, workers)
    assert status == 1
    assert f"address already in use: 127.0.0.1:{port}" in output
    assert "Booting worker" not in output  # stopped before forking


def test_second_podserve_on_a_busy_port_does_not_share_it(server: ServerProcess) -> None:
    """Both would bind with SO_REUSEPORT, and the kernel would split new connections."""
    repo = Path(server.env["PODSERVE_MODEL_REPOSITORY"])
    status, output = _serve(repo, server.port, workers=2)
    assert status == 1
    assert f"address already in use: 127.0.0.1:{server.port}" in output
    workers = {str(pid) for pid in server.worker_pids()}
    for _ in range(20):  # new connections, each hashed afresh: all reach the first server
        response = httpx.get(f"{server.url}/v2/health/ready", timeout=5)
        assert response.status_code == 200
        assert response.headers["x-podserve-worker"] in workers


def test_started_server_logs_where_it_listens(server: ServerProcess) -> None:
    expected = (
        f"Listening at: http://127.0.0.1:{server.port} (a SO_REUSEPORT socket per worker slot)"
    )
    assert expected in server.logs()
    # Gunicorn's own line names the master's listeners, none with reuse_port: dropped.
    assert "Listening at:  (" not in server.logs()


def test_port_with_only_time_wait_connections_is_free() -> None:
    """A restart right after a stop must not fail: closed connections linger in TIME_WAIT.

    The listener sets SO_REUSEADDR as Gunicorn's and uvicorn's do; its closed connections
    keep it, and Linux lets a bind through them only if the new socket sets it too.
    """
    with _listener(reuse_addr=True) as listener:
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first, so its end goes to TIME_WAIT
        client.close()
    assert bind_check.busy_addresses([("127.0.0.1", port)]) == []
    with _listener(port, reuse_addr=True):  # a listener again: busy
        assert bind_check.busy_addresses([("127.0.0.1", port)]) == [f"127.0.0.1:{port}"]


def test_unix_sockets_and_inherited_fds_are_not_probed(tmp_path: Path) -> None:
    assert bind_check.busy_addresses([str(tmp_path / "podserve.sock"), 3]) == []


@pytest.mark.usefixtures("ipv6_loopback")
def test_ipv6_address_is_probed_and_shown_in_brackets() -> None:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert bind_check.busy_addresses([("::1", port)]) == [f"[::1]:{port}"]


def test_an_address_family_the_host_lacks_is_left_to_gunicorn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A kernel without IPv6 refuses the socket itself (EAFNOSUPPORT). That cannot be made
    here, so socket creation is made to fail as it would: the check must not crash the
    master with a traceback; Gunicorn's own bind then names the problem."""
    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with _listener() as held:
        port = held.getsockname()[1]
        busy = bind_check.busy_addresses([("::1", port), ("127.0.0.1", port)])
    assert busy == [f"127.0.0.1:{port}"]  # the IPv4 address still checked


def test_reexec_shares_the_port_on_purpose() -> None:
    """After USR2 the new master starts while the old one's workers still listen."""
    config = Config()
    config.set("bind", [f"127.0.0.1:{free_port()}"])
    config.set("reuse_port", True)
    errors: list[str] = []
    log = SimpleNamespace(error=lambda msg, *args: errors.append(msg % args))
    with _listener(config.address[0][1]):
        bind_check.on_starting(SimpleNamespace(master_pid=1234, cfg=config, log=log))
        assert errors == []
        with pytest.raises(SystemExit):
            bind_check.on_starting(SimpleNamespace(master_pid=0, cfg=config, log=log))
    assert "address already in use" in errors[0]


@pytest.mark.usefixtures("ipv6_loopback")
def test_host_any_ipv6_serves_both_families(affine_repo: Path) -> None:
    """PODSERVE_HOST=:: (the chart's server.host for IPv6 clusters) answers over IPv6 and,
    dual-stack, over IPv4: the kubelet probes whichever address the pod has."""
    with ServerProcess(affine_repo, workers=2, env={"PODSERVE_HOST": "::"}) as server:
        for host in ("127.0.0.1", "[::1]"):
            response = httpx.get(f"http://{host}:{server.port}/v2/health/ready", timeout=10)
            assert response.status_code == 200, (host, response.text)
