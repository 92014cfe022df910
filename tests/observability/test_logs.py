"""Structured logs of a real server with the default settings: JSON lines, no access log.

With the access log on (PODSERVE_ACCESS_LOG=true), test_tracing checks that each request's
line carries its trace ids and test_secrets that it names the path.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_builders import OPSET, save
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


def test_records_orjson_cannot_encode_are_still_one_json_line() -> None:
    """An undecodable file name (a lone surrogate), a 64-bit-plus int or non-str keys in a
    record's extras made the formatter raise: logging then printed a plain-text traceback,
    and the JSON stream lost the line (a worker's boot error said only "failed to boot")."""
    import logging

    from podserve.logs import JsonFormatter

    record = logging.LogRecord("podserve.test", logging.ERROR, __file__, 1, "bad %s", ("x",), None)
    record.path = "/models/mod\udce9le"
    record.big = 2**70
    record.by_key = {(1, 2): "pair", 3: "three"}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "bad x" and entry["level"] == "error"
    assert entry["path"] == "/models/mod\udce9le" and entry["big"] == 2**70
    assert entry["by_key"] == {"(1, 2)": "pair", "3": "three"}


def test_python_warnings_are_json_lines_too(server: ServerProcess, client: httpx.Client) -> None:
    """numpy's overflow warning on a client's out-of-range FP32 value (answered 400) went to
    stderr as two plain-text lines."""
    body = {
        "inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [1e300] * 30}]
    }
    assert client.post("/v2/models/tabular/infer", json=body).status_code == 400
    text = [line for line in server.logs().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in text), [
        line for line in text if not line.startswith("{")
    ]


def test_onnx_runtimes_own_log_stays_off_stderr(tmp_path: Path) -> None:
    """ORT prints coloured plain text: a warning per unused initializer at load, an error
    per failed run. Both broke the one-JSON-object-per-line stream."""
    graph = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["x"], ["y"])],
        "zeros",
        [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
        [numpy_helper.from_array(np.zeros(3, np.float32), "unused")],
    )
    save(helper.make_model(graph, opset_imports=OPSET), tmp_path, "zeros")
    with ServerProcess(tmp_path, workers=1) as server:
        url = f"{server.url}/v2/models/zeros/infer"
        tensor = {"name": "x", "datatype": "INT64", "shape": [2], "data": [-1, 2]}
        assert httpx.post(url, json={"inputs": [tensor]}, timeout=30).status_code == 500
        logs = server.logs()
    text = [line for line in logs.splitlines() if line.strip()]
    assert any("unhandled error" in line for line in text)  # podserve's own record of it
    assert all(line.startswith("{") for line in text), [
        line for line in text if not line.startswith("{")
    ]


@pytest.mark.parametrize(
    ("trusted", "shown"), [("10.0.0.0/8", "127.0.0.1:"), ("::1,127.0.0.1", "6.6.6.6:")]
)
def test_only_trusted_proxies_name_the_client(affine_repo: Path, trusted: str, shown: str) -> None:
    """With "*" any client's X-Forwarded-For was the address the access log showed."""
    env = {"PODSERVE_ACCESS_LOG": "true", "PODSERVE_FORWARDED_ALLOW_IPS": trusted}
    with ServerProcess(affine_repo, workers=1, env=env) as server:
        response = httpx.get(f"{server.url}/v2", headers={"x-forwarded-for": "6.6.6.6"})
        assert response.status_code == 200
        deadline = time.monotonic() + 10
        while not (access := _access_lines(server.logs())):
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.1)
    assert access[0]["msg"].startswith(shown), access


def _access_lines(logs: str) -> list[dict]:
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    return [line for line in lines if line["logger"] == "uvicorn.access" and "/v2 " in line["msg"]]
