"""Triton's trace extension: the pod's OpenTelemetry sampling, changed at run time."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import NonRecordingSpan
from otlp_receiver import OtlpReceiver
from tritonclient.utils import InferenceServerException

from podserve import trace_control
from podserve.errors import BadRequest
from podserve.trace_control import TraceSettings
from podserve.tracing import LinkedBatchSampler, tensor_attributes
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
        ({"trace_level": ["TIMESTAMPS", "TENSORS"]}, TraceSettings(True, 1, tensors=True)),
        ({"trace_level": ["TENSORS"]}, TraceSettings(True, 1, tensors=True)),
        ({"trace_count": "100"}, EVERY),  # the count is the pod's live state (TraceBudget)
        ({"trace_count": 0}, EVERY),
        ({}, EVERY),
    ],
)
def test_settings_update(request_body: dict, expected: TraceSettings) -> None:
    assert EVERY.updated(request_body) == expected


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"trace_level": ["EVERYTHING"]}, "not supported"),
        ({"trace_level": ["OFF", "TENSORS"]}, "asks for OFF and for tracing at once"),
        ({"trace_level": ["OFF", "TIMESTAMPS"]}, "asks for OFF and for tracing at once"),
        ({"trace_level": []}, "must be a list"),
        ({"trace_level": 1}, "must be a list"),
        ({"trace_rate": "0"}, "positive integer"),
        ({"trace_rate": "-5"}, "positive integer"),
        ({"trace_rate": "one"}, "positive integer"),
        ({"trace_rate": True}, "positive integer"),
        ({"trace_rate": "99999999999"}, "positive integer"),
        ({"trace_rate": "²"}, "positive integer"),  # isdigit(), but int() refused it: a 500
        ({"trace_rate": "٣"}, "positive integer"),  # int() reads it as 3: not Triton's form
        ({"trace_count": "²"}, "trace_count must be the number of traces"),
        ({"trace_count": "-2"}, "trace_count must be the number of traces"),
        ({"trace_count": "ten"}, "trace_count must be the number of traces"),
        ({"trace_count": False}, "trace_count must be the number of traces"),
        ({"trace_count": "4294967296"}, "trace_count must be the number of traces"),
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


def test_tensors_stay_until_the_level_changes() -> None:
    with_tensors = EVERY.updated({"trace_level": ["TIMESTAMPS", "TENSORS"]})
    assert with_tensors.updated({"trace_rate": "10"}).tensors  # a rate change keeps them
    assert not with_tensors.updated({"trace_level": ["TIMESTAMPS"]}).tensors
    off = with_tensors.updated({"trace_level": ["OFF"]})
    assert off.levels == ["OFF"] and not off.tensors
    assert with_tensors.as_triton()["trace_level"] == ["TIMESTAMPS", "TENSORS"]


def test_tensor_attributes_are_bounded_and_typed() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert tensor_attributes("x", rows, 5) == {
        "podserve.tensor.name": "x",
        "podserve.tensor.datatype": "FP32",
        "podserve.tensor.shape": [3, 4],
        "podserve.tensor.data": [0.0, 1.0, 2.0, 3.0, 4.0],
        "podserve.tensor.truncated": True,
    }
    text = np.array([b"caf\xc3\xa9", b"\xff"], dtype=object)
    attributes = tensor_attributes("text", text, 64)
    assert attributes["podserve.tensor.data"] == ["caf\u00e9", "\ufffd"]
    assert attributes["podserve.tensor.datatype"] == "BYTES"
    assert not attributes["podserve.tensor.truncated"]
    big = tensor_attributes("ids", np.array([2**64 - 1], dtype=np.uint64), 64)
    assert big["podserve.tensor.data"] == [str(2**64 - 1)]  # beyond OTLP's int64
    flags = tensor_attributes("mask", np.array([[True, False]]), 64)
    assert flags["podserve.tensor.data"] == [True, False]


def test_samplers() -> None:
    assert TraceSettings(False, 7).sampler() is ALWAYS_OFF
    description = TraceSettings(True, 4).sampler().get_description()
    assert description.startswith("ParentBased") and "0.25" in description


def test_the_trace_budget_is_spent_once_and_shared_with_forked_workers() -> None:
    budget = trace_control.TraceBudget()
    assert budget.remaining() == -1 and all(budget.take() for _ in range(5))  # no limit
    budget.set(3)
    pid = os.fork()
    if pid == 0:  # a worker: takes two of the pod's three
        os._exit(0 if budget.take() and budget.take() else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert budget.remaining() == 1
    assert [budget.take() for _ in range(3)] == [True, False, False]
    assert budget.remaining() == 0
    budget.set(-1)
    assert budget.take()


INFER = "POST /v2/models/{model_name}/infer"


def _sampled(
    sampler: LinkedBatchSampler, parent: trace.SpanContext | None = None, name: str = INFER
) -> bool:
    context = trace.set_span_in_context(NonRecordingSpan(parent)) if parent else None
    return sampler.should_sample(context, secrets.randbits(128), name).decision.is_sampled()


def test_only_traces_started_here_draw_on_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    budget = trace_control.TraceBudget()
    monkeypatch.setattr(trace_control, "_budget", budget)
    sampler = LinkedBatchSampler(TraceSettings(on=True, rate=1).sampler())
    budget.set(2)
    callers = trace.SpanContext(
        secrets.randbits(128), secrets.randbits(64), True, trace.TraceFlags(1)
    )
    metadata = "GET /v2/models/{model_name}"
    assert _sampled(sampler, name=metadata) and budget.remaining() == 2  # traced, not counted
    assert _sampled(sampler, name="POST /v1/models/{model_name}:predict")
    assert _sampled(sampler) and budget.remaining() == 0
    assert not _sampled(sampler) and not _sampled(sampler, name=metadata)  # spent: quiet
    assert _sampled(sampler, callers)  # a caller's sampled trace goes on, and costs nothing
    linked = sampler.should_sample(None, 1, "batch", links=[trace.Link(callers)])
    assert linked.decision.is_sampled() and budget.remaining() == 0
    budget.set(1)
    assert [_sampled(sampler) for _ in range(2)] == [True, False]


def test_without_tracing_the_count_cannot_change_either(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trace_control, "_budget", trace_control.TraceBudget())
    trace_control.detach()
    assert trace_control.change({"trace_count": "-1"}) == TraceSettings(False, 1)  # as it is
    with pytest.raises(BadRequest, match="tracing is not set up"):
        trace_control.change({"trace_count": "5"})
    assert trace_control.budget().remaining() == -1


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


def _wait_for_pod(server: ServerProcess, expected: dict, path: str = "/v2/trace/setting") -> None:
    """Every worker (fresh connections reach both) reports `expected` within a few seconds."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.get(path)
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


