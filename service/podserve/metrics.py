"""Prometheus metrics, aggregated across Gunicorn workers (prometheus_client multiprocess mode).

Every worker writes its samples to mmap files in one per-pod directory
(``PROMETHEUS_MULTIPROC_DIR``); whichever worker answers ``GET /metrics`` merges all files, so
a scrape sees the whole pod. The directory's lifecycle (emptied at start, a dead worker's
files folded into archives, a scrape's consistent read) is metrics_multiprocess.py's.

Gauges use ``livesum``: the pod's value is the sum over its live workers.

Per request, the event loop only adds to plain Python tallies (:class:`PendingSamples`);
they reach the mmap files once a second, before a scrape this worker answers, and at
shutdown. Writing each increment through prometheus_client's multiprocess values (a lock
and a struct write into the mmap per bucket, sum and counter: ~15 per request) was ~12% of
the event loop's CPU for the tabular model. The price: a scrape may miss the last second
of another worker's requests (a SIGKILLed worker loses them); Prometheus scrapes every
15-60 s, so rates and quantiles are unaffected.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from podserve import connection_balance
from podserve.errors import DeadlineExceeded, ModelNotReady, Overloaded, ServiceUnavailable
from podserve.http_body import BodyBudgetFull, body_bytes_held
from podserve.metrics_multiprocess import multiproc_dir, read_consistent, use_multiprocess_values

BATCH_STAGES = ("input", "infer", "output")  # of a session run, as observe_batch takes them

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # how often each worker writes its sampled gauges

# Millisecond work: phases take 50 us .. 100 ms, whole requests 0.5 ms .. seconds.
PHASE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# How late a 0.1 s tick runs: ~1 ms idle (timer resolution), tens of ms is trouble.
LOOP_LAG_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A PostgreSQL connection: tens of us when one is free, up to the request's timeout (seconds)
# when this worker's requests hold every one.
DB_POOL_WAIT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
)  # fmt: skip

# Exception class -> podserve_rejections_total{reason}; the first match wins.
REJECTION_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (BodyBudgetFull, "body_budget"),  # an Overloaded too: before it
    (Overloaded, "shed"),
    (DeadlineExceeded, "deadline"),
    (ModelNotReady, "not_ready"),
    (ServiceUnavailable, "unavailable"),
)


def rejection_reason(exc: BaseException | None) -> str | None:
    for cls, reason in REJECTION_REASONS:
        if isinstance(exc, cls):
            return reason
    return None


# --- running totals kept by the database services, exported as counters -------------------
# The object's attribute -> (metric name, help); refresh turns the totals into increments.
PREDICTION_LOG_TOTALS = {
    "rows_written": (
        "podserve_prediction_log_rows_written",
        "Prediction-log rows written to PostgreSQL (online requests' and jobs')",
    ),
    "rows_spooled": ("podserve_prediction_log_rows_spooled", "Prediction-log rows spooled to disk"),
    "rows_rejected": (
        "podserve_prediction_log_rows_rejected",
        "Prediction-log rows refused for their own values or a constraint (set aside on "
        "disk), or in a quarantined spool segment",
    ),
    "write_errors": (
        "podserve_prediction_log_write_errors",
        "Failed prediction-log writer passes (rows kept and retried), journal writes, "
        "quarantined spool segments",
    ),
}
# db.log_retention.LogRetention's, in the one worker per pod that purges.
LOG_RETENTION_TOTALS = {
    "rows_purged": (
        "podserve_prediction_log_rows_purged",
        "Prediction-log rows older than PODSERVE_PREDICTION_LOG_RETENTION_S deleted",
    ),
}
JOB_TOTALS = {  # db.jobs.JobRunner's, in the workers that run jobs
    "jobs_succeeded": ("podserve_jobs_succeeded", "Background jobs run and their result stored"),
    "jobs_failed": (
        "podserve_jobs_failed",
        "Background jobs failed (client error, inference error, result not stored, "
        "attempts used up)",
    ),
    "jobs_requeued": (
        "podserve_jobs_requeued",
        "Job attempts put back in the queue after a server-side error, to run again later",
    ),
    "results_discarded": (
        "podserve_jobs_results_discarded",
        "Job attempts that lost their lease meanwhile: result not stored, or session run "
        "terminated early (the job runs again)",
    ),
    "claim_errors": ("podserve_jobs_claim_errors", "Failed claims of jobs (database slow or down)"),
}


def _counters(table: dict[str, tuple[str, str]], r: CollectorRegistry) -> dict[str, Counter]:
    return {attr: Counter(name, text, registry=r) for attr, (name, text) in table.items()}


# --- exemplars ------------------------------------------------------------------------------
class ExemplarStore:
    """Latest trace id per histogram bucket, kept by this worker.

    prometheus_client does not store exemplars in multiprocess mode; an exemplar is only an
    example, so the worker that answers a scrape attaches its own (OpenMetrics format only).
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[str, tuple[tuple[str, str], ...]], Exemplar] = {}

    def record(
        self, name: str, bounds: tuple[float, ...], labels: dict[str, str], value: float,
        trace_id: str,
    ) -> None:  # fmt: skip
        upper = next((b for b in bounds if value <= b), float("inf"))
        key = (f"{name}_bucket", tuple(sorted({**labels, "le": floatToGoString(upper)}.items())))
        self._latest[key] = Exemplar({"trace_id": trace_id}, value, time.time())

    def attach(self, metrics: Iterable[Metric]) -> Iterator[Metric]:
        for metric in metrics:
            if metric.type == "histogram" and self._latest:
                metric.samples = [
                    s._replace(exemplar=self._latest.get((s.name, tuple(sorted(s.labels.items())))))
                    if s.name.endswith("_bucket")
                    else s
                    for s in metric.samples
                ]
            yield metric


