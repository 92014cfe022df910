"""Tracing configuration from the OTEL_* environment (in process, no server)."""

from __future__ import annotations

import logging
import os

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import Link, SpanContext, TraceFlags

from podserve import tracing
from podserve.settings import Settings

ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*ENDPOINTS, "OTEL_SDK_DISABLED", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG",
                 "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "POD_NAME", "POD_NAMESPACE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


def test_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not tracing.tracing_requested(Settings())
    for name in ENDPOINTS:
        monkeypatch.setenv(name, "http://collector:4318")
        assert tracing.tracing_requested(Settings())
        assert not tracing.tracing_requested(Settings(tracing_enabled=False))
        monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
        assert not tracing.tracing_requested(Settings())
        monkeypatch.delenv("OTEL_SDK_DISABLED")
        monkeypatch.delenv(name)


def _context(sampled: bool) -> SpanContext:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return SpanContext(0x1234, 0x5678, is_remote=False, trace_flags=flags)


@pytest.mark.parametrize(
    ("sampler", "arg", "root_decision"),
    [("always_off", "", Decision.DROP), ("parentbased_traceidratio", "0", Decision.DROP),
     ("always_on", "", Decision.RECORD_AND_SAMPLE)],
)  # fmt: skip
def test_a_batch_linked_to_a_sampled_request_is_sampled(
    monkeypatch: pytest.MonkeyPatch, sampler: str, arg: str, root_decision: Decision
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", arg)
    chosen = tracing.sampler_from_env()
    assert chosen.get_description().startswith("LinkedBatchSampler")
    unlinked = chosen.should_sample(None, 0xABC, "batch", links=[])
    assert unlinked.decision == root_decision  # the configured sampler decides
    linked = chosen.should_sample(None, 0xABC, "batch", links=[Link(_context(True))])
    assert linked.decision == Decision.RECORD_AND_SAMPLE
    not_sampled = chosen.should_sample(None, 0xABC, "batch", links=[Link(_context(False))])
    assert not_sampled.decision == root_decision


def test_a_child_follows_its_parent_not_its_links(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    parent = trace.set_span_in_context(trace.NonRecordingSpan(_context(False)))
    result = tracing.sampler_from_env().should_sample(
        parent, 0x1234, "infer", links=[Link(_context(True))]
    )
    assert result.decision == Decision.DROP


def test_a_phase_follows_its_request_even_where_the_pod_traces_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model traced on its own (its trace settings) while the pod's level is OFF: its
    request span was sampled, and its phase spans were dropped by the pod's ALWAYS_OFF."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    sampler = tracing.sampler_from_env()
    for sampled, decision in ((True, Decision.RECORD_AND_SAMPLE), (False, Decision.DROP)):
        request = trace.set_span_in_context(trace.NonRecordingSpan(_context(sampled)))
        assert sampler.should_sample(request, 0x1234, "parse").decision == decision


def test_a_query_outside_requests_and_background_spans_is_not_a_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    sampler = tracing.sampler_from_env()
    client = trace.SpanKind.CLIENT
    assert sampler.should_sample(None, 0x1234, "WITH", kind=client).decision == Decision.DROP
    request = trace.set_span_in_context(trace.NonRecordingSpan(_context(True)))
    inside = sampler.should_sample(request, 0x1234, "SELECT", kind=client)
    assert inside.decision == Decision.RECORD_AND_SAMPLE
    write = sampler.should_sample(None, 0x1234, "prediction_log.write")  # a background_span
    assert write.decision == Decision.RECORD_AND_SAMPLE


def test_resource_from_downward_api_and_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "podserve-7d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "ml")
    resource = tracing.build_resource(Settings(model_repository="/models")).attributes
    assert resource["service.name"] == "podserve"
    assert resource["k8s.pod.name"] == "podserve-7d9f-abcde"
    assert resource["k8s.namespace.name"] == "ml"
    assert resource["podserve.model_repository"] == "/models"
    assert resource["service.version"]
    # The pod and the worker, not the SDK's random UUID, which it sets on every resource.
    assert resource["service.instance.id"] == f"podserve-7d9f-abcde-{os.getpid()}"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "scoring")
    monkeypatch.setenv(
        "OTEL_RESOURCE_ATTRIBUTES",
        "k8s.pod.name=override,deployment.env=prod,service.instance.id=mine",
    )
    resource = tracing.build_resource(Settings()).attributes
    assert resource["service.name"] == "scoring"
    assert resource["k8s.pod.name"] == "override"
    assert resource["deployment.env"] == "prod"
    assert resource["service.instance.id"] == "mine"


def test_exporter_protocols(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert isinstance(tracing.build_exporter(), OTLPSpanExporter)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with caplog.at_level(logging.ERROR):
        assert tracing.build_exporter() is None
    assert "unsupported OTLP protocol" in caplog.text
