"""No API key, token or database password in logs, traces, error messages or metrics.

A server runs with an API key, a database URL with a password, debug logging, the access log
and tracing to a local OTLP receiver. It serves good and bad credentials, feature lookups,
and a database outage (the prediction log and feature lookups log their errors). Everything
a run leaves behind is then searched for the secrets: the process output, every response
(status line, headers, body), the metrics scrape and every span (names, attributes, events,
resource), plus the `podserve db` command's output on a connection failure.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import postgres
from observability.otlp_receiver import OtlpReceiver
from server_process import ServerProcess
from tcp_proxy import TcpProxy
from traffic import Report

API_KEY = f"sk-live-{uuid.uuid4().hex}"
WRONG_KEY = f"sk-live-{uuid.uuid4().hex}"
DB_PASSWORD = f"pw-{uuid.uuid4().hex}"
RAW = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
BY_ID = {"parameters": {"entity_ids": ["e1"]}}


def _with_password(url: str, port: int) -> str:
    """postgresql://postgres:<password>@127.0.0.1:<port>/<db> (trust auth ignores it)."""
    proxied = postgres.with_port(url, port)
    return proxied.replace("postgres@", f"postgres:{DB_PASSWORD}@", 1)


@pytest.fixture()
def traced_server(
    model_repo: Path, rel_db: str, tmp_path: Path
) -> Iterator[tuple[ServerProcess, TcpProxy, OtlpReceiver]]:
    with OtlpReceiver() as receiver, TcpProxy(*postgres.host_port(rel_db)) as proxy:
        env = postgres.server_env(
            _with_password(rel_db, proxy.port),
            tmp_path / "spool",
            PODSERVE_API_KEYS=API_KEY,
            PODSERVE_LOG_LEVEL="debug",
            PODSERVE_ACCESS_LOG="true",
            PODSERVE_DB_BREAKER_RESET_S="0.5",
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        server = ServerProcess(model_repo, workers=2, env=env)
        try:
            yield server.start(), proxy, receiver
        finally:
            server.stop()


def _exercise(server: ServerProcess, proxy: TcpProxy) -> list[httpx.Response]:
    good = {"authorization": f"Bearer {API_KEY}"}
    responses = []
    with httpx.Client(base_url=server.url, timeout=10) as client:

        def call(method: str, path: str, **kwargs: object) -> None:
            responses.append(client.request(method, path, **kwargs))

        for _ in range(5):
            call("POST", "/v2/models/tabular/infer", json=RAW, headers=good)
            call("POST", "/v2/models/tabular/infer", json=RAW, headers={"x-api-key": API_KEY})
            call(
                "POST",
                "/v2/models/tabular/infer",
                json=RAW,
                headers={"authorization": f"Bearer {WRONG_KEY}"},
            )
            call("POST", "/v2/models/tabular/infer", json=RAW, headers={"x-api-key": WRONG_KEY})
            call("POST", "/v2/models/tabular/infer", json=BY_ID, headers=good)  # 404: no rows
            call("GET", "/v2/models/tabular", headers={"authorization": f"Bearer {WRONG_KEY}"})
        proxy.cut()  # database outage: feature lookups and the prediction log fail and log it
        for _ in range(5):
            call("POST", "/v2/models/tabular/infer", json=BY_ID, headers=good)
            call("POST", "/v2/models/tabular/infer", json=RAW, headers=good)
        time.sleep(1.0)  # prediction-log writer retries and logs its failures
        proxy.restore()
        call("GET", "/metrics")
        call("GET", "/openapi.json", headers=good)
    return responses


def _dump(response: httpx.Response) -> str:
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    return f"{response.status_code}\n{headers}\n{response.text}"


def _span_text(receiver: OtlpReceiver) -> str:
    return "\n".join(f"{s.name} {s.attributes} {s.resource} {s.links}" for s in receiver.snapshot())


def test_no_secret_in_logs_traces_errors_or_metrics(
    traced_server: tuple[ServerProcess, TcpProxy, OtlpReceiver], rel_db: str, report: Report
) -> None:
    server, proxy, receiver = traced_server
    responses = _exercise(server, proxy)
    receiver.wait_for(lambda spans: len(spans) >= 40)
    server.stop()  # flushes logs, spans and the prediction log
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "podserve.cli",
            "db",
            "status",
            "--database-url",
            _with_password(rel_db, 9),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    captured = {
        "server output": server.logs(),
        "responses": "\n".join(_dump(r) for r in responses),
        "metrics": responses[-2].text,
        "spans": _span_text(receiver),
        "cli": cli.stdout + cli.stderr,
    }
    statuses = sorted({r.status_code for r in responses})
    report(
        "secrets",
        bytes_searched={k: len(v) for k, v in captured.items()},
        spans=len(receiver.snapshot()),
        statuses=statuses,
    )
    # The search covered real output: the run did log, trace, reject and fail.
    assert "API-key authentication on" in captured["server output"]
    assert "/v2/models/tabular/infer" in captured["server output"]  # access log
    assert "database unavailable" in captured["responses"]
    assert "podserve_requests" in captured["metrics"] or "podserve_" in captured["metrics"]
    assert {200, 401, 503} <= set(statuses), statuses
    assert cli.returncode != 0 and cli.stderr
    for where, text in captured.items():
        for name, secret in (
            ("API key", API_KEY),
            ("wrong key", WRONG_KEY),
            ("database password", DB_PASSWORD),
        ):
            assert secret not in text, f"{name} found in {where}"