class _MultiProcessWithExemplars:
    def __init__(self, path: Path, exemplars: ExemplarStore) -> None:
        self._path = path
        self._exemplars = exemplars

    def collect(self) -> Iterator[Metric]:
        return self._exemplars.attach(read_consistent(self._path))


# --- per-request samples, written in bulk -------------------------------------------------
class PendingSamples:
    """Counter increments and histogram observations not yet in the multiprocess files.

    Event loop only (no lock). flush() adds them to the metric children's own values: a
    histogram's per-bucket counts and sum (prometheus_client >= 0.20 keeps them in
    `_buckets`, `_sum` and `_upper_bounds`; a child without them is observed directly).
    """

    def __init__(self) -> None:
        self._counts: dict[Any, float] = {}
        self._tallies: dict[Any, ObservationTally] = {}

    def inc(self, child: Any, amount: float = 1.0) -> None:
        self._counts[child] = self._counts.get(child, 0.0) + amount

    def observe(self, child: Any, value: float) -> None:
        tally = self._tallies.get(child)
        if tally is None:
            bounds = getattr(child, "_upper_bounds", None)
            if bounds is None or not hasattr(child, "_buckets") or not hasattr(child, "_sum"):
                child.observe(value)
                return
            tally = self._tallies[child] = ObservationTally(bounds)
        # ObservationTally.observe, inlined: several times per request.
        tally.counts[bisect.bisect_left(tally.bounds, value)] += 1
        tally.total += value

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, tally in self._tallies.items():
            tally.add_to(child)


