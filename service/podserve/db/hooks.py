"""The two calls the request path makes into the PostgreSQL features (kept tiny on purpose)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Protocol

from starlette.requests import Request

from podserve.db.features import EntityLookup
from podserve.db.pool import NOT_CONFIGURED
from podserve.db.prediction_log import make_row, new_request_id
from podserve.errors import NotConfigured
from podserve.onnx_model import OnnxModel
from podserve.phases import PhaseTimings
from podserve.processors import Tensors
from podserve.request_headers import as_utf8, request_headers
from podserve.request_id import current_request_id
from podserve.runtime import runtime_of
from podserve.tracing import current_trace_id

if TYPE_CHECKING:
    from podserve.db.services import DatabaseServices

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}")


class Timed(Protocol):
    """inference_flow.RequestContext (not imported: it imports this module)."""

    timings: PhaseTimings
    deadline: float | None


def services_of(request: Request) -> DatabaseServices:
    return runtime_of(request).db


async def fetch_features(
    request: Request, ctx: Timed, model: OnnxModel, lookup: EntityLookup
) -> Tensors:
    """The `features` phase: entity ids -> the model's input tensor, within the request's
    deadline (ctx.deadline, worked out before this phase) when it is sooner than the lookup's
    own timeout."""
    store = services_of(request).features
    if store is None:
        raise NotConfigured(f"feature lookup unavailable: {NOT_CONFIGURED}")
    with ctx.timings.measure("features"):
        return await store.tensor(model, lookup, ctx.deadline)


def log_prediction(
    request: Request, ctx: Timed, model: OnnxModel, inputs: Tensors, outputs: Tensors
) -> None:
    """The `log` phase: one row into the in-memory buffer (the writer task does the I/O)."""
    prediction_log = services_of(request).prediction_log
    if prediction_log is None:
        return
    with ctx.timings.measure("log"):
        prediction_log.append(
            make_row(
                new_request_id(),
                client_request_id(request),
                model.name,
                model.version,
                inputs,
                outputs,
                dict(ctx.timings.durations),
                trace_id(request),
                prediction_log.inputs_mode,
            )
        )


def client_request_id(request: Request) -> str | None:
    """The caller's X-Request-ID as sent (a client finds its rows by it, even one the answer
    replaced for not being a valid id), else the id podserve made and answered with, which
    its log lines carry too."""
    sent = request_headers(request.scope).get("x-request-id")
    return as_utf8(sent) if sent else current_request_id()  # "": replaced in the answer


def trace_id(request: Request) -> str | None:
    """The active OpenTelemetry trace, else the caller's `traceparent`, else None."""
    active = current_trace_id()
    if active is not None:
        return active
    match = _TRACEPARENT.match(request_headers(request.scope).get("traceparent", ""))
    return match[1] if match and match[1] != "0" * 32 else None
