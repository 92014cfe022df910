"""The garbage collector's tuning: in-process, and in the workers of a real server."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator

import pytest

from podserve.gc_tuning import tune_collector
from server_process import ServerProcess


@pytest.fixture()
def restore_collector() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restore_collector")
def test_tune_collector_freezes_the_heap_and_raises_the_young_threshold() -> None:
    gc.unfreeze()
    kept = [object() for _ in range(10)]  # noqa: F841 - alive across the freeze
    tune_collector(12_345, freeze=True)
    assert gc.get_freeze_count() > 1000  # pytest, podserve, numpy, ...
    assert gc.get_threshold()[0] == 12_345
    assert gc.collect() >= 0  # collections still run, over what was allocated since


@pytest.mark.usefixtures("restore_collector")
def test_zero_and_false_leave_the_collector_as_python_set_it() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    tune_collector(0, freeze=False)
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def _tuning_lines(server: ServerProcess) -> list[dict]:
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("msg") == "garbage collector tuned"]


def test_every_worker_tunes_its_collector_once_loaded(server: ServerProcess) -> None:
    tuned = _tuning_lines(server)
    assert len({line["pid"] for line in tuned}) == server.workers, tuned
    for line in tuned:
        assert line["frozen_objects"] > 10_000  # FastAPI, ONNX Runtime, the models
        assert line["thresholds"][0] == 10_000


def test_settings_turn_the_tuning_off(model_repo) -> None:
    env = {"PODSERVE_GC_FREEZE": "false", "PODSERVE_GC_GEN0_THRESHOLD": "0"}
    with ServerProcess(model_repo, workers=1, env=env) as server:
        (line,) = _tuning_lines(server)
    assert line["frozen_objects"] == 0
    assert line["thresholds"][0] == 700  # CPython's default
