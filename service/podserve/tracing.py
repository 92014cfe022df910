"""OpenTelemetry tracing: a server span per request, one child span per phase, batch spans.

Configured by the standard ``OTEL_*`` environment variables. Tracing is on only when
``PODSERVE_TRACING_ENABLED`` is true (the default), an OTLP endpoint is set
(``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) and
``OTEL_SDK_DISABLED`` is not true; otherwise nothing is instrumented and it costs nothing.

Phase spans are created after the response, from the timestamps in ``PhaseTimings``: the hot
path only reads the clock. A batch serves many requests, so its span is a root span of its own
with a link to every request span it served. At Triton's trace level TENSORS (trace_control)
a traced request's `infer` span also carries its tensors as events (its inputs as sent, what
a pre-processor made of them for the session, its outputs), their first
PODSERVE_TRACE_TENSOR_VALUES values each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, Span, SpanContext, Status, StatusCode
from opentelemetry.util.types import Attributes

from podserve import __version__, model_trace_settings, trace_control
from podserve.datatypes import numpy_to_v2
from podserve.phases import PHASES
from podserve.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from podserve.batcher import BatchRecord
    from podserve.inference_flow import RequestContext

log = logging.getLogger(__name__)

TRACE_ID_HEADER = b"x-trace-id"
# How long a stopping worker waits for its last spans to reach the collector.
FLUSH_BOUND_S = 1.0
# Health probes and scrapes would drown the interesting traces.
DEFAULT_EXCLUDED_URLS = "/metrics,/v2/health/live,/v2/health/ready"
_ROOT = otel_context.Context()  # an empty context: batch spans start a trace of their own

_active = False  # tracing configured in this process (a cheap check on the hot path)
_tracer: trace.Tracer | None = None  # this worker's, for background_span


def tracing_requested(settings: Settings) -> bool:
    if not settings.tracing_enabled:
        return False
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


# --- for other modules ----------------------------------------------------------------------
def current_trace_id() -> str | None:
    """Trace id (32 hex digits) of the current request, or None without an active trace.

    Call it inside the request (e.g. when building the prediction-log row), not in a
    background task, which has no span of its own.
    """
    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else None


def tracing_active() -> bool:
    """Whether this process exports spans (phase timings then keep wall-clock times)."""
    return _active


@contextlib.contextmanager
def background_span(name: str, attributes: Attributes = None) -> Iterator[None]:
    """A root span for a piece of background work (a prediction-log write), so that its
    queries are one trace under it, not one lone trace per statement; a no-op untraced."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name, context=_ROOT, attributes=attributes):
        yield


@contextlib.contextmanager
def phase_span(name: str) -> Iterator[None]:
    """A child of the current span, timed as it runs: a phase of background work (a job's
    `features`, `infer`), where requests record theirs afterwards; a no-op untraced."""
    if _tracer is None:
        yield
        return
    with _tracer.start_as_current_span(name):
        yield


def link_context() -> SpanContext | None:
    """The current request span, for the batch span to link to (None: nothing to link)."""
    if not _active:
        return None
    ctx = trace.get_current_span().get_span_context()
    return ctx if ctx.trace_flags.sampled else None


