"""The prediction-log row of a request carries the X-Request-ID its caller can know: the one
it sent, or, when it sent none, the one podserve answered with (and wrote on its log lines)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

import postgres
from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _stored(url: str, client_id: str, timeout: float = 30) -> int:
    sql = "SELECT count(*) FROM podserve_prediction_log WHERE client_request_id = $1"
    deadline = time.monotonic() + timeout
    while (count := postgres.scalar(url, sql, client_id)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_a_row_carries_the_id_answered_or_sent(
    db_url: str, db_models: Path, tmp_path: Path
) -> None:
    env = postgres.server_env(db_url, tmp_path / "spool")
    with (
        ServerProcess(db_models, workers=1, env=env) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        made = http.post("/v2/models/affine/infer", json=BODY)
        sent = http.post("/v2/models/affine/infer", json=BODY, headers={"x-request-id": "mine-7"})
        # Not a valid id (a space): answered with a new one, stored as sent (the caller's key).
        odd = http.post("/v2/models/affine/infer", json=BODY, headers={"x-request-id": "a b"})
        empty = http.post("/v2/models/affine/infer", json=BODY, headers={"x-request-id": ""})
    assert [r.status_code for r in (made, sent, odd, empty)] == [200] * 4
    answered = made.headers["x-request-id"]
    # Before, a request that sent no id had a row with none: its answer's id found nothing.
    assert _stored(db_url, answered) == 1
    assert sent.headers["x-request-id"] == "mine-7" and _stored(db_url, "mine-7") == 1
    assert odd.headers["x-request-id"] != "a b" and _stored(db_url, "a b") == 1
    # An empty one is no id: the row carries the one answered.
    assert _stored(db_url, empty.headers["x-request-id"]) == 1
