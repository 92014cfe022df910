"""Trace settings changed at run time for the whole pod: Triton's trace extension.

`POST /v2/trace/setting` turns request tracing on or off and sets its rate for every worker
of the pod (pod_settings.py), for instance to trace every request for a few minutes while
a latency problem is looked at, then go back to one in a thousand. It maps onto podserve's
OpenTelemetry tracing (tracing.py):

- `trace_level` `["TIMESTAMPS"]`: requests are traced, with a span per phase (the phases'
  timestamps); `["TIMESTAMPS", "TENSORS"]` (or `["TENSORS"]`: the phase spans come with
  it) adds each traced request's input and output tensors as events of its `infer` span,
  at most PODSERVE_TRACE_TENSOR_VALUES values each; `["OFF"]`: no spans at all, whatever a
  caller's trace context asks.
- `trace_rate` "N": one request in N starts a trace (TraceIdRatioBased 1/N); a request that
  arrives in a sampled trace of its caller continues it (parent-based).
- `trace_count` "N": the pod starts N more traces of inference requests (the routes Triton's
  statistics count), then no trace at all until a POST sets a new count ("-1": no limit,
  the default). GET reports how many are left. Requests in a caller's sampled trace still
  continue it (the caller sampled them); only traces podserve starts count, and the workers
  draw on one count in shared memory (`TraceBudget`).
- `trace_mode` is "opentelemetry", `log_frequency` "0" and `trace_file` "" (spans go to the
  OTLP exporter): other values are refused.
- A JSON null puts a field back to its start-up value (trace_count: no limit). A model's
  own settings, which override these for its requests, are in model_trace_settings.py.

Until a POST, the settings reported are those of OTEL_TRACES_SAMPLER/_ARG (a ratio r as
"one in round(1/r)"). Tracing itself is set up at start-up only (an OTLP endpoint, not
OTEL_SDK_DISABLED, PODSERVE_TRACING_ENABLED): without it the level is OFF and turning it on
is refused with what to set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased

from podserve import pod_settings
from podserve.errors import BadRequest
from podserve.model_statistics import INFERENCE_ROUTES

ON, OFF, TENSORS = "TIMESTAMPS", "OFF", "TENSORS"
TRACE_MODE = "opentelemetry"
_FIXED = {"log_frequency": "0", "trace_file": "", "trace_mode": TRACE_MODE}
KNOWN_FIELDS = ("trace_level", "trace_rate", "trace_count", *_FIXED)
UNLIMITED = -1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceSettings:
    on: bool
    rate: int  # one request in `rate` starts a trace
    tensors: bool = False  # TENSORS: traced requests carry their tensors

    @property
    def levels(self) -> list[str]:
        if not self.on:
            return [OFF]
        return [ON, TENSORS] if self.tensors else [ON]

    def as_triton(self, count: int | None = None) -> dict[str, Any]:
        """Triton's form; `count` is what is left (the pod's by default)."""
        return {
            "trace_level": self.levels,
            "trace_rate": str(self.rate),
            "trace_count": str(budget().remaining() if count is None else count),
            **_FIXED,
        }

    def updated(self, request: Any) -> TraceSettings:
        """The settings after a POST body, or BadRequest saying what is wrong with it. A
        null field goes back to its start-up value (Triton: the setting is cleared)."""
        request = checked_request(request)
        if request.get("trace_count") is not None:
            parse_count(request["trace_count"])  # the pod's live count, set by change()
        start = _State.start_up
        on, tensors, rate = self.on, self.tensors, self.rate
        if "trace_level" in request:
            level = request["trace_level"]
            on, tensors = (start.on, start.tensors) if level is None else parse_level(level)
        if "trace_rate" in request:
            value = request["trace_rate"]
            rate = start.rate if value is None else parse_rate(value)
        return TraceSettings(on, rate, tensors and on)

    def sampler(self) -> Sampler:
        return ParentBased(TraceIdRatioBased(1 / self.rate)) if self.on else ALWAYS_OFF


_WHY = {
    "log_frequency": "spans go to the OTLP exporter, not to files",
    "trace_file": "spans go to the OTLP exporter, not to files",
    "trace_mode": "traces are OpenTelemetry spans",
}


def checked_request(request: Any) -> dict[str, Any]:
    """A POST body as a dict of known fields, the fixed ones as podserve has them (or null)."""
    request = pod_settings.request_fields(request, KNOWN_FIELDS, "trace settings")
    for name, fixed in _FIXED.items():
        if request.get(name) is not None and str(request[name]) != fixed:
            raise BadRequest(f"{name} must be {fixed!r} in podserve: {_WHY[name]}")
    return request


def parse_level(value: Any) -> tuple[bool, bool]:
    """trace_level -> (traced, with tensors)."""
    levels = [value] if isinstance(value, str) else value
    if not isinstance(levels, list) or not levels or not all(isinstance(v, str) for v in levels):
        raise BadRequest(f'trace_level must be a list such as ["{ON}"] or ["{OFF}"], not {value!r}')
    unsupported = sorted(set(levels) - {ON, OFF, TENSORS})
    if unsupported:
        raise BadRequest(
            f"trace_level {unsupported} is not supported: podserve traces phase timestamps "
            f'(["{ON}"]), those and the tensors (["{ON}", "{TENSORS}"]) or nothing (["{OFF}"])'
        )
    if OFF in levels and len(set(levels)) > 1:
        raise BadRequest(f"trace_level {levels} asks for {OFF} and for tracing at once")
    return OFF not in levels, TENSORS in levels


def _ascii_digits(text: str) -> bool:
    """str.isdigit() alone takes "²" (which int() refuses: a 500) and "٣" (which it reads)."""
    return text.isascii() and text.isdigit()


def parse_rate(value: Any) -> int:
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    if not _ascii_digits(text) or int(text) < 1 or int(text) > 2**31 - 1:
        raise BadRequest(f"trace_rate must be a positive integer (one request in N), not {value!r}")
    return int(text)


def parse_count(value: Any) -> int:
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    digits = text[1:] if text.startswith("-") else text
    if not _ascii_digits(digits) or not UNLIMITED <= int(text) <= 2**31 - 1:
        raise BadRequest(
            f"trace_count must be the number of traces to start, or -1 for no limit, not {value!r}"
        )
    return int(text)


class TraceBudget:
    """trace_count: how many more traces the pod may start (UNLIMITED: no limit), one word
    of pod_settings' shared memory (mapped by the Gunicorn master before it forks, so every
    worker draws on it)."""

    def __init__(self) -> None:
        self._shared = pod_settings.SharedWords("trace-count", 1)
        self.set(UNLIMITED)

    def remaining(self) -> int:
        return self._shared.read()[1][0]

    def set(self, count: int) -> None:
        self._shared.write((count,))

    def take(self) -> bool:
        """One trace may start (False once the count is spent). Without a count it costs one
        read of shared memory; with one, a lock: once per trace started, not per request."""
        left = self.remaining()
        if left == UNLIMITED:
            return True
        if left == 0:
            return False
        _, (left,) = self._shared.update(lambda old: (old[0] - 1,) if old[0] > 0 else old)
        if left == 1:
            log.info("trace_count is spent: no trace starts until POST /v2/trace/setting")
        return left != 0

    def admits(self, route: str) -> bool:
        """May a trace start at this route? An inference request spends one of the count;
        any other request (metadata, settings) is traced only while some are left."""
        return self.take() if route in INFERENCE_ROUTES else self.remaining() != 0


_budget: TraceBudget | None = None


def budget() -> TraceBudget:
    """The pod's trace count (the process's own outside Gunicorn)."""
    global _budget
    if _budget is None:
        _budget = TraceBudget()
    return _budget


def gunicorn_hooks() -> dict[str, Any]:
    """on_starting: the master maps the count, so each worker it forks shares it."""

    def on_starting(_server: Any) -> None:
        budget()

    return {"on_starting": on_starting}


def sampler_env() -> tuple[str, float]:
    """OTEL_TRACES_SAMPLER (lower case) and OTEL_TRACES_SAMPLER_ARG (a ratio in [0, 1])."""
    name = os.environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    try:
        ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))
    except ValueError:
        ratio = 1.0
    return name, min(max(ratio, 0.0), 1.0)


def from_env() -> TraceSettings:
    """What OTEL_TRACES_SAMPLER / _ARG ask for, in Triton's terms (tracing.sampler_from_env)."""
    name, ratio = sampler_env()
    if name.endswith("always_off"):
        return TraceSettings(on=False, rate=1)
    if not name.endswith("traceidratio"):
        return TraceSettings(on=True, rate=1)
    return TraceSettings(on=True, rate=round(1 / ratio)) if ratio > 0 else TraceSettings(False, 1)