class ObservationTally:
    """A histogram's observations not yet in its multiprocess file: a count per bucket and
    a sum, so its size stays fixed however many come (and while nothing takes them: metrics
    off). PendingSamples keeps one per histogram child; db.pool.Database keeps its
    connection waits in one, which Metrics.flush adds. Event loop only.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        """`bounds`: the buckets' upper bounds, +Inf last or implied (a histogram's own
        `_upper_bounds` have it)."""
        self.bounds = list(bounds) if bounds and bounds[-1] == math.inf else [*bounds, math.inf]
        self.counts = [0] * len(self.bounds)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le, as Histogram.observe
        self.total += value

    def add_to(self, histogram: Any) -> None:
        """Into a histogram's own values (a multiprocess file's: prometheus_client keeps
        them in `_buckets` and `_sum`), then start again at 0."""
        if not any(self.counts):
            return
        for index, count in enumerate(self.counts):
            if count:
                histogram._buckets[index].inc(count)
                self.counts[index] = 0
        histogram._sum.inc(self.total)
        self.total = 0.0


# --- the metrics ----------------------------------------------------------------------------
class Metrics:
    """All podserve metrics of this worker. Create it in the worker (after fork)."""

    def __init__(self) -> None:
        use_multiprocess_values()
        self.path = multiproc_dir()
        self.exemplars = ExemplarStore()
        self.registry = CollectorRegistry()
        if self.path is not None:
            self.exposition: CollectorRegistry = CollectorRegistry()
            self.exposition.register(_MultiProcessWithExemplars(self.path, self.exemplars))
        else:
            self.exposition = self.registry
        self._define(self.registry)
        self._cumulative: dict[str, float] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # Multiprocess mode: per-request samples are tallied and flushed (see module doc).
        self.pending = PendingSamples() if self.path is not None else None
        self.inflight_requests = 0  # written to the in-flight gauge with the flush
        # (model, version) -> Unix time, not yet written
        self._last_inference: dict[tuple[str, str], float] = {}
        self._batch_by_size: dict[tuple[tuple[str, str], int], tuple[Any, list[Any]]] = {}
        # The database's tallies (pool waits, shared feature lookups' waits), once refresh saw
        # them: flush adds each to its histogram.
        self._db_tallies: dict[str, tuple[ObservationTally, Histogram]] = {}

    def _define(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=r, multiprocess_mode="livesum")

        self.requests = Counter(
            "podserve_requests",
            "HTTP requests answered, by model, model version, route template and status",
            ["model", "version", "route", "status"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "podserve_request_duration_seconds",
            "Time from the request reaching the app to the end of the response",
            ["model", "version", "route", "status"], buckets=REQUEST_BUCKETS, registry=r,
        )  # fmt: skip
        self.phase_duration = Histogram(
            "podserve_phase_duration_seconds", "Time per request phase (parse, queue, infer, ...)",
            ["model", "version", "phase"], buckets=PHASE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "podserve_batch_size", "Rows per inference session run", ["model", "version"],
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_runs = Counter(
            "podserve_batch_runs", "Inference session runs, by the rows in the batch",
            ["model", "version", "batch_size"], registry=r,
        )  # fmt: skip
        self.batch_stage_seconds = Counter(
            "podserve_batch_stage_seconds",
            "Time of session runs by batch size and stage: input (feed or pre-processor), "
            "infer (ONNX Runtime), output (post-processor, split per request)",
            ["model", "version", "batch_size", "stage"], registry=r,
        )  # fmt: skip
        self.last_inference = Gauge(
            "podserve_last_inference_timestamp_seconds",
            "When the model's last inference session run ended (Unix time)",
            ["model", "version"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        self.rejections = Counter(
            "podserve_rejections", "Requests refused by admission control or deadlines",
            ["reason"], registry=r,
        )  # fmt: skip
        self.inference_errors = Counter(
            "podserve_inference_errors", "Requests whose inference failed with a server error",
            ["model"], registry=r,
        )  # fmt: skip
        self.batch_runs_terminated = Counter(
            "podserve_batch_runs_terminated",
            "Session runs ended early because every request of the batch had given up "
            "(deadline passed, client gone)",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.inflight = gauge("podserve_inflight_requests", "Requests being served (not scrapes)")
        self.body_bytes_held = gauge(
            "podserve_request_body_bytes_held",
            "Request-body bytes held (read and inflated): per worker, up to its "
            "PODSERVE_MAX_BODY_BYTES_IN_FLIGHT",
        )
        self.body_bytes_budget = gauge(
            "podserve_request_body_bytes_budget",
            "PODSERVE_MAX_BODY_BYTES_IN_FLIGHT of each worker, summed as the held bytes are",
        )
        self.queue_rows = gauge("podserve_queue_rows", "Rows waiting for an inference batch")
        self.pool_busy = gauge("podserve_pool_busy_threads", "Inference threads running a batch")
        self.pool_threads = gauge("podserve_pool_threads", "Inference threads")
        self.workers = gauge("podserve_workers", "Gunicorn workers serving (1 per worker)")
        self.db_pool_in_use = gauge("podserve_db_pool_in_use", "PostgreSQL connections in use")
        self.db_pool_size = gauge("podserve_db_pool_size", "PostgreSQL connections open")
        self.db_pool_waiting = gauge(
            "podserve_db_pool_waiting", "Requests waiting for a PostgreSQL connection"
        )
        self.db_pool_wait = Histogram(
            "podserve_db_pool_wait_seconds",
            "Time a request waited for a PostgreSQL connection (a free one of "
            "PODSERVE_DB_POOL_MAX, connecting included), given up or not",
            buckets=DB_POOL_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.feature_shared_wait = Histogram(
            "podserve_feature_shared_wait_seconds",
            "Time a feature lookup waited for another request's query in flight for the same "
            "entities instead of querying itself (no connection taken), given up or not",
            buckets=DB_POOL_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.log_buffer_rows = gauge(
            "podserve_prediction_log_buffer_rows", "Prediction-log rows waiting to be written"
        )
        self.log_buffer_bytes = gauge(
            "podserve_prediction_log_buffer_bytes",
            "Estimated memory of the prediction-log rows waiting to be written (the measure "
            "PODSERVE_PREDICTION_LOG_BUFFER_BYTES bounds)",
        )
        # Every worker reports the pod's spool directory as it last measured it (a segment
        # one worker spilled may be replayed by another): the largest is the pod's.
        self.log_spool_bytes = Gauge(
            "podserve_prediction_log_spool_bytes", "Bytes of prediction-log rows in the spool",
            registry=r, multiprocess_mode="livemax",
        )  # fmt: skip
        self.log_totals = _counters(PREDICTION_LOG_TOTALS, r)
        self.log_retention_totals = _counters(LOG_RETENTION_TOTALS, r)
        self.job_totals = _counters(JOB_TOTALS, r)
        # A count of the whole database, the same for every worker and pod: the pod shows
        # its workers' latest count (take max, not sum, over pods).
        self.jobs_pending = Gauge(
            "podserve_jobs_pending",
            "Jobs queued or running in the database (all pods), as last counted",
            ["status"], registry=r, multiprocess_mode="livemostrecent",
        )  # fmt: skip
        self._jobs_count_serial = 0
        self.open_connections = gauge(
            "podserve_open_connections", "Client connections open (HTTP keep-alive included)"
        )
        self.loop_lag = Histogram(
            "podserve_event_loop_lag_seconds",
            "How late the event loop ran a tick due every 0.1 s (busy, or not scheduled)",
            buckets=LOOP_LAG_BUCKETS, registry=r,
        )  # fmt: skip
        self.loop_stalls = Counter(
            "podserve_event_loop_stalls",
            "Event-loop stalls of PODSERVE_LOOP_STALL_S or more (logged with the loop's stack)",
            registry=r,
        )
        self.worker_stalls_seen = Counter(
            "podserve_worker_stalls_seen",
            "Stalls of another worker of the pod that this worker saw and took over that "
            "worker's new connections for (each other worker counts it)",
            registry=r,
        )
        self.connections_rebalanced = Counter(
            "podserve_connections_rebalanced",
            "Connections a worker above its share closed after a response, to even out workers",
            registry=r,
        )
        self._histograms = {
            id(self.request_duration): ("podserve_request_duration_seconds", REQUEST_BUCKETS),
            id(self.phase_duration): ("podserve_phase_duration_seconds", PHASE_BUCKETS),
        }
        for _, reason in REJECTION_REASONS:  # present at 0, so rate() works from the start
            self.rejections.labels(reason=reason)

    # --- per request (event loop) ----------------------------------------------------------
    def observe_request(
        self, model: tuple[str, str], route: str, status: int, seconds: float,
        trace_id: str | None,
    ) -> None:  # fmt: skip
        """`model`: (name, version), or ("", "") for a request that named no served model."""
        values = (model[0], model[1], route, str(status))
        self._count(self._child(self.requests, values))
        self._observe(self.request_duration, ("model", "version", "route", "status"), values,
                      seconds, trace_id)  # fmt: skip

    def observe_phases(
        self, model: tuple[str, str], durations: dict[str, float], trace_id: str | None
    ) -> None:
        name, version = model
        for phase, seconds in durations.items():
            self._observe(self.phase_duration, ("model", "version", "phase"),
                          (name, version, phase), seconds, trace_id)  # fmt: skip

    def _child(self, metric: Any, values: tuple[str, ...]) -> Any:
        """metric.labels(*values), cached: labels() validates and locks on every call."""
        key = (id(metric), values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _observe(
        self, histogram: Histogram, names: tuple[str, ...], values: tuple[str, ...],
        value: float, trace_id: str | None,
    ) -> None:  # fmt: skip
        child = self._child(histogram, values)
        if self.pending is None:  # one process: values in memory, exemplars built in
            if trace_id is None:
                child.observe(value)
            else:
                child.observe(value, exemplar={"trace_id": trace_id})
            return
        self.pending.observe(child, value)
        if trace_id is not None:
            name, bounds = self._histograms[id(histogram)]
            labels = dict(zip(names, values, strict=True))
            self.exemplars.record(name, bounds, labels, value, trace_id)

    def observe_batch(
        self, model: tuple[str, str], rows: int, ended_s: float,
        stages: tuple[float, float, float] | None = None,
    ) -> None:  # fmt: skip
        """One session run of (name, version); `stages`: seconds of each of BATCH_STAGES, when
        it succeeded."""
        self._last_inference[model] = ended_s  # a gauge write per flush, not per run
        child = self._child(self.batch_size, model)
        if self.pending is not None:
            self.pending.observe(child, rows)
        else:
            child.observe(rows)
        if stages is not None:
            runs, per_stage = self._batch_children(model, rows)
            self._count(runs)
            for child, seconds in zip(per_stage, stages, strict=True):
                self._count(child, seconds)

    def _batch_children(self, model: tuple[str, str], rows: int) -> tuple[Any, list[Any]]:
        """The run counter's and the stage counters' children for one batch size, cached."""
        key = (model, rows)
        children = self._batch_by_size.get(key)
        if children is None:
            size = str(rows)
            per_stage = [self.batch_stage_seconds.labels(*model, size, s) for s in BATCH_STAGES]
            children = self._batch_by_size[key] = (self.batch_runs.labels(*model, size), per_stage)
        return children

    def observe_loop_lag(self, seconds: float) -> None:
        if self.pending is not None:
            self.pending.observe(self.loop_lag, seconds)
        else:
            self.loop_lag.observe(seconds)

    def count_loop_stall(self) -> None:
        """From the watchdog thread: straight to the value (prometheus_client locks it)."""
        self.loop_stalls.inc()

    def count_rejection(self, reason: str) -> None:
        self._count(self._child(self.rejections, (reason,)))

    def count_inference_error(self, model: str) -> None:
        self._count(self._child(self.inference_errors, (model,)))

    def _count(self, child: Any, amount: float = 1.0) -> None:
        if self.pending is not None:
            self.pending.inc(child, amount)
        else:
            child.inc(amount)

    def flush(self) -> None:
        """Write this worker's pending samples and in-flight counts to its files."""
        self.inflight.set(self.inflight_requests)
        self.body_bytes_held.set(body_bytes_held())
        last, self._last_inference = self._last_inference, {}
        for model, ended_s in last.items():
            self._child(self.last_inference, model).set(ended_s)
        if self.pending is not None:
            self.pending.flush()
        for tally, histogram in self._db_tallies.values():
            tally.add_to(histogram)

    # --- sampled state (a task per worker) ------------------------------------------------
    def refresh(self, runtime: Any) -> None:
        """Write this worker's instantaneous state; read by the next scrape of any worker."""
        self.flush()
        self.body_bytes_budget.set(runtime.settings.body_bytes_in_flight_limit)
        self.queue_rows.set(runtime.budget.queued_rows)
        self.pool_busy.set(runtime.pool.busy)
        self.pool_threads.set(runtime.pool.capacity)
        self._refresh_database(runtime)
        self._refresh_jobs(runtime)
        self._refresh_batchers(runtime)
        self._refresh_connections()
        self.workers.set(1)  # last: a worker counts once its other gauges are written

    def _refresh_connections(self) -> None:
        balancer = connection_balance.active_balancer()  # None outside Gunicorn
        if balancer is None:
            return
        self.open_connections.set(balancer.open)
        self._advance("rebalanced", self.connections_rebalanced, balancer.closed_for_balance)
        self._advance("stalls_seen", self.worker_stalls_seen, balancer.stalls_seen)

    def _refresh_database(self, runtime: Any) -> None:
        """Duck-typed: `runtime.db` (db.services) exists only when PODSERVE_DATABASE_URL is set.

        Reads `db.database.pool` (asyncpg.Pool), `db.database.waiting`, `db.database.pool_waits`
        and `db.features.shared_waits` (ObservationTallies: flush adds them from then on) and
        `db.prediction_log`
        (rows_written, rows_spooled, rows_rejected, write_errors, buffer_depth, buffer_bytes,
        spool_bytes),
        and `db.log_retention` (rows_purged) in the worker that purges old rows.
        """
        services = getattr(runtime, "db", None)
        database = getattr(services, "database", None)
        pool = getattr(database, "pool", None)
        size = _call(pool, "get_size")
        if size is not None:
            self.db_pool_size.set(size)
            self.db_pool_in_use.set(size - (_call(pool, "get_idle_size") or 0))
        waiting = getattr(database, "waiting", None)
        if isinstance(waiting, int):
            self.db_pool_waiting.set(waiting)
        self._adopt("pool_waits", getattr(database, "pool_waits", None), self.db_pool_wait)
        features = getattr(services, "features", None)  # db.features.FeatureStore
        shared = getattr(features, "shared_waits", None)
        self._adopt("shared_waits", shared, self.feature_shared_wait)
        retention = getattr(services, "log_retention", None)  # db.log_retention.LogRetention
        if retention is not None:
            self._advance_all(retention, self.log_retention_totals)
        plog = getattr(services, "prediction_log", None)
        if plog is None:
            return
        for attr, gauge in (("buffer_depth", self.log_buffer_rows),
                            ("buffer_bytes", self.log_buffer_bytes),
                            ("spool_bytes", self.log_spool_bytes)):  # fmt: skip
            value = getattr(plog, attr, None)
            if isinstance(value, int | float):
                gauge.set(value)
        self._advance_all(plog, self.log_totals)

    def _adopt(self, key: str, tally: object, histogram: Histogram) -> None:
        """A tally of the database's that flush adds to `histogram` from now on."""
        adopted = self._db_tallies.get(key)
        if isinstance(tally, ObservationTally) and (adopted is None or adopted[0] is not tally):
            self._db_tallies[key] = (tally, histogram)
            tally.add_to(histogram)  # refresh flushed before this

    def _refresh_jobs(self, runtime: Any) -> None:
        """Duck-typed: `runtime.db.job_runner` (db.jobs.JobRunner) exists in workers that run
        jobs: its running totals, and `pending_counts` (the database's queued and running
        jobs, counted by the runner every PODSERVE_JOBS_COUNT_INTERVAL_S, never here: a
        scrape must not wait on the database), written when `pending_serial` says it is new,
        so that the gauge's time is the count's and the pod shows its latest count."""
        runner = getattr(getattr(runtime, "db", None), "job_runner", None)
        if runner is None:
            return
        self._advance_all(runner, self.job_totals)
        rows_written = self.log_totals["rows_written"]  # a job's row: stored with its result
        self._advance(
            "job_log_rows_written", rows_written, getattr(runner, "log_rows_written", None)
        )
        serial = getattr(runner, "pending_serial", 0)
        counts = getattr(runner, "pending_counts", None)
        if isinstance(counts, dict) and serial != self._jobs_count_serial:
            self._jobs_count_serial = serial
            for status, count in counts.items():
                self._child(self.jobs_pending, (status,)).set(count)

    def _refresh_batchers(self, runtime: Any) -> None:
        """Duck-typed: `runtime.batchers` ((model, version) -> batcher.Batcher), each with
        its running total `runs_terminated`; a model's series appears with its first one."""
        for model, batcher in getattr(runtime, "batchers", {}).items():
            total = getattr(batcher, "runs_terminated", 0)
            if total:
                child = self._child(self.batch_runs_terminated, model)
                self._advance(f"runs_terminated:{model}", child, total)

    def _advance_all(self, source: object, counters: dict[str, Counter]) -> None:
        """Each running total `source.<attribute>` into its counter."""
        for attr, counter in counters.items():
            self._advance(attr, counter, getattr(source, attr, None))

    def _advance(self, key: str, counter: Counter, total: float | None) -> None:
        """Turn an object's running total into counter increments."""
        if total is None:
            return
        delta = total - self._cumulative.get(key, 0)
        if delta > 0:
            counter.inc(delta)
        self._cumulative[key] = total

    async def refresh_forever(self, runtime: Any) -> None:
        while True:
            try:
                self.refresh(runtime)
            except Exception:  # a metrics bug must not stop the worker
                log.exception("metrics refresh failed")
            await asyncio.sleep(REFRESH_S)

    # --- exposition -------------------------------------------------------------------------
    def render(self, accept: str | None) -> tuple[bytes, str]:
        """Text format by default; OpenMetrics (with exemplars) when the scraper asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.exposition), content_type


def _call(obj: Any, method: str) -> int | None:
    fn = getattr(obj, method, None) if obj is not None else None
    if fn is None:
        return None
    with contextlib.suppress(Exception):
        return int(fn())
    return None
