"""Triton's statistics extension, read with the real tritonclient from a 2-worker server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from server_process import ServerProcess

ROWS = np.random.default_rng(7).normal(size=(2, 30)).astype(np.float32)
PHASES_RUN = ("queue", "compute_input", "compute_infer", "compute_output")  # every model has all
STAGES = ("compute_input", "compute_infer", "compute_output")  # of a batch: every model has all


@pytest.fixture(scope="module")
def stats_server(model_repo: Path) -> Iterator[ServerProcess]:
    """Its own server: the counts below are exact, no other test's requests in them."""
    with ServerProcess(model_repo, workers=2) as proc:
        yield proc


@pytest.fixture()
def triton_client(stats_server: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(f"127.0.0.1:{stats_server.port}")


def _tabular(client: triton.InferenceServerClient) -> dict:
    (stat,) = client.get_inference_statistics("tabular")["model_stats"]
    return stat


def _infer_on_fresh_connections(server: ServerProcess, count: int) -> set[str]:
    """Each request on a new connection: the kernel spreads them over both workers."""
    body = {"inputs": [{"name": "input", "shape": [2, 30], "datatype": "FP32",
                        "data": ROWS.ravel().tolist()}]}  # fmt: skip
    workers = set()
    for _ in range(count):
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.post("/v2/models/tabular/infer", json=body)
        assert response.status_code == 200, response.text
        workers.add(response.headers["x-podserve-worker"])
    return workers


def _wait_for(client: triton.InferenceServerClient, success: int) -> dict:
    """Other workers' samples reach the metric files within a second (metrics.py)."""
    deadline = time.monotonic() + 10
    while True:
        stat = _tabular(client)
        if stat["inference_stats"]["success"]["count"] >= success or time.monotonic() > deadline:
            return stat
        time.sleep(0.2)


def _batch_delta(after: dict, before: dict) -> dict[int, dict[str, dict[str, int]]]:
    """batch size -> stage -> runs and ns added between the two reads."""
    earlier = {entry["batch_size"]: entry for entry in before["batch_stats"]}
    delta = {}
    for entry in after["batch_stats"]:
        old = earlier.get(entry["batch_size"], {})
        zero = {"count": 0, "ns": 0}
        stages = {
            stage: {k: entry[stage][k] - old.get(stage, zero)[k] for k in ("count", "ns")}
            for stage in STAGES
        }
        if any(d["count"] for d in stages.values()):
            delta[entry["batch_size"]] = stages
    return delta


def _delta(after: dict, before: dict, key: str) -> dict[str, int]:
    a, b = after["inference_stats"][key], before["inference_stats"][key]
    return {"count": a["count"] - b["count"], "ns": a["ns"] - b["ns"]}


def test_every_request_of_every_worker_is_counted(
    stats_server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    before = _wait_for(triton_client, 0)  # start-up warm-up runs, if any, are in `before`
    started_ms = time.time() * 1000
    workers = _infer_on_fresh_connections(stats_server, 30)
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS)
    for _ in range(10):  # and over the binary extension, on one keep-alive connection
        triton_client.infer("tabular", [tensor])
    ended_ms = time.time() * 1000
    assert len(workers) == 2, "30 new connections all went to one worker"

    goal = before["inference_stats"]["success"]["count"] + 40
    after = _wait_for(triton_client, goal)
    success = _delta(after, before, "success")
    assert success["count"] == 40
    assert after["inference_count"] - before["inference_count"] == 80  # rows, 2 per request
    # One request at a time (each waits for its answer): every one is a session run alone.
    assert after["execution_count"] - before["execution_count"] == 40
    for key in PHASES_RUN:
        phase = _delta(after, before, key)
        assert phase["count"] == 40, key
        assert 0 < phase["ns"] < success["ns"], key
    compute = sum(_delta(after, before, key)["ns"] for key in PHASES_RUN)
    assert compute < success["ns"]  # the phases are parts of the requests' time
    assert _delta(after, before, "fail")["count"] == 0
    assert started_ms - 1000 <= after["last_inference"] <= ended_ms + 1000
    assert after["version"] == "1"
    per_size = _batch_delta(after, before)
    assert list(per_size) == [2], per_size  # every run held one request of 2 rows
    assert {stage: d["count"] for stage, d in per_size[2].items()} == dict.fromkeys(STAGES, 40)
    assert all(d["ns"] > 0 for d in per_size[2].values())
    # The same session runs, seen per batch and per request: the same total run time.
    infer_ns = _delta(after, before, "compute_infer")["ns"]
    assert abs(per_size[2]["compute_infer"]["ns"] - infer_ns) < 1e4


def test_a_model_with_a_preprocessor_reports_compute_input(
    triton_client: triton.InferenceServerClient,
) -> None:
    texts = triton.InferInput("text", [3], "BYTES")
    texts.set_data_from_numpy(np.array(["one", "two", "three"], dtype=object))
    for _ in range(5):
        triton_client.infer("text", [texts])
    deadline = time.monotonic() + 10
    while True:
        (stat,) = triton_client.get_inference_statistics("text")["model_stats"]
        stats = stat["inference_stats"]
        if stats["success"]["count"] >= 5 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["success"]["count"] == 5
    assert stats["compute_input"]["count"] == 5 and stats["compute_input"]["ns"] > 0
    assert stat["inference_count"] == 15
    (size,) = stat["batch_stats"]  # one request of 3 sentences at a time: runs of 3 rows
    assert size["batch_size"] == 3
    assert size["compute_input"]["count"] == 5
    # The tokenizer's time, per batch and per request alike (one request per batch).
    assert abs(size["compute_input"]["ns"] - stats["compute_input"]["ns"]) < 1e4


def test_a_refused_request_counts_as_a_failure(
    stats_server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    before = _tabular(triton_client)
    wrong_method = httpx.get(f"{stats_server.url}/v2/models/tabular/infer", timeout=10)
    assert wrong_method.status_code == 405  # no inference request: not a failure either
    bad = {"inputs": [{"name": "input", "shape": [1, 29], "datatype": "FP32", "data": [0] * 29}]}
    response = httpx.post(f"{stats_server.url}/v2/models/tabular/infer", json=bad, timeout=10)
    assert response.status_code == 400, response.text
    deadline = time.monotonic() + 10
    while (fail := _delta(_tabular(triton_client), before, "fail"))["count"] < 1:
        assert time.monotonic() < deadline, "the 400 never reached the statistics"
        time.sleep(0.2)
    time.sleep(1.5)  # every worker's samples of both requests are in (flushed each second)
    fail = _delta(_tabular(triton_client), before, "fail")
    assert fail["count"] == 1 and fail["ns"] > 0
    assert _delta(_tabular(triton_client), before, "success")["count"] == 0


def test_every_served_model_and_version_rules(
    stats_server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    everything = triton_client.get_inference_statistics()["model_stats"]
    index = triton_client.get_model_repository_index()
    served = sorted((entry["name"], int(entry["version"])) for entry in index)
    assert [(s["name"], int(s["version"])) for s in everything] == served  # one per version
    assert "statistics" in triton_client.get_server_metadata()["extensions"]

    (one,) = triton_client.get_inference_statistics("tabular", "1")["model_stats"]
    assert (one["name"], one["version"]) == ("tabular", "1")
    both = triton_client.get_inference_statistics("affine")["model_stats"]
    assert [(s["name"], s["version"]) for s in both] == [("affine", "1"), ("affine", "2")]
    for name, version in (("missing", ""), ("tabular", "9")):
        with pytest.raises(InferenceServerException) as err:
            triton_client.get_inference_statistics(name, version)
        assert err.value.status() == "404", (name, version)


def test_each_version_counts_its_own_requests(
    stats_server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    """A model serving two versions: one named in the path, the default (the highest)."""

    def counts() -> tuple[int, int, int]:
        """Successes of version 1, of version 2, failures of version 1."""
        v1, v2 = triton_client.get_inference_statistics("affine")["model_stats"]
        return (
            v1["inference_stats"]["success"]["count"],
            v2["inference_stats"]["success"]["count"],
            v1["inference_stats"]["fail"]["count"],
        )

    before = counts()
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with httpx.Client(base_url=stats_server.url, timeout=10) as http:
        for path, times in (
            ("/v2/models/affine/versions/1/infer", 3),
            ("/v2/models/affine/infer", 2),
        ):
            for _ in range(times):
                assert http.post(path, json=body).status_code == 200
        refused = http.post("/v2/models/affine/versions/1/infer", json={"inputs": []})
        assert refused.status_code == 400
    expected = (3, 2, 1)  # the 400 named version 1
    deadline = time.monotonic() + 10
    while (added := tuple(a - b for a, b in zip(counts(), before, strict=True))) != expected:
        assert time.monotonic() < deadline, f"statistics still show {added}, not {expected}"
        time.sleep(0.2)


def test_without_metrics_there_are_no_statistics(model_repo: Path) -> None:
    env = {"PODSERVE_METRICS_ENABLED": "false"}
    with ServerProcess(model_repo, workers=1, env=env) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert "statistics" not in client.get_server_metadata()["extensions"]
        with pytest.raises(InferenceServerException, match="PODSERVE_METRICS_ENABLED") as err:
            client.get_inference_statistics("tabular")
        assert err.value.status() == "400"
        tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
        tensor.set_data_from_numpy(ROWS)
        assert client.infer("tabular", [tensor]).as_numpy("label").shape == (2,)