def _embed(server: ServerProcess, sentence: str) -> str:
    """One sentence through the text pipeline (tokenizer, model, pooling); its trace id."""
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [sentence]}]}
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = http.post("/v2/models/text/infer", json=body)
    assert response.status_code == 200, response.text
    return response.headers["x-trace-id"]


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


def test_changes_on_two_workers_at_once_both_hold(traced: ServerProcess) -> None:
    """Each worker changes the pod's current settings, not its own copy of them, which may
    not have followed the other's change yet (it follows every half second)."""
    first, second = traced.client_per_worker()
    try:
        assert first.post("/v2/trace/setting", json={"trace_rate": "7"}).status_code == 200
        response = second.post("/v2/trace/setting", json={"trace_level": ["TENSORS"]})
        assert response.status_code == 200, response.text
    finally:
        first.close()
        second.close()
    _wait_for_pod(traced, {**_triton("TIMESTAMPS", 7), "trace_level": ["TIMESTAMPS", "TENSORS"]})
    _post(traced, {"trace_level": None, "trace_rate": None})  # back to the start-up settings
    _wait_for_pod(traced, _triton("TIMESTAMPS", 2))


def test_a_models_own_settings_reach_every_worker(
    traced: ServerProcess, receiver: OtlpReceiver
) -> None:
    """The pod traces almost nothing; one model its next 3 requests (its own count), another
    model stays quiet, and nulls give the model the pod's settings back."""
    client = triton.InferenceServerClient(f"127.0.0.1:{traced.port}")
    quiet = _triton("TIMESTAMPS", 10**9)
    own = {**_triton("TIMESTAMPS", 1), "trace_count": "3"}
    try:
        _post(traced, {"trace_level": ["TIMESTAMPS"], "trace_rate": str(10**9)})
        assert (
            client.update_trace_settings("tabular", {"trace_rate": "1", "trace_count": "3"}) == own
        )
        _wait_for_pod(traced, quiet)
        _wait_for_pod(traced, own, "/v2/models/tabular/trace/setting")
        assert client.get_trace_settings("affine") == quiet

        others = [_predict_affine(traced) for _ in range(6)]
        roots = _infer(traced, 8, sampled_parent=False)  # tabular, fresh connections
        assert len(_traced(receiver, roots)) == 3
        assert _traced(receiver, others) == set()
        _wait_for_pod(traced, {**own, "trace_count": "0"}, "/v2/models/tabular/trace/setting")
        assert client.get_trace_settings()["trace_count"] == "-1"  # the pod's own: untouched

        cleared = {"trace_rate": None, "trace_count": None}
        assert client.update_trace_settings("tabular", cleared) == quiet
        _wait_for_pod(traced, quiet, "/v2/models/tabular/trace/setting")
    finally:
        _post(traced, {"trace_rate": "1"})
        client.update_trace_settings("tabular", {"trace_rate": None, "trace_count": None})
    _wait_for_pod(traced, _triton("TIMESTAMPS", 1), "/v2/models/tabular/trace/setting")
    with httpx.Client(base_url=traced.url, timeout=10) as http:
        assert http.get("/v2/models/nope/trace/setting").status_code == 404
        assert http.post("/v2/models/nope/trace/setting", json={}).status_code == 404
        before = http.get("/v2/models/tabular/trace/setting").json()
        for body in (b"{nope", b'{"trace_level": ["ALL"]}', b'{"trace_rate": "0"}', b"[]"):
            for path in ("/v2/trace/setting", "/v2/models/tabular/trace/setting"):
                response = http.post(path, content=body)
                assert response.status_code == 400, response.text
                assert response.json()["error"]
        assert http.get("/v2/models/tabular/trace/setting").json() == before


