"""Triton's trace extension: the pod's OpenTelemetry sampling, changed at run time."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from otlp_receiver import OtlpReceiver
from tritonclient.utils import InferenceServerException

from podserve import trace_control
from podserve.errors import BadRequest
from podserve.trace_control import TraceSettings
from server_process import ServerProcess

ROW = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.1] * 30}]}
FIXED = {"trace_count": "-1", "log_frequency": "0", "trace_file": "", "trace_mode": "opentelemetry"}
EVERY = TraceSettings(on=True, rate=1)


def _triton(level: str, rate: int) -> dict:
    return {"trace_level": [level], "trace_rate": str(rate), **FIXED}


@pytest.mark.parametrize(
    ("request_body", "expected"),
    [
        ({"trace_level": ["OFF"]}, TraceSettings(False, 1)),
        ({"trace_level": "OFF"}, TraceSettings(False, 1)),
        ({"trace_rate": "1000"}, TraceSettings(True, 1000)),
        ({"trace_rate": 10, "trace_level": ["TIMESTAMPS"]}, TraceSettings(True, 10)),
        ({"trace_count": "-1", "trace_mode": "opentelemetry", "trace_file": ""}, EVERY),
        ({}, EVERY),
    ],
)
def test_settings_update(request_body: dict, expected: TraceSettings) -> None:
    assert EVERY.updated(request_body) == expected


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"trace_level": ["TENSORS"]}, "not supported"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "asks for OFF and for tracing at once"),
        ({"trace_level": []}, "must be a list"),
        ({"trace_level": 1}, "must be a list"),
        ({"trace_rate": "0"}, "positive integer"),
        ({"trace_rate": "-5"}, "positive integer"),
        ({"trace_rate": "one"}, "positive integer"),
        ({"trace_rate": True}, "positive integer"),
        ({"trace_rate": "99999999999"}, "positive integer"),
        ({"trace_count": "10"}, "trace_count must be '-1'"),
        ({"trace_mode": "triton"}, "trace_mode must be 'opentelemetry'"),
        ({"trace_file": "/tmp/trace.json"}, "trace_file must be ''"),
        ({"log_frequency": "5"}, "log_frequency must be '0'"),
        ({"trace_sampler": "always_on"}, "unknown trace settings"),
        ("OFF", "must be a JSON object"),
    ],
)
def test_bad_settings_are_refused(request_body: object, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("[", r"\[")):
        EVERY.updated(request_body)


@pytest.mark.parametrize(
    ("sampler", "arg", "expected"),
    [
        (None, None, TraceSettings(True, 1)),
        ("always_off", None, TraceSettings(False, 1)),
        ("parentbased_always_off", None, TraceSettings(False, 1)),
        ("parentbased_traceidratio", "0.001", TraceSettings(True, 1000)),
        ("traceidratio", "0.3", TraceSettings(True, 3)),
        ("traceidratio", "0", TraceSettings(False, 1)),
    ],
)
def test_start_up_settings_come_from_the_sampler_variables(
    monkeypatch: pytest.MonkeyPatch, sampler: str | None, arg: str | None, expected: TraceSettings
) -> None:
    for name, value in (("OTEL_TRACES_SAMPLER", sampler), ("OTEL_TRACES_SAMPLER_ARG", arg)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert trace_control.from_env() == expected


def test_samplers() -> None:
    assert TraceSettings(False, 7).sampler() is ALWAYS_OFF
    description = TraceSettings(True, 4).sampler().get_description()
    assert description.startswith("ParentBased") and "0.25" in description


# --- real 2-worker servers --------------------------------------------------------------
@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def traced(model_repo: Path, receiver: OtlpReceiver) -> Iterator[ServerProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 100 ms
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
        "PODSERVE_TRACING_ENABLED": "true",
    }
    with ServerProcess(model_repo, workers=2, env=env) as proc:
        yield proc


def _post(server: ServerProcess, settings: dict) -> dict:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    return client.update_trace_settings(settings=settings)


def _wait_for_pod(server: ServerProcess, expected: dict) -> None:
    """Every worker (fresh connections reach both) reports `expected` within a few seconds."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.get("/v2/trace/setting")
        seen[response.headers["x-podserve-worker"]] = response.json()
        if len(seen) == server.workers and all(s == expected for s in seen.values()):
            return
        time.sleep(0.05)
    raise AssertionError(f"workers did not all report {expected}: {seen}")


def _infer(server: ServerProcess, count: int, sampled_parent: bool) -> list[str]:
    """`count` requests on fresh connections (both workers); the trace ids they were sent in."""
    trace_ids = []
    for _ in range(count):
        trace_id = secrets.token_hex(16)
        headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.post(
                "/v2/models/tabular/infer", json=ROW, headers=headers if sampled_parent else {}
            )
        assert response.status_code == 200, response.text
        trace_ids.append(response.headers["x-trace-id"] if not sampled_parent else trace_id)
    return trace_ids


def _traced(receiver: OtlpReceiver, trace_ids: list[str], settle_s: float = 1.0) -> set[str]:
    time.sleep(settle_s)  # the exporters send every 100 ms
    wanted = set(trace_ids)
    return {span.trace_id for span in receiver.snapshot() if span.trace_id in wanted}


def test_level_and_rate_change_for_every_worker(
    traced: ServerProcess, receiver: OtlpReceiver
) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{traced.port}")
    assert "trace" in client.get_server_metadata()["extensions"]
    assert client.get_trace_settings() == _triton("TIMESTAMPS", 2)  # from the 0.5 ratio

    assert _post(traced, {"trace_level": ["OFF"]}) == _triton("OFF", 2)
    _wait_for_pod(traced, _triton("OFF", 2))
    assert _traced(receiver, _infer(traced, 6, sampled_parent=True)) == set()  # not even these

    assert _post(traced, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}) == _triton(
        "TIMESTAMPS", 1
    )
    _wait_for_pod(traced, _triton("TIMESTAMPS", 1))
    roots = _infer(traced, 6, sampled_parent=False)
    assert _traced(receiver, roots) == set(roots)  # one in one

    # One in a billion: no request of ours starts a trace, but a caller's sampled one goes on.
    assert _post(traced, {"trace_rate": 10**9})["trace_rate"] == str(10**9)
    _wait_for_pod(traced, _triton("TIMESTAMPS", 10**9))
    roots = _infer(traced, 20, sampled_parent=False)
    continued = _infer(traced, 4, sampled_parent=True)
    assert _traced(receiver, roots + continued) == set(continued)


def test_model_settings_are_the_pods(traced: ServerProcess) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{traced.port}")
    assert client.get_trace_settings("tabular") == client.get_trace_settings()
    with pytest.raises(InferenceServerException, match="POST /v2/trace/setting instead"):
        client.update_trace_settings("tabular", {"trace_rate": "1"})
    with httpx.Client(base_url=traced.url, timeout=10) as http:
        assert http.get("/v2/models/nope/trace/setting").status_code == 404
        before = http.get("/v2/trace/setting").json()
        for body in (b"{nope", b'{"trace_level": ["TENSORS"]}', b'{"trace_rate": "0"}'):
            response = http.post("/v2/trace/setting", content=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]
        assert http.get("/v2/trace/setting").json() == before


def test_without_tracing_set_up_it_cannot_be_turned_on(model_repo: Path) -> None:
    with ServerProcess(model_repo, workers=1, env={"PODSERVE_TRACING_ENABLED": "false"}) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.get_trace_settings() == _triton("OFF", 1)
        with pytest.raises(InferenceServerException, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
        assert client.update_trace_settings(settings={"trace_level": ["OFF"]}) == _triton("OFF", 1)