def response_headers(span: Span) -> list[tuple[bytes, bytes]]:
    """X-Trace-Id, and the W3C draft `traceresponse` (which also says whether it was sampled)."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return []
    trace_id = f"{ctx.trace_id:032x}"
    flags = f"{int(ctx.trace_flags):02x}"
    return [
        (TRACE_ID_HEADER, trace_id.encode()),
        (b"traceresponse", f"00-{trace_id}-{ctx.span_id:016x}-{flags}".encode()),
    ]


# --- configuration --------------------------------------------------------------------------
class LinkedBatchSampler(Sampler):
    """The configured sampler, except that a root span linked to a sampled span is sampled.

    Batch spans are roots: without this a ratio sampler would drop the batch span of a
    sampled request (and keep batch spans whose requests were dropped).
    """

    def __init__(self, base: Sampler) -> None:
        self._base = base

    def set_base(self, base: Sampler) -> None:
        """A new rate or level from POST /v2/trace/setting (trace_control.py)."""
        self._base = base  # one reference: requests mid-decision see the old or the new

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: trace.SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        parent = trace.get_current_span(parent_context).get_span_context()
        if parent.is_valid and not parent.is_remote:
            # A phase or query span inside a request follows the request's decision, which
            # may be a model's own setting: the pod's sampler (ALWAYS_OFF at level OFF)
            # dropped the phases of a model traced on its own.
            decision = Decision.RECORD_AND_SAMPLE if parent.trace_flags.sampled else Decision.DROP
            return SamplingResult(decision, attributes, parent.trace_state)
        linked = links and any(link.context.trace_flags.sampled for link in links)
        if linked and not parent.is_valid:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        if kind is trace.SpanKind.CLIENT and not parent.is_valid:
            # A query outside any request or background_span (the jobs poller's claim, once
            # per poll interval per worker): a lone one-span trace each, all day long.
            return SamplingResult(Decision.DROP)
        # The FastAPI instrumentation names a request's span "<METHOD> <route template>";
        # an inference request of a model with trace settings of its own follows those.
        route = name.partition(" ")[2]
        model = model_trace_settings.for_request(route, attributes)
        base = self._base if model is None else model.sampler()
        result = base.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )
        # A trace podserve starts draws on trace_count (Triton's trace extension).
        starts = not parent.is_valid and result.decision.is_sampled()
        if starts and not _admitted(route, model):
            return SamplingResult(Decision.DROP)
        return result

    def get_description(self) -> str:
        return f"LinkedBatchSampler{{{self._base.get_description()}}}"


def _admitted(route: str, model: model_trace_settings.ModelOverride | None) -> bool:
    """A trace may start: one of the model's own count if it has one, else of the pod's."""
    return trace_control.budget().admits(route) if model is None else model.admits()


def sampler_from_env() -> Sampler:
    """OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (the standard names; default parent-based)."""
    name, ratio = trace_control.sampler_env()
    choices = {
        "always_on": lambda: ALWAYS_ON,
        "always_off": lambda: ALWAYS_OFF,
        "traceidratio": lambda: TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: ParentBased(ALWAYS_ON),
        "parentbased_always_off": lambda: ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": lambda: ParentBased(TraceIdRatioBased(ratio)),
    }
    if name not in choices:
        log.warning("unknown OTEL_TRACES_SAMPLER, using parentbased_always_on", extra={"got": name})
        name = "parentbased_always_on"
    return LinkedBatchSampler(choices[name]())


def build_resource(settings: Settings) -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win; these fill what they leave out."""
    detected = Resource.create()
    pod = os.environ.get("POD_NAME")
    defaults: dict[str, Any] = {
        "service.name": "podserve",
        "service.version": __version__,
        "service.instance.id": f"{pod or socket.gethostname()}-{os.getpid()}",
        "process.pid": os.getpid(),
        "k8s.pod.name": pod,
        "k8s.namespace.name": os.environ.get("POD_NAMESPACE"),
        "k8s.node.name": os.environ.get("NODE_NAME"),
        "podserve.model_repository": str(settings.model_repository),
    }
    have = dict(detected.attributes)
    if str(have.get("service.name", "")).startswith("unknown_service"):
        del have["service.name"]  # the SDK's placeholder, not a choice
    if "service.instance.id" not in _resource_keys_set():
        have.pop("service.instance.id", None)  # the SDK's random UUID, not a choice either
    extra = {k: v for k, v in defaults.items() if v and k not in have}
    return detected.merge(Resource(extra))


def _resource_keys_set() -> set[str]:
    """The attribute keys OTEL_RESOURCE_ATTRIBUTES sets (`key=value,key=value`)."""
    pairs = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    return {pair.partition("=")[0].strip() for pair in pairs if "=" in pair}


def build_exporter() -> SpanExporter | None:
    """OTLP over HTTP/protobuf by default; gRPC with the optional `podserve[grpc]` extra."""
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "grpc":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )
        except ImportError:
            log.error("OTLP protocol grpc needs `pip install podserve[grpc]`; tracing is off")
            return None
        return GrpcSpanExporter()
    log.error("unsupported OTLP protocol; tracing is off", extra={"protocol": protocol})
    return None