class _State:
    sampler_holder: Any = None  # tracing.LinkedBatchSampler of this process, once tracing is on
    start_up = applied = TraceSettings(on=False, rate=1)  # what a null field goes back to


def attach(holder: Any) -> None:
    """Called by tracing.Tracing: this process exports spans; POSTs set its sampler."""
    _State.sampler_holder = holder
    _State.start_up = _State.applied = from_env()


def detach() -> None:
    _State.sampler_holder = None
    _State.start_up = _State.applied = TraceSettings(on=False, rate=1)


def current() -> TraceSettings:
    return _State.applied


def tracing_set_up() -> bool:
    """Does this process export spans (so settings that trace can be taken)?"""
    return _State.sampler_holder is not None


def not_set_up() -> BadRequest:
    return BadRequest(
        "tracing is not set up in this pod: start it with OTEL_EXPORTER_OTLP_ENDPOINT "
        "(or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set and PODSERVE_TRACING_ENABLED=true"
    )


def _decode(values: tuple[int, ...]) -> TraceSettings:
    return TraceSettings(on=bool(values[0]), rate=values[1], tensors=bool(values[2]))


def _encode(settings: TraceSettings) -> tuple[int, ...]:
    return int(settings.on), settings.rate, int(settings.tensors)


def _apply_shared(values: tuple[int, ...]) -> None:
    if _State.sampler_holder is None:  # tracing is off in this process: nothing to set
        return
    settings = _decode(values)
    _State.sampler_holder.set_base(settings.sampler())
    _State.applied = settings


POD_SETTING = pod_settings.register("trace-settings", 3, _apply_shared)


def change(request: Any) -> TraceSettings:
    """A POST body: validate, apply here at once, publish to the pod's other workers."""
    settings = _State.applied.updated(request)
    count = None
    if "trace_count" in request:
        value = request["trace_count"]
        count = UNLIMITED if value is None else parse_count(value)
    changes_count = count is not None and count != budget().remaining()
    if not tracing_set_up() and (settings != _State.applied or changes_count):
        raise not_set_up()
    if tracing_set_up() and ("trace_level" in request or "trace_rate" in request):
        # The fields it names change the pod's current settings, read under the lock: this
        # worker's copy may not have followed another worker's change yet.
        POD_SETTING.edit(
            lambda values: _encode(_decode(values).updated(request)), _encode(_State.applied)
        )
    if count is not None:
        budget().set(count)
    return _State.applied
