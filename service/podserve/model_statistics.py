"""Triton's statistics extension, computed from the pod's Prometheus series.

`GET /v2/models[/{name}[/versions/{version}]]/stats` answers what tritonclient's
`get_inference_statistics()` (and tools built on it) read, from the same merged metric files
a scrape reads, so the two never disagree and the hot path records nothing twice:

- success / fail: requests answered on the inference routes (V2 infer, V1 predict) with
  200 / with an error status, and their total time (`podserve_request_duration_seconds`);
- queue, compute_input, compute_infer, compute_output: the `queue`, `preprocess`, `infer` and
  `postprocess` phases (`podserve_phase_duration_seconds`); like Triton's, a batch's run
  counts once for each request in it; every model has a `preprocess` (the batch's feed:
  its requests' inputs joined and checked, then the pre-processor if it has one);
- inference_count / execution_count: rows inferred / inference session runs of online
  requests (`podserve_batch_size`, the batcher's runs; background jobs run apart and are
  not counted);
- last_inference: the end of the model's last session run, in ms since the epoch;
- batch_stats: per batch size (rows in the run), the runs and their time in each stage
  (`podserve_batch_runs`, `podserve_batch_stage_seconds`): compute_input is building the
  feed (concatenating the requests, value checks, the pre-processor), compute_infer the
  ONNX Runtime run, compute_output the post-processor and the split per request; each
  stage's count is the number of runs.

Counts are cumulative since the pod started (a recycled worker's counts stay). The answering
worker's own samples are exact; the other workers' reach the files within a second
(metrics.py). Every metric carries the model's version, so each version of a model has its
own statistics (a request that names no version counts for the default one, the highest).
There is no response cache, so `cache_hit` stays 0.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from podserve.metrics import BATCH_STAGES as METRIC_STAGES

INFERENCE_ROUTES = frozenset({
    "/v2/models/{model_name}/infer",
    "/v2/models/{model_name}/versions/{model_version}/infer",
    "/v1/models/{model_name}:predict",
})  # fmt: skip
# metrics.BATCH_STAGES -> Triton's names
BATCH_STAGES = dict(
    zip(METRIC_STAGES, ("compute_input", "compute_infer", "compute_output"), strict=True)
)
PHASE_STATS = {
    "queue": "queue",
    "preprocess": "compute_input",
    "infer": "compute_infer",
    "postprocess": "compute_output",
}


@dataclass
class Duration:
    count: float = 0.0
    seconds: float = 0.0

    def add(self, sample: Sample) -> None:
        if sample.name.endswith("_count"):
            self.count += sample.value
        elif sample.name.endswith("_sum"):
            self.seconds += sample.value

    def as_json(self) -> dict[str, int]:
        return {"count": round(self.count), "ns": round(self.seconds * 1e9)}


@dataclass
class ModelTotals:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    phases: dict[str, Duration] = field(
        default_factory=lambda: {stat: Duration() for stat in PHASE_STATS.values()}
    )
    runs: float = 0.0  # inference session runs
    rows: float = 0.0
    last_inference_s: float = 0.0
    # batch size -> runs, and time per stage (compute_input, compute_infer, compute_output)
    batch_runs: dict[int, float] = field(default_factory=dict)
    batch_seconds: dict[int, dict[str, float]] = field(default_factory=dict)

    def batch_stats(self) -> list[dict[str, Any]]:
        """Triton's $batch_stats: per batch size, each stage's count (the runs) and time."""
        stats = []
        for size in sorted(self.batch_runs):
            runs, seconds = self.batch_runs[size], self.batch_seconds.get(size, {})
            entry: dict[str, Any] = {"batch_size": size}
            for stage in BATCH_STAGES.values():
                entry[stage] = Duration(runs, seconds.get(stage, 0.0)).as_json()
            stats.append(entry)
        return stats


Totals = defaultdict[tuple[str, str], ModelTotals]  # by (model, version)


def _model(sample: Sample) -> tuple[str, str] | None:
    """The (model, version) a sample is about; None for requests that named no served one."""
    model, version = sample.labels.get("model"), sample.labels.get("version")
    return (model, version) if model and version else None


# A wrong method, or a request refused by authentication: no inference request at all (as
# Triton counts), whatever path it named.
NOT_INFERENCE = frozenset({"401", "403", "405"})


def _requests(totals: Totals, sample: Sample) -> None:
    labels, model = sample.labels, _model(sample)
    status = labels.get("status", "")
    if model is None or labels.get("route") not in INFERENCE_ROUTES or not status.isdigit():
        return
    if status == "200":
        totals[model].success.add(sample)
    elif int(status) >= 400 and status not in NOT_INFERENCE:
        totals[model].fail.add(sample)


def _phases(totals: Totals, sample: Sample) -> None:
    stat, model = PHASE_STATS.get(sample.labels.get("phase", "")), _model(sample)
    if stat is not None and model is not None:
        totals[model].phases[stat].add(sample)


def _batches(totals: Totals, sample: Sample) -> None:
    model = _model(sample)
    if model is None:
        return
    if sample.name.endswith("_count"):
        totals[model].runs += sample.value
    elif sample.name.endswith("_sum"):
        totals[model].rows += sample.value


def _batch_size(sample: Sample) -> tuple[tuple[str, str], int] | None:
    model, size = _model(sample), sample.labels.get("batch_size", "")
    return (model, int(size)) if model is not None and size.isdigit() else None


def _batch_runs(totals: Totals, sample: Sample) -> None:
    key = _batch_size(sample)
    if key is not None and sample.name.endswith("_total"):
        runs = totals[key[0]].batch_runs
        runs[key[1]] = runs.get(key[1], 0.0) + sample.value


def _batch_stages(totals: Totals, sample: Sample) -> None:
    key, stage = _batch_size(sample), BATCH_STAGES.get(sample.labels.get("stage", ""))
    if key is not None and stage is not None and sample.name.endswith("_total"):
        per_stage = totals[key[0]].batch_seconds.setdefault(key[1], {})
        per_stage[stage] = per_stage.get(stage, 0.0) + sample.value


def _last_inference(totals: Totals, sample: Sample) -> None:
    model = _model(sample)
    if model is not None:
        totals[model].last_inference_s = max(totals[model].last_inference_s, sample.value)


READERS: dict[str, Callable[[Totals, Sample], None]] = {
    "podserve_request_duration_seconds": _requests,
    "podserve_phase_duration_seconds": _phases,
    "podserve_batch_size": _batches,
    "podserve_batch_runs": _batch_runs,
    "podserve_batch_stage_seconds": _batch_stages,
    "podserve_last_inference_timestamp_seconds": _last_inference,
}


def read_totals(collector: Collector) -> dict[tuple[str, str], ModelTotals]:
    """Per (model, version), from every worker's samples (file I/O: off the event loop)."""
    totals: Totals = defaultdict(ModelTotals)
    for family in collector.collect():
        reader = READERS.get(family.name)
        if reader is not None:
            for sample in family.samples:
                reader(totals, sample)
    return dict(totals)


def model_stat(name: str, version: str, totals: ModelTotals | None) -> dict[str, Any]:
    """One $model_stat object of the extension: one version of a model."""
    t = totals or ModelTotals()
    zero = Duration().as_json()
    return {
        "name": name,
        "version": version,
        "last_inference": round(t.last_inference_s * 1000),
        "inference_count": round(t.rows),
        "execution_count": round(t.runs),
        "inference_stats": {
            "success": t.success.as_json(),
            "fail": t.fail.as_json(),
            **{key: duration.as_json() for key, duration in t.phases.items()},
            "cache_hit": zero,
            "cache_miss": zero,
        },
        "batch_stats": t.batch_stats(),
    }
