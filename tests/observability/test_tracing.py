"""Traces from real Gunicorn with 2 workers, exported over OTLP/HTTP to a receiver of our own."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan

from metrics_support import scrape
from podserve.phases import parse_server_timing
from server_process import ServerProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
INFER_SPAN = "POST /v2/models/{model_name}/infer"
AFFINE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
TEXT = {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a b", "c d e"]}]}
SLOW = orjson.dumps(
    {"inputs": [{"name": "x", "shape": [1, 256], "datatype": "FP32", "data": [0.01] * 256}]}
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def server(model_repo: Path, receiver: OtlpReceiver) -> Iterator[ServerProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "podserve-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export every 100 ms: quick tests
        "POD_NAME": "podserve-abc12",
        "POD_NAMESPACE": "serving",
        "PODSERVE_ACCESS_LOG": "true",
        "PODSERVE_TRACING_ENABLED": "true",
    }
    with ServerProcess(model_repo, workers=2, env=env) as proc:
        yield proc


def _by_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def _has_request(trace_id: str, phases: int) -> Callable[[list[ReceivedSpan]], bool]:
    """Predicate: the server span and `phases` children of that trace arrived."""
    return lambda spans: len(_by_trace(spans, trace_id)) >= phases + 1


def test_every_phase_is_a_child_of_the_propagated_request_span(
    server: ServerProcess, receiver: OtlpReceiver, model_repo: Path
) -> None:
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    response = httpx.post(f"{server.url}/v2/models/text/infer", json=TEXT,
                          headers={"traceparent": traceparent})  # fmt: skip
    assert response.status_code == 200, response.text
    assert response.headers["x-trace-id"] == TRACE_ID
    spans = _by_trace(receiver.wait_for(_has_request(TRACE_ID, 5)), TRACE_ID)

    (request,) = [s for s in spans if s.name == INFER_SPAN]
    assert request.parent_span_id == PARENT_ID  # the caller's span is our parent
    assert response.headers["traceresponse"] == f"00-{TRACE_ID}-{request.span_id}-01"
    stretches = sorted(
        (s for s in spans if s.parent_span_id == request.span_id), key=lambda s: s.start_ns
    )
    names = [s.name for s in stretches]
    assert set(names) == {"parse", "queue", "preprocess", "infer", "postprocess"}
    assert len(spans) == 1 + len(stretches)  # nothing else in the trace (no send/receive noise)
    for earlier, later in itertools.pairwise(stretches):
        assert earlier.end_ns <= later.start_ns + 1000, (earlier.name, later.name)
    # A phase run in several stretches (parse before and after features, postprocess in the
    # inference thread and in the route) is a span per stretch: one from the first start to
    # the last end counted what ran between them, and disagreed with Server-Timing.
    header = parse_server_timing(response.headers["server-timing"])
    for phase, ms in header.items():
        spanned = sum(s.end_ns - s.start_ns for s in stretches if s.name == phase) / 1e6
        assert spanned == pytest.approx(ms, abs=0.01), (phase, spanned, ms)
    order = stretches
    for span in order:
        assert request.start_ns <= span.start_ns <= span.end_ns <= request.end_ns + 1_000_000
        assert span.attributes["podserve.model"] == "text"
        assert span.attributes["podserve.model.version"] == "1"
        assert span.attributes["podserve.rows"] == 2
        assert span.attributes["podserve.batch.size"] >= 2
        assert span.attributes["podserve.batch.requests"] >= 1
        assert span.attributes["podserve.queue.depth"] >= 0
    assert request.attributes["podserve.model"] == "text"
    assert request.attributes["http.route"] == "/v2/models/{model_name}/infer"

    resource = request.resource
    assert resource["service.name"] == "podserve-test"
    assert resource["service.version"]
    assert resource["k8s.pod.name"] == "podserve-abc12"
    assert resource["k8s.namespace.name"] == "serving"
    assert resource["podserve.model_repository"] == str(model_repo)
    assert receiver.content_types == {"application/x-protobuf"}

    # The JSON access log line of this request carries its trace and span ids.
    lines = [json.loads(line) for line in server.logs().splitlines() if TRACE_ID in line]
    assert any(
        line.get("logger") == "uvicorn.access" and line.get("span_id") == request.span_id
        for line in lines
    ), lines


def test_a_batch_span_links_every_request_it_served(
    server: ServerProcess, receiver: OtlpReceiver
) -> None:
    async def burst() -> list[str]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30) as client:
            responses = await asyncio.gather(*(
                client.post("/v2/models/slow/infer", content=SLOW,
                            headers={"content-type": "application/json"})
                for _ in range(48)
            ))  # fmt: skip
        assert all(r.status_code == 200 for r in responses)
        return [r.headers["x-trace-id"] for r in responses]

    trace_ids = set(asyncio.run(burst()))
    assert len(trace_ids) == 48

    def arrived(spans: list[ReceivedSpan]) -> bool:
        # A batch span ends before its requests' server spans do, so the two may reach the
        # receiver in different exports: wait for both sides.
        linked = {link[0] for s in spans if s.name == "batch" for link in s.links}
        served = {s.trace_id for s in spans if s.name == INFER_SPAN}
        return trace_ids <= linked and trace_ids <= served

    spans = receiver.wait_for(arrived)
    requests = {s.span_id: s for s in spans if s.name == INFER_SPAN and s.trace_id in trace_ids}
    assert len(requests) == 48
    batches = [s for s in spans if s.name == "batch" and s.attributes["podserve.model"] == "slow"]
    served: list[str] = []
    for batch in batches:
        assert batch.parent_span_id == ""  # a root of its own ...
        assert batch.trace_id not in trace_ids
        assert len(batch.links) == batch.attributes["podserve.batch.requests"]  # ... linked
        assert (
            sum(link[2]["podserve.rows"] for link in batch.links)
            == (batch.attributes["podserve.batch.size"])
        )
        for trace_id, span_id, _ in batch.links:
            if trace_id in trace_ids:
                assert requests[span_id].trace_id == trace_id
                served.append(span_id)
    assert sorted(served) == sorted(requests)  # each request in exactly one batch
    assert max(len(b.links) for b in batches) >= 2, "no batch served several requests"

    for request in requests.values():  # each request's own infer span stays its child
        (infer,) = [s for s in spans if s.name == "infer" and s.parent_span_id == request.span_id]
        (batch,) = [b for b in batches if (request.trace_id, request.span_id)
                    in {(t, s) for t, s, _ in b.links}]  # fmt: skip
        assert infer.trace_id == request.trace_id
        assert infer.attributes["podserve.batch.requests"] == len(batch.links)


def test_spans_arrive_from_both_workers(server: ServerProcess, receiver: OtlpReceiver) -> None:
    answered: dict[str, str] = {}  # trace id -> worker pid
    for _ in range(30):  # a fresh connection each: the kernel spreads them
        response = httpx.post(f"{server.url}/v2/models/affine/infer", json=AFFINE)
        answered[response.headers["x-trace-id"]] = response.headers["x-podserve-worker"]
    assert len(set(answered.values())) == 2

    def arrived(spans: list[ReceivedSpan]) -> bool:
        return set(answered) <= {s.trace_id for s in spans if s.name == INFER_SPAN}

    spans = receiver.wait_for(arrived)
    for span in spans:
        if span.name == INFER_SPAN and span.trace_id in answered:
            assert str(span.resource["process.pid"]) == answered[span.trace_id]
    assert {str(s.resource["process.pid"]) for s in spans} >= set(answered.values())


def test_exemplars_point_at_the_trace(server: ServerProcess) -> None:
    response = httpx.post(f"{server.url}/v1/models/tabular:predict",
                          json={"instances": [[0.5] * 30]})  # fmt: skip
    assert response.status_code == 200, response.text
    trace_id, worker = response.headers["x-trace-id"], response.headers["x-podserve-worker"]
    for _ in range(60):  # exemplars come from the worker that answers the scrape
        result = scrape(server.url, openmetrics=True)
        if result.worker == worker:
            break
    else:
        raise AssertionError("the worker that served the request never answered a scrape")
    exemplars = {
        s.name: s.exemplar.labels["trace_id"]
        for s in result.samples
        if s.exemplar is not None
        and s.labels.get("model") == "tabular"
        and s.labels.get("route", "/v1/models/{model_name}:predict").endswith(":predict")
    }
    assert exemplars.get("podserve_request_duration_seconds_bucket") == trace_id
    assert exemplars.get("podserve_phase_duration_seconds_bucket") == trace_id


class BlackHoleCollector:
    """Accepts connections and never answers: a collector that hangs."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.held: list[socket.socket] = []
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._hold, daemon=True).start()

    def _hold(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.held.append(self.listener.accept()[0])

    def close(self) -> None:
        for conn in [*self.held, self.listener]:
            conn.close()


def test_a_hung_collector_does_not_hold_the_worker_past_its_graceful_timeout(
    model_repo: Path,
) -> None:
    """Before: the flush at shutdown waited for the exporter's 10 s timeout; under a graceful
    timeout of 4 s Gunicorn killed the worker in its lifespan shutdown, unlogged."""
    collector = BlackHoleCollector()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # the spans wait in the buffer for the shutdown
        "PODSERVE_TRACING_ENABLED": "true",
        "PODSERVE_GRACEFUL_TIMEOUT_S": "4",
    }
    try:
        with ServerProcess(model_repo, workers=1, env=env) as server:
            for _ in range(3):
                response = httpx.post(f"{server.url}/v2/models/text/infer", json=TEXT, timeout=10)
                assert response.status_code == 200, response.text
            assert server.stop() == 0
            logs = server.logs()
    finally:
        collector.close()
    assert "Application shutdown complete" in logs, logs[-3000:]
    assert "spans not exported at shutdown" in logs, logs[-3000:]
