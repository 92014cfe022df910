"""A worker tells the master it is alive while its models load.

uvicorn's heartbeat (callback_notify) runs only from main_loop, which starts after lifespan
start-up. Models larger or more numerous than PODSERVE_WORKER_TIMEOUT_S allows to load
survived only because Gunicorn 27 compares a monotonic time with the heartbeat file's first,
wall-clock mtime; Gunicorn before 27 compared wall-clock times and killed such a worker, which
booted again, for ever. The heartbeat file is read here as the master reads it.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

import pytest

from model_builders import save, slow_model
from server_process import ServerProcess


@pytest.fixture(scope="module")
def slow_to_load_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("slow-load")
    # Its warm-up run takes a few seconds of CPU: longer than the worker timeout below.
    save(slow_model(size=1024, layers=300), repo, "slow", 1)
    return repo


def heartbeat_file(pid: int) -> str | None:
    """The worker's heartbeat file (Gunicorn's WorkerTmp: unlinked, open in the worker)."""
    fds = Path(f"/proc/{pid}/fd")
    try:
        for fd in fds.iterdir():
            if "wgunicorn-" in os.readlink(fd):
                return str(fd)
    except OSError:  # the worker not started yet, or gone
        return None
    return None


def sample_heartbeats(server: ServerProcess, beats: set[float], stop: threading.Event) -> None:
    while not stop.wait(0.05):
        path = next(filter(None, map(heartbeat_file, server.worker_pids())), None)
        with contextlib.suppress(OSError, TypeError):
            beats.add(os.stat(path).st_mtime)  # type: ignore[arg-type]


def test_a_worker_loading_models_keeps_its_heartbeat_going(slow_to_load_repo: Path) -> None:
    server = ServerProcess(slow_to_load_repo, workers=1, env={"PODSERVE_WORKER_TIMEOUT_S": "2"})
    beats: set[float] = set()
    stop = threading.Event()
    # Sampled apart from the readiness probe, which waits on a socket no worker serves yet.
    sampler = threading.Thread(target=sample_heartbeats, args=(server, beats, stop))
    server.launch()
    sampler.start()
    try:
        server.wait_ready(90)
        stop.set()
        sampler.join()
        logs = server.logs()
    finally:
        stop.set()
        server.stop()
    load_s = float(re.search(r'"load_s":([0-9.]+)', logs).group(1))  # type: ignore[union-attr]
    assert load_s > 2, logs[-3000:]  # longer than the worker timeout
    # Every 0.5 s (a quarter of the worker timeout) while the models load; before, none: the
    # file kept its creation time until the worker served.
    assert len(beats) >= 3, (sorted(beats), load_s)  # half what is due, for a busy host
    assert "WORKER TIMEOUT" not in logs, logs[-3000:]