def _predict_affine(server: ServerProcess) -> str:
    """A V1 predict of the affine model on a fresh connection; its trace id."""
    with httpx.Client(base_url=server.url, timeout=10) as http:
        response = http.post("/v1/models/affine:predict", json={"instances": [[1, 2, 3, 4]]})
    assert response.status_code == 200, response.text
    return response.headers["x-trace-id"]


def test_without_tracing_set_up_it_cannot_be_turned_on(model_repo: Path) -> None:
    with ServerProcess(model_repo, workers=1, env={"PODSERVE_TRACING_ENABLED": "false"}) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.get_trace_settings() == _triton("OFF", 1)
        with pytest.raises(InferenceServerException, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
            client.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]})
        assert client.update_trace_settings(settings={"trace_level": ["OFF"]}) == _triton("OFF", 1)


def test_a_trace_count_starts_that_many_traces_in_the_pod(
    traced: ServerProcess, receiver: OtlpReceiver
) -> None:
    """Five traces between two workers, then none started; a caller's trace still goes on."""
    try:
        _post(traced, {"trace_level": ["TIMESTAMPS"], "trace_rate": "1", "trace_count": "5"})
        _wait_for_pod(traced, {**_triton("TIMESTAMPS", 1), "trace_count": "5"})
        roots = _infer(traced, 16, sampled_parent=False)
        assert len(_traced(receiver, roots)) == 5
        continued = _infer(traced, 3, sampled_parent=True)
        assert _traced(receiver, continued) == set(continued)
        _wait_for_pod(traced, {**_triton("TIMESTAMPS", 1), "trace_count": "0"})
        assert "trace_count is spent" in traced.logs()
    finally:
        _post(traced, {"trace_count": "-1"})
    roots = _infer(traced, 4, sampled_parent=False)
    assert _traced(receiver, roots) == set(roots)  # no limit again


def test_trace_level_tensors_records_each_requests_tensors(
    traced: ServerProcess, receiver: OtlpReceiver
) -> None:
    try:
        _post(traced, {"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "1"})
        expected = {**_triton("TIMESTAMPS", 1), "trace_level": ["TIMESTAMPS", "TENSORS"]}
        _wait_for_pod(traced, expected)
        roots = _infer(traced, 4, sampled_parent=False)  # fresh connections: both workers
        time.sleep(1.0)
        infer_spans = [s for s in receiver.snapshot() if s.trace_id in roots and s.name == "infer"]
        assert {s.trace_id for s in infer_spans} == set(roots)
        for span in infer_spans:
            events = dict(span.events)
            assert set(events) == {"input", "output"}, span.events  # no pre-processor
            tensor = events["input"]
            assert tensor["podserve.tensor.name"] == "input"
            assert tensor["podserve.tensor.shape"] == [1, 30]
            assert tensor["podserve.tensor.data"] == pytest.approx(ROW["inputs"][0]["data"])
            assert events["output"]["podserve.tensor.data"]  # the model's answer

        # A pipeline model: also what its tokenizer made of the text, as the session saw it.
        text = _embed(traced, "tokens are traced")
        time.sleep(1.0)
        (span,) = [s for s in receiver.snapshot() if s.trace_id == text and s.name == "infer"]
        by_name = {(kind, e["podserve.tensor.name"]): e for kind, e in span.events}
        assert by_name[("input", "text")]["podserve.tensor.data"] == ["tokens are traced"]
        ids = by_name[("model_input", "input_ids")]
        assert ids["podserve.tensor.datatype"] == "INT64" and ids["podserve.tensor.shape"][0] == 1
        mask = by_name[("model_input", "attention_mask")]["podserve.tensor.data"]
        assert sum(mask) == len(ids["podserve.tensor.data"]) >= 4  # [CLS] 3 tokens [SEP]
        assert ("output", "embedding") in by_name
    finally:
        _post(traced, {"trace_level": ["TIMESTAMPS"]})
    _wait_for_pod(traced, _triton("TIMESTAMPS", 1))
    roots = _infer(traced, 2, sampled_parent=False)
    time.sleep(1.0)
    later = [s for s in receiver.snapshot() if s.trace_id in roots and s.name == "infer"]
    assert later and all(not s.events for s in later)  # TIMESTAMPS alone: no tensors
