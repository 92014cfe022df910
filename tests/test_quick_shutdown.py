"""Gunicorn's quick shutdown (SIGINT or SIGQUIT to the master) drains the workers as SIGTERM does.

The master sends its workers SIGQUIT. uvicorn-worker bound that to Gunicorn's handle_exit,
which sets a flag uvicorn never reads: the workers served on, ready, for the whole graceful
timeout, took new requests, and were SIGKILLed with requests in flight and no lifespan
shutdown (prediction-log flush, job hand-back). `kill -INT 1` in a container and Ctrl-C
forwarded by docker without -t do this.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from uvicorn.config import Config

from metrics_support import wait_for_in_flight
from podserve import connection_balance, lifecycle
from podserve.worker import DrainingServer
from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
GRACEFUL_S = 8  # the worker's drain: 6 s


@pytest.fixture()
def _not_draining(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifecycle, "_draining", False)
    monkeypatch.setattr(connection_balance, "set_serving", lambda serving: None)


def _readiness(url: str) -> str:
    try:
        return str(httpx.get(f"{url}/v2/health/ready", timeout=1).status_code)
    except httpx.ConnectError:
        return "refused"
    except httpx.HTTPError as exc:
        return type(exc).__name__


@pytest.mark.parametrize("sig", [signal.SIGQUIT, signal.SIGINT], ids=["SIGQUIT", "SIGINT"])
def test_a_quick_shutdown_drains_the_workers(affine_repo: Path, sig: signal.Signals) -> None:
    env = {"PODSERVE_SIMULATED_IO_MS": "3000", "PODSERVE_GRACEFUL_TIMEOUT_S": str(GRACEFUL_S)}
    server = ServerProcess(affine_repo, workers=1, env=env).start()
    try:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{server.url}/v2/models/affine/infer", json=BODY, timeout=30
            )
            wait_for_in_flight(server.url, 1)  # in its features phase (io_ms long)
            sent = time.monotonic()
            server.signal(sig)
            # Before: ready (200) and serving until the master's SIGKILL at GRACEFUL_S.
            seen = [_readiness(server.url)]
            while seen[-1] == "200" and time.monotonic() - sent < 1.5:
                time.sleep(0.05)
                seen.append(_readiness(server.url))
            assert seen[-1] in ("503", "refused"), seen
            response = pending.result()
        exit_code = server.proc.wait(GRACEFUL_S + 5)  # type: ignore[union-attr]
        stopped_s = time.monotonic() - sent
    finally:
        server.stop()
    logs = server.logs()
    assert response.status_code == 200, (response.status_code, response.text, logs[-3000:])
    assert exit_code == 0, logs[-3000:]
    assert stopped_s < GRACEFUL_S - 1, (stopped_s, logs[-3000:])  # the worker ended by itself
    assert "was sent SIGKILL" not in logs, logs[-3000:]
    assert "Waiting for application shutdown" in logs, logs[-3000:]  # lifespan shutdown ran
    assert "Finished server process" in logs, logs[-3000:]


@pytest.mark.usefixtures("_not_draining")
def test_the_worker_drains_on_sigquit_and_restores_the_handler_after() -> None:
    server = DrainingServer(Config(app=lambda: None))
    before = signal.getsignal(signal.SIGQUIT)
    with server.capture_signals():
        assert signal.getsignal(signal.SIGQUIT) == server.handle_exit
        os.kill(os.getpid(), signal.SIGQUIT)
        time.sleep(0.05)  # the handler runs between two bytecodes of this thread
        assert server.should_exit and lifecycle.is_draining()
        # Recorded as SIGTERM: raised again after the drain (not here: it would end pytest)
        # with its default action, SIGTERM's ends the process, SIGQUIT's dumps core.
        assert server._captured_signals == [signal.SIGTERM]
        server._captured_signals.clear()
    assert signal.getsignal(signal.SIGQUIT) == before


@pytest.mark.usefixtures("_not_draining")
@pytest.mark.parametrize(
    "signals",
    [
        (signal.SIGQUIT, signal.SIGINT),  # Ctrl-C: the terminal's SIGINT, the master's SIGQUIT
        (signal.SIGINT, signal.SIGQUIT),
        (signal.SIGINT, signal.SIGINT),
    ],
)
def test_a_second_stop_signal_does_not_force_an_exit(signals: tuple[int, int]) -> None:
    """uvicorn reads a second SIGINT as "force quit": no wait for in-flight requests and no
    lifespan shutdown. A worker gets SIGINT and SIGQUIT together on Ctrl-C in a terminal."""
    server = DrainingServer(Config(app=lambda: None))
    for sig in signals:
        server.handle_exit(sig, None)
    assert server.should_exit and not server.force_exit
    assert server._captured_signals == [signal.SIGTERM, signal.SIGTERM]
