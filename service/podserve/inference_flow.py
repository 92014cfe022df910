"""The phases of one inference request after parsing: validate, queue/infer, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request

from podserve.batcher import InferenceOutcome
from podserve.client_disconnect import client_connection
from podserve.db.hooks import log_prediction
from podserve.errors import phases_of
from podserve.onnx_model import OnnxModel
from podserve.phases import PhaseTimings
from podserve.processors import Tensors
from podserve.request_headers import request_headers
from podserve.runtime import runtime_of
from podserve.simulated_io import simulated_features
from podserve.tracing import link_context, tracing_active

TIMEOUT_HEADER = "x-podserve-timeout-ms"
CONTEXT_SCOPE_KEY = "podserve.request_context"  # read by observability after the response


@dataclass
class RequestContext:
    """Per-request facts that phases, headers, spans and the prediction log share."""

    started: float
    timings: PhaseTimings
    deadline: float | None = None  # perf_counter; set by start_deadline, before any wait
    model: OnnxModel | None = None  # set once the input is valid
    rows: int = 0
    queue_rows: int = 0  # rows already queued in this worker when this request enqueued
    inputs: Tensors | None = None  # for trace_level TENSORS (references, no copies)
    outcome: InferenceOutcome | None = None

    @classmethod
    def begin(cls, scope: dict) -> RequestContext:
        """A request's context, kept in its scope for what runs after the route (the error
        handlers' Server-Timing, observability), whether or not the route completes."""
        ctx = cls(started=time.perf_counter(), timings=PhaseTimings(wall_clock=tracing_active()))
        scope[CONTEXT_SCOPE_KEY] = ctx
        return ctx


def start_deadline(request: Request, ctx: RequestContext, timeout_ms: float | None = None) -> None:
    """The request's deadline (X-Podserve-Timeout-Ms, else PODSERVE_REQUEST_TIMEOUT_MS; the
    body's own `timeout_ms`, V2's `timeout` parameter, when sooner), worked out once, before
    the first phase that waits: the feature lookup must keep to it as the queue does. No
    clock read: it counts from ctx.started."""
    header = request_headers(request.scope).get(TIMEOUT_HEADER)
    ctx.deadline = runtime_of(request).deadline(ctx.started, header, timeout_ms)


async def predict(
    request: Request,
    ctx: RequestContext,
    model: OnnxModel,
    inputs: Tensors,
    datatypes: dict[str, str] | None,
) -> InferenceOutcome:
    """Validate, queue and infer within ctx.deadline (the route set it: start_deadline)."""
    runtime = runtime_of(request)
    await simulated_features(ctx.timings)  # benchmark aid, off unless PODSERVE_SIMULATED_IO_MS
    with ctx.timings.measure("parse"):
        inputs, rows = model.validate(inputs, datatypes, values=False)  # values: in run_batch
    ctx.model, ctx.rows, ctx.queue_rows = model, rows, runtime.queued_rows
    ctx.inputs = inputs
    submitted_ns = time.time_ns() if ctx.timings.wall_clock else None
    try:
        outcome = await runtime.infer(
            model, inputs, rows, ctx.deadline, link_context(), client_connection(request.scope)
        )
    except Exception as exc:  # a 504's or 499's wait; a failed own run's wait and run
        if (spent := phases_of(exc)) is not None:
            queue_s, infer_s = spent
            ctx.timings.record("queue", queue_s, submitted_ns)
            if infer_s is not None:
                at = None if submitted_ns is None else submitted_ns + int(queue_s * 1e9)
                ctx.timings.record("infer", infer_s, at)
        raise
    ctx.outcome = outcome
    _record_inference(ctx.timings, model, outcome, submitted_ns)
    log_prediction(request, ctx, model, inputs, outcome.outputs)  # `log` phase: buffer append
    return outcome


def _record_inference(
    timings: PhaseTimings, model: OnnxModel, outcome: InferenceOutcome, submitted_ns: int | None
) -> None:
    """Phases measured in the inference thread, laid end to end from the submit time (the
    wall-clock placement only matters for trace spans)."""
    at = submitted_ns
    for phase, seconds, ran in (
        ("queue", outcome.queue_s, True),
        # Every model's: the batch's feed (concatenation, NaN/Inf check), and the
        # pre-processor if it has one.
        ("preprocess", outcome.preprocess_s, True),
        ("infer", outcome.infer_s, True),
        ("postprocess", outcome.postprocess_s, bool(model.postprocessor)),
    ):
        if ran:
            timings.record(phase, seconds, at)
        if at is not None:
            at += int(seconds * 1e9)


def server_timing(ctx: RequestContext) -> str:
    """The phases, then `total`: the in-app time from the request's arrival in the app
    (ctx.started) to now; what is in no phase is `total` minus their sum."""
    return ctx.timings.server_timing(time.perf_counter() - ctx.started)


def timing_header(ctx: RequestContext) -> tuple[bytes, bytes]:
    return (b"server-timing", server_timing(ctx).encode("latin-1"))


def error_headers(scope: dict, headers: dict[str, str] | None) -> dict[str, str] | None:
    """An error answer's headers, with the phases its request went through (Server-Timing)
    when it came from an inference route."""
    ctx: RequestContext | None = scope.get(CONTEXT_SCOPE_KEY)
    if ctx is None or not ctx.timings.durations:
        return headers
    return {**(headers or {}), "server-timing": server_timing(ctx)}
