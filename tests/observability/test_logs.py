"""Structured logs of a real server with the default settings: JSON lines, no access log.

With the access log on (PODSERVE_ACCESS_LOG=true), test_tracing checks that each request's
line carries its trace ids and test_secrets that it names the path.
"""

from __future__ import annotations

import json

import httpx

from server_process import ServerProcess

TABULAR = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}


def test_the_access_log_is_off_by_default_and_other_logs_stay_on(
    server: ServerProcess, client: httpx.Client
) -> None:
    for _ in range(20):
        assert client.post("/v2/models/tabular/infer", json=TABULAR).status_code == 200
    assert client.post("/v2/models/missing/infer", json=TABULAR).status_code == 404
    # uvicorn logs a response whenever its access logger has a handler on the way to the
    # root: these requests must not have written a line.
    lines = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    loggers = {line["logger"] for line in lines}
    assert "uvicorn.access" not in loggers, [line for line in lines if "access" in line["logger"]]
    assert not [line for line in lines if "/v2/models/tabular/infer" in line.get("msg", "")]
    # The same server still logs the rest, as JSON with level and pid.
    assert {"gunicorn.error", "uvicorn.error", "podserve.runtime"} <= loggers
    assert all({"ts", "level", "logger", "msg", "pid"} <= set(line) for line in lines)
