"""Per-model trace settings (Triton's /v2/models/{name}/trace/setting), in process: the
shared table, what a model's settings are made of, and the sampler following them."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan

from podserve import model_trace_settings as models
from podserve import trace_control
from podserve.errors import BadRequest
from podserve.trace_control import TraceSettings
from podserve.tracing import LinkedBatchSampler

V2 = "POST /v2/models/{model_name}/infer"
V2_VERSION = "POST /v2/models/{model_name}/versions/{model_version}/infer"
V1 = "POST /v1/models/{model_name}:predict"
METADATA = "GET /v2/models/{model_name}"


@pytest.fixture()
def sampler(monkeypatch: pytest.MonkeyPatch) -> Iterator[LinkedBatchSampler]:
    """Tracing set up in this process (pod: every request, no count), no model settings."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setattr(trace_control, "_budget", trace_control.TraceBudget())
    holder = LinkedBatchSampler(TraceSettings(True, 1).sampler())
    trace_control.attach(holder)
    # The pod's settings as this process starts them (earlier tests left theirs in the words)
    trace_control.POD_SETTING.publish((1, 1, 0))  # on, every request, no tensors
    models.POD_SETTING.edit(lambda values: (0,) * len(values))
    try:
        yield holder
    finally:
        models.POD_SETTING.edit(lambda values: (0,) * len(values))
        trace_control.detach()


def _sampled(sampler: LinkedBatchSampler, path: str, name: str = V2, **context: bool) -> bool:
    parent = None
    if context.get("caller_sampled"):
        span = trace.SpanContext(
            secrets.randbits(128), secrets.randbits(64), True, trace.TraceFlags(1)
        )
        parent = trace.set_span_in_context(NonRecordingSpan(span))
    attributes = {"url.path": path, "http.target": path}
    decision = sampler.should_sample(parent, secrets.randbits(128), name, attributes=attributes)
    return decision.decision.is_sampled()


@pytest.mark.parametrize(
    ("span_name", "path", "model"),
    [
        (V2, "/v2/models/text/infer", "text"),
        (V2_VERSION, "/v2/models/a/versions/2/infer", "a"),
        (V1, "/v1/models/m.v1:predict", "m.v1"),
        (METADATA, "/v2/models/text", None),  # not inference: the pod's settings
        ("GET /v2/health/ready", "/v2/health/ready", None),
    ],
)
def test_the_model_an_inference_request_names(span_name: str, path: str, model: str | None) -> None:
    assert models.model_in_path(span_name.partition(" ")[2], path) == model


def test_a_model_overrides_the_pods_settings_field_by_field(sampler: LinkedBatchSampler) -> None:
    pod = trace_control.current()
    assert models.settings_for("a") == pod and models.override("a") is None

    answer = models.change("a", {"trace_rate": "10", "trace_count": "3"})
    assert answer["trace_rate"] == "10" and answer["trace_count"] == "3"
    assert answer["trace_level"] == ["TIMESTAMPS"]  # the pod's: not set for the model
    assert models.settings_for("b") == pod  # other models keep the pod's
    assert trace_control.budget().remaining() == -1  # the model's count is its own

    # A later pod change reaches what the model does not set, not what it does.
    trace_control.change({"trace_level": ["TIMESTAMPS", "TENSORS"], "trace_rate": "99"})
    assert models.settings_for("a") == TraceSettings(True, 10, tensors=True)

    models.change("a", {"trace_level": ["OFF"]})
    assert models.settings_for("a") == TraceSettings(False, 10)
    models.change("a", {"trace_level": None, "trace_rate": None})  # null: the pod's again
    assert models.settings_for("a") == trace_control.current()
    assert models.as_triton("a")["trace_count"] == "3"  # still its own
    models.change("a", {"trace_count": None})
    assert models.override("a") is None  # nothing of its own left: no entry


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"trace_rate": "0"}, "trace_rate must be a positive integer"),
        ({"trace_level": ["ALL"]}, "not supported"),
        ({"trace_count": "-2"}, "trace_count must be"),
        ({"trace_file": "/tmp/x"}, "trace_file must be ''"),
        ({"trace_rate": "1", "sampling": 1}, "unknown trace settings"),
        ([], "must be a JSON object"),
    ],
)
def test_a_bad_change_is_refused_and_stores_nothing(
    sampler: LinkedBatchSampler, body: object, message: str
) -> None:
    models.change("a", {"trace_rate": "5"})
    with pytest.raises(BadRequest, match=message):
        models.change("a", body)
    assert models.settings_for("a").rate == 5 and models.as_triton("a")["trace_count"] == "-1"


