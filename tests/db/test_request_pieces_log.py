"""A request run in pieces (more rows than its model's max_batch_size) still gets one
prediction-log row, with the whole request's inputs and outputs."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import orjson

import postgres
from metrics_support import scrape
from server_process import ServerProcess


def test_one_log_row_with_every_row_of_a_request_run_in_pieces(
    db_url: str, db_models: Path, tmp_path: Path
) -> None:
    rows = 40  # affine's max_batch_size is 16: pieces of 16, 16 and 8 rows
    x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
    body = {
        "inputs": [
            {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": x.ravel().tolist()}
        ]
    }
    env = postgres.server_env(
        db_url,
        tmp_path,
        PODSERVE_PREDICTION_LOG_INPUTS="full",
        PODSERVE_PREDICTION_LOG_FLUSH_MS="50",
    )
    with ServerProcess(db_models, workers=1, env=env) as server:
        response = httpx.post(
            f"{server.url}/v2/models/affine/versions/1/infer",
            json=body,
            headers={"x-request-id": "pieces-1"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        runs = {
            sample.labels["batch_size"]: sample.value
            for sample in scrape(server.url).find("podserve_batch_runs_total", model="affine")
        }
        assert runs == {"16": 2, "8": 1}, runs
        deadline = time.monotonic() + 30
        query = "SELECT * FROM podserve_prediction_log WHERE client_request_id = 'pieces-1'"
        while not (logged := postgres.query(db_url, query)) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert len(logged) == 1, logged
    row = logged[0]
    inputs = orjson.loads(row["inputs"])["x"]
    assert inputs["shape"] == [rows, 4] and inputs["data"] == x.ravel().tolist()
    outputs = orjson.loads(row["outputs"])["y"]
    assert outputs["shape"] == [rows, 4] and outputs["data"] == (x * 2 + 1).ravel().tolist()
    assert response.json()["outputs"][0]["data"] == outputs["data"]
    assert {"queue", "infer"} <= set(orjson.loads(row["timings_ms"]))