# --- per worker -----------------------------------------------------------------------------
class Tracing:
    """This worker's tracer provider. Build it after fork: a BatchSpanProcessor started in
    Gunicorn's master would lose its export thread in the workers."""

    def __init__(self, settings: Settings, exporter: SpanExporter) -> None:
        global _active, _tracer
        sampler = sampler_from_env()
        self.provider = TracerProvider(
            sampler=sampler, resource=build_resource(settings), shutdown_on_exit=False
        )
        trace_control.attach(sampler)
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("podserve", __version__)
        self.tensor_values = settings.trace_tensor_values
        if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            trace.set_tracer_provider(self.provider)  # for code that uses the global API
        _active, _tracer = True, self.tracer

    @classmethod
    def from_settings(cls, settings: Settings) -> Tracing | None:
        if not tracing_requested(settings):
            return None
        exporter = build_exporter()
        return cls(settings, exporter) if exporter is not None else None

    def instrument(self, app: FastAPI) -> None:
        from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        env_excluded = os.environ.get("OTEL_PYTHON_FASTAPI_EXCLUDED_URLS") or os.environ.get(
            "OTEL_PYTHON_EXCLUDED_URLS"
        )
        FastAPIInstrumentor.instrument_app(
            app,
            tracer_provider=self.provider,
            meter_provider=NoOpMeterProvider(),  # metrics come from prometheus_client
            excluded_urls=None if env_excluded else DEFAULT_EXCLUDED_URLS,
            exclude_spans=["receive", "send"],  # one span per ASGI message is noise
        )
        asyncpg = AsyncPGInstrumentor()
        if not asyncpg.is_instrumented_by_opentelemetry:
            asyncpg.instrument(tracer_provider=self.provider)

    @staticmethod
    def annotate(server_span: Span, ctx: RequestContext) -> None:
        """Model, rows, batch on the request span (before it ends, at the response start)."""
        if server_span.is_recording():
            server_span.set_attributes(request_attributes(ctx))

    def record_phases(self, server_span: Span, ctx: RequestContext) -> None:
        """Child spans of the request span for each phase that ran, with its real times.

        Runs after the response; the server span has ended by then, which is fine for a
        parent: only its context is needed.
        """
        if not server_span.get_span_context().trace_flags.sampled:
            return
        attributes = request_attributes(ctx)
        parent = trace.set_span_in_context(server_span)
        timings = ctx.timings
        tensors = _traces_tensors(ctx)
        for phase in PHASES:
            for index, (start, end) in enumerate(timings.stretches_ns.get(phase, ())):
                span = self.tracer.start_span(
                    phase, context=parent, start_time=start, attributes=attributes
                )
                if tensors and phase == "infer" and index == 0:
                    self._add_tensors(span, ctx, start)
                span.end(end_time=end)

    def _add_tensors(self, span: Span, ctx: RequestContext, at_ns: int) -> None:
        """trace_level TENSORS: one event per tensor of the request: its inputs as sent,
        what a pre-processor made of them for the session (`model_input`: token ids, ...),
        and its outputs as answered."""
        outcome = ctx.outcome
        outputs = outcome.outputs if outcome is not None else {}
        model_inputs = (outcome.model_inputs() if outcome is not None else None) or {}
        events = (("input", ctx.inputs or {}), ("model_input", model_inputs), ("output", outputs))
        for kind, tensors in events:
            for name, array in tensors.items():
                span.add_event(kind, tensor_attributes(name, array, self.tensor_values), at_ns)

    def observe_batch(self, record: BatchRecord) -> None:
        """Batch observer: one span per session run, linked to the requests it served."""
        links = [
            Link(item.context, {"podserve.rows": item.rows})
            for item in record.requests
            if item.context is not None
        ]
        if not links:  # no sampled request in this batch
            return
        model = record.model
        span = self.tracer.start_span(
            "batch",
            context=_ROOT,
            links=links,
            start_time=record.start_ns,
            attributes={
                "podserve.model": model.name,
                "podserve.model.version": model.version,
                "podserve.batch.size": sum(item.rows for item in record.requests),
                "podserve.batch.requests": len(record.requests),
            },
        )
        if record.error is not None:
            span.record_exception(record.error)
            span.set_status(Status(StatusCode.ERROR, type(record.error).__name__))
        span.end(end_time=record.end_ns)

    def shutdown(self) -> None:
        """Flush what is buffered (called at worker shutdown), for FLUSH_BOUND_S at most.

        A collector that accepts and never answers held the worker's exit for the exporter's
        timeout (10 s): every rollout waited, and under a graceful timeout shorter than that
        Gunicorn killed the worker in its lifespan shutdown, with nothing logged to say why.
        The flush runs in a daemon thread, which the worker's exit does not wait for."""
        global _active, _tracer
        _active, _tracer = False, None
        trace_control.detach()
        flush = threading.Thread(target=self.provider.shutdown, name="span-flush", daemon=True)
        flush.start()
        flush.join(FLUSH_BOUND_S)
        if flush.is_alive():
            log.warning(
                "spans not exported at shutdown: the collector did not answer in time; the "
                "spans still buffered are dropped",
                extra={"bound_s": FLUSH_BOUND_S},
            )


def _traces_tensors(ctx: RequestContext) -> bool:
    """trace_level TENSORS for this request: its model's setting, or the pod's."""
    if ctx.model is None:
        return trace_control.current().tensors
    return model_trace_settings.settings_for(ctx.model.name).tensors


def tensor_attributes(name: str, array: np.ndarray, limit: int) -> dict[str, Any]:
    """A tensor as span event attributes: its first `limit` values, flattened row-major."""
    flat = np.asarray(array).ravel()
    head = flat[:limit]
    if head.dtype.kind in "OSU" or head.dtype == np.uint64:  # OTLP ints are int64
        data: list[Any] = [_text(value) for value in head]  # BYTES: undecodable replaced
    else:
        data = head.tolist()  # Python floats, ints or bools: valid attribute values
    return {
        "podserve.tensor.name": name,
        "podserve.tensor.datatype": numpy_to_v2(head.dtype),
        "podserve.tensor.shape": list(array.shape),
        "podserve.tensor.data": data,
        "podserve.tensor.truncated": flat.size > limit,
    }


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def request_attributes(ctx: RequestContext) -> dict[str, Any]:
    attributes: dict[str, Any] = {}
    if ctx.model is not None:
        attributes["podserve.model"] = ctx.model.name
        attributes["podserve.model.version"] = ctx.model.version
        attributes["podserve.rows"] = ctx.rows
        attributes["podserve.queue.depth"] = ctx.queue_rows
    if ctx.outcome is not None:
        attributes["podserve.batch.size"] = ctx.outcome.batch_rows
        attributes["podserve.batch.requests"] = ctx.outcome.batch_requests
    return attributes