def test_the_table_has_room_for_max_models(sampler: LinkedBatchSampler) -> None:
    for index in range(models.MAX_MODELS):
        models.change(f"model-{index}", {"trace_rate": str(index + 1)})
    with pytest.raises(BadRequest, match=f"at most {models.MAX_MODELS} models"):
        models.change("one-more", {"trace_rate": "1"})
    assert models.settings_for("model-63").rate == 64
    models.change("model-0", {"trace_rate": None})  # frees an entry
    models.change("one-more", {"trace_rate": "7"})
    assert models.settings_for("one-more").rate == 7 and models.settings_for("model-0").rate == 1


def test_without_tracing_a_model_cannot_be_traced(sampler: LinkedBatchSampler) -> None:
    trace_control.detach()
    with pytest.raises(BadRequest, match="tracing is not set up"):
        models.change("a", {"trace_level": ["TIMESTAMPS"]})
    with pytest.raises(BadRequest, match="tracing is not set up"):
        models.change("a", {"trace_count": "3"})
    assert models.change("a", {"trace_level": ["OFF"]})["trace_level"] == ["OFF"]  # as it is


def test_a_change_in_one_worker_reaches_the_others_and_counts_are_shared(
    sampler: LinkedBatchSampler,
) -> None:
    """Forked workers share the table: the child's change is seen here, and the child and
    this process draw on one model count."""
    models.POD_SETTING.shared  # noqa: B018 (mapped before the fork, as the master does)
    pid = os.fork()
    if pid == 0:  # a worker: sets the model's count and spends one of it
        models.change("a", {"trace_rate": "1", "trace_count": "3"})
        os._exit(0 if models.override("a").admits() else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert models.override("a") is None  # not followed yet: this worker looks twice a second
    models.POD_SETTING.follow()
    found = models.override("a")
    assert found is not None and found.remaining() == 2
    assert [found.admits() for _ in range(3)] == [True, True, False]


def test_the_sampler_follows_the_requests_model(sampler: LinkedBatchSampler) -> None:
    trace_control.change({"trace_level": ["OFF"]})  # the pod traces nothing ...
    models.change("a", {"trace_level": ["TIMESTAMPS"], "trace_count": "2"})  # ... but model a
    assert not _sampled(sampler, "/v2/models/b/infer")
    assert not _sampled(sampler, "/v2/models/a", name=METADATA)  # not inference: the pod's
    assert _sampled(sampler, "/v1/models/a:predict", name=V1)
    assert _sampled(sampler, "/v2/models/a/versions/1/infer", name=V2_VERSION)
    assert models.as_triton("a")["trace_count"] == "0"
    assert not _sampled(sampler, "/v2/models/a/infer")  # its count is spent
    assert _sampled(sampler, "/v2/models/a/infer", caller_sampled=True)  # a caller's goes on
    assert trace_control.budget().remaining() == -1

    models.change("a", {"trace_count": None})  # the pod's count (no limit) again
    assert all(_sampled(sampler, "/v2/models/a/infer") for _ in range(3))
    models.change("a", {"trace_level": ["OFF"]})
    assert not _sampled(sampler, "/v2/models/a/infer", caller_sampled=True)  # OFF: nothing


def test_a_model_without_its_own_count_draws_on_the_pods(sampler: LinkedBatchSampler) -> None:
    trace_control.change({"trace_count": "2"})
    models.change("a", {"trace_rate": "1"})
    assert [_sampled(sampler, "/v2/models/a/infer") for _ in range(3)] == [True, True, False]
    assert trace_control.budget().remaining() == 0


def test_null_puts_a_pod_setting_back_to_its_start_up_value(sampler: LinkedBatchSampler) -> None:
    start = trace_control.current()
    trace_control.change({"trace_level": ["OFF"], "trace_rate": "50", "trace_count": "4"})
    assert trace_control.change({"trace_level": None, "trace_rate": None}) == start
    assert trace_control.budget().remaining() == 4
    trace_control.change({"trace_count": None})
    assert trace_control.budget().remaining() == -1
