"""A model one worker stops batching at run time is unbatched in every worker of the pod.

The model: zero_hits_model (its output's dim 0 is the number of zeros, which the warm-up's
zero rows cannot tell from a row per input row). Merged requests of 0s and 1s show it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from batch_support import run_concurrently
from model_builders import save, zero_hits_model
from podserve import batching_demotion
from podserve.model_repository import load_repository
from podserve.onnx_model import ThreadBudget
from podserve.settings import Settings
from server_process import ServerProcess

BATCHED = {"max_batch_size": 8, "max_batch_delay_ms": 20}
DEMOTED = (0, [[-1, 2]], False)  # max_batch_size, the output's dims, dynamic_batching shown


@pytest.fixture
def hits_server(tmp_path: Path) -> Iterator[ServerProcess]:
    save(zero_hits_model(), tmp_path, "hits", 1, BATCHED)
    # Unbalanced: the keep-alive connections that merge requests stay on one worker.
    with ServerProcess(tmp_path, workers=2, env={"PODSERVE_BALANCE_CONNECTIONS": "false"}) as p:
        yield p


def _config(http: httpx.Client) -> tuple[int, list, bool]:
    config = http.get("/v2/models/hits/config").json()
    dims = [output["dims"] for output in config["output"]]
    return config["max_batch_size"], dims, "dynamic_batching" in config


def _configs(server: ServerProcess) -> dict[str, tuple[int, list, bool]]:
    """Each worker's answer, on a connection of its own."""
    clients = server.client_per_worker()
    try:
        return {http.get("/v2/health/live").headers["x-podserve-worker"]: _config(http)
                for http in clients}  # fmt: skip
    finally:
        for http in clients:
            http.close()


def _pinned(server: ServerProcess, worker: str, count: int) -> list[httpx.Client]:
    """`count` keep-alive connections to one worker."""
    pinned: list[httpx.Client] = []
    deadline = time.monotonic() + 20
    while len(pinned) < count and time.monotonic() < deadline:
        http = httpx.Client(base_url=server.url, timeout=10)
        if http.get("/v2/health/live").headers["x-podserve-worker"] == worker:
            pinned.append(http)
        else:
            http.close()
    assert len(pinned) == count
    return pinned


def _demote_on(server: ServerProcess, worker: str) -> None:
    """Concurrent one-row requests of 0s and 1s to one worker until it merges some of them
    (a 1 has no hit: the merged output has fewer rows than the requests) and stops batching."""
    pinned = _pinned(server, worker, 8)

    def send(index: int) -> None:
        for i in range(20):
            body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32",
                                "data": [(i + index) % 2]}]}  # fmt: skip
            response = pinned[index].post("/v2/models/hits/infer", json=body)
            assert response.status_code == 200, response.text

    try:
        for _ in range(5):
            with ThreadPoolExecutor(len(pinned)) as pool:
                list(pool.map(send, range(len(pinned))))
            if _config(pinned[0]) == DEMOTED:
                return
        raise AssertionError(f"worker {worker} kept batching: {_config(pinned[0])}")
    finally:
        for http in pinned:
            http.close()


def _wait_for_pod(server: ServerProcess, expected: tuple) -> dict[str, tuple]:
    """Every worker follows the pod's table within pod_settings.FOLLOW_INTERVAL_S (0.5 s);
    allow 30 times that for a loaded machine (it returns as soon as they all do)."""
    deadline = time.monotonic() + 15
    while True:
        seen = _configs(server)
        if all(config == expected for config in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_a_demotion_holds_for_every_worker_and_a_replacement(hits_server: ServerProcess) -> None:
    before = _configs(hits_server)
    assert all(config[0] == 8 for config in before.values()), before
    demoting, other = sorted(before)
    _demote_on(hits_server, demoting)
    seen = _wait_for_pod(hits_server, DEMOTED)
    assert all(config == DEMOTED for config in seen.values()), seen
    note = "batching turned off: another worker of the pod saw"
    logs = hits_server.wait_for_logs(lambda logs: note in logs)  # the workers write it
    followed = [json.loads(line) for line in logs.splitlines()
                if "batching turned off: another worker of the pod saw" in line]  # fmt: skip
    assert [str(record["pid"]) for record in followed] == [other], followed
    # The worker that saw it dies; its replacement learns the demotion at its start.
    hits_server.replace_worker(int(demoting))
    seen = _configs(hits_server)
    assert demoting not in seen
    assert all(config == DEMOTED for config in seen.values()), seen


def test_a_full_table_still_demotes_in_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save(zero_hits_model(), tmp_path, "m", 1, BATCHED)
    threads = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)
    served = load_repository(tmp_path, Settings(), threads).get("m")
    table = batching_demotion.POD_SETTING.shared
    table.update(lambda values: tuple(range(1, len(values) + 1)))  # every entry taken
    requests = [{"x": np.array([[i % 2]], np.float32)} for i in range(8)]
    try:
        with caplog.at_level(logging.WARNING, logger="podserve.batching_demotion"):
            asyncio.run(run_concurrently(served, requests))
    finally:
        table.update(lambda values: (0,) * len(values))
    assert not served.batching
    assert [r.message for r in caplog.records if r.name == "podserve.batching_demotion"] == [
        "batching demotions table full: the pod's other workers keep batching the model"
    ]


def test_a_reload_forgets_the_demotions(tmp_path: Path) -> None:
    """A HUP reads the repository again, and the new workers may serve another file at the
    same path: the table is emptied, as a pod restart would (it had kept every demotion)."""
    save(zero_hits_model(), tmp_path, "m", 1, BATCHED)
    threads = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)
    served = load_repository(tmp_path, Settings(), threads).get("m")
    table = batching_demotion.POD_SETTING.shared
    batching_demotion.publish(served)
    assert batching_demotion.model_key(served) in batching_demotion._keys(table.read()[1])
    batching_demotion.gunicorn_hooks()["on_reload"](None)
    assert not any(table.read()[1])
