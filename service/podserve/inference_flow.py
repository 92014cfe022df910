"""The phases of one inference request after parsing: validate, queue/infer, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass

from starlette.requests import Request

from podserve.batcher import InferenceOutcome
from podserve.onnx_model import OnnxModel
from podserve.phases import PhaseTimings
from podserve.processors import Tensors
from podserve.runtime import ServingRuntime

TIMEOUT_HEADER = "x-podserve-timeout-ms"


@dataclass
class RequestContext:
    """Per-request facts that phases, headers, spans and the prediction log share."""

    started: float
    timings: PhaseTimings

    @classmethod
    def begin(cls) -> RequestContext:
        return cls(started=time.perf_counter(), timings=PhaseTimings())


def runtime_of(request: Request) -> ServingRuntime:
    return request.app.state.runtime


async def predict(
    request: Request,
    ctx: RequestContext,
    model: OnnxModel,
    inputs: Tensors,
    datatypes: dict[str, str] | None,
) -> InferenceOutcome:
    runtime = runtime_of(request)
    with ctx.timings.measure("parse"):
        inputs, rows = model.validate(inputs, datatypes)
        deadline = runtime.deadline(ctx.started, request.headers.get(TIMEOUT_HEADER))
    outcome = await runtime.infer(model, inputs, rows, deadline)
    timings = ctx.timings
    timings.record("queue", outcome.queue_s)
    if model.preprocessor:
        timings.record("preprocess", outcome.preprocess_s)
    timings.record("infer", outcome.infer_s)
    if model.postprocessor:
        timings.record("postprocess", outcome.postprocess_s)
    return outcome


def timing_headers(ctx: RequestContext) -> dict[str, str]:
    return {"Server-Timing": ctx.timings.server_timing()}
