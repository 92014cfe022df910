"""With PostgreSQL: the `log` phase span, asyncpg spans, trace ids in the prediction log, and
the prediction-log and pool metrics, on real Gunicorn with 2 workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from otlp_receiver import OtlpReceiver, ReceivedSpan

import postgres
from metrics_support import Scrape, scrape
from server_process import ServerProcess

AFFINE = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
INFER_SPAN = "POST /v2/models/{model_name}/infer"
REQUESTS = 20


@pytest.fixture(scope="module")
def db_url(pg_server: postgres.PostgresServer) -> Iterator[str]:
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        yield url


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def server(
    model_repo: Path, db_url: str, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "PODSERVE_DATABASE_URL": db_url,
        "PODSERVE_SPOOL_DIR": str(tmp_path_factory.mktemp("spool")),
        "PODSERVE_PREDICTION_LOG_FLUSH_MS": "50",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "PODSERVE_TRACING_ENABLED": "true",
    }
    with ServerProcess(model_repo, workers=2, env=env) as proc:
        yield proc


def _wait_for_metrics(url: str, ready: Callable[[Scrape], bool], timeout: float = 20.0) -> Scrape:
    deadline = time.monotonic() + timeout
    result = scrape(url)
    while not ready(result):
        assert time.monotonic() < deadline, "metrics never matched"
        time.sleep(0.2)
        result = scrape(url)
    return result


def test_prediction_log_rows_carry_trace_ids_and_are_counted(
    server: ServerProcess, db_url: str, receiver: OtlpReceiver
) -> None:
    trace_ids: set[str] = set()
    workers: set[str] = set()
    for _ in range(REQUESTS):
        response = httpx.post(f"{server.url}/v2/models/affine/infer", json=AFFINE, timeout=30)
        assert response.status_code == 200, response.text
        trace_ids.add(response.headers["x-trace-id"])
        workers.add(response.headers["x-podserve-worker"])
    assert len(trace_ids) == REQUESTS and len(workers) == 2

    written = "podserve_prediction_log_rows_written_total"
    metrics = _wait_for_metrics(server.url, lambda s: s.value(written) >= REQUESTS)
    assert metrics.value(written) == REQUESTS  # summed over both workers, exactly
    assert metrics.value("podserve_prediction_log_rows_spooled_total") == 0
    assert metrics.value("podserve_prediction_log_write_errors_total") == 0
    assert metrics.value("podserve_db_pool_size") >= 1
    assert metrics.value("podserve_phase_duration_seconds_count", model="affine",
                         phase="log") == REQUESTS  # fmt: skip

    rows = postgres.query(db_url, "SELECT trace_id FROM podserve_prediction_log")
    assert {row["trace_id"] for row in rows} == trace_ids

    def arrived(spans: list[ReceivedSpan]) -> bool:
        logged = {s.trace_id for s in spans if s.name == "log"}
        served = {s.trace_id for s in spans if s.name == INFER_SPAN}  # may come in a later export
        return trace_ids <= logged and trace_ids <= served and any(_is_query(s) for s in spans)

    spans = receiver.wait_for(arrived)
    requests = {s.trace_id: s for s in spans if s.name == INFER_SPAN and s.trace_id in trace_ids}
    for span in spans:
        if span.name == "log" and span.trace_id in trace_ids:
            assert span.parent_span_id == requests[span.trace_id].span_id
            assert span.attributes["podserve.model"] == "affine"
    # Background queries: the log's statements are one trace under its write span, and the
    # jobs poller's claims (every poll, per worker) make no lone one-span traces.
    by_id = {s.span_id: s for s in spans}
    queries = [s for s in spans if _is_query(s)]
    assert all(s.parent_span_id for s in queries), [s.name for s in queries if not s.parent_span_id]
    writes = [by_id[s.parent_span_id] for s in queries if s.parent_span_id in by_id]
    assert any(w.name == "prediction_log.write" and not w.parent_span_id for w in writes)


def test_a_job_attempt_is_one_trace_of_its_phases_and_queries(
    server: ServerProcess, db_url: str, receiver: OtlpReceiver
) -> None:
    """A job's run was untraced: its feature lookup and result store (asyncpg spans) were
    dropped as lone queries, and its prediction-log row had no trace id to look up."""
    body = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1] * 8}]}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        good = http.post("/v2/models/affine/jobs", json=body)
        bad = http.post("/v2/models/affine/jobs", json={"parameters": {"entity_ids": ["no"]}})
        assert (good.status_code, bad.status_code) == (202, 202), (good.text, bad.text)
        deadline = time.monotonic() + 20
        for response in (good, bad):
            while http.get(response.headers["location"]).json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline, "jobs never finished"
                time.sleep(0.05)
    good_id, bad_id = good.json()["id"], bad.json()["id"]

    def runs(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        return {
            s.attributes["podserve.job.id"]: s
            for s in spans
            if s.name == "job.run" and s.attributes.get("podserve.job.id") in (good_id, bad_id)
        }

    def arrived(spans: list[ReceivedSpan]) -> bool:
        done = runs(spans)
        return len(done) == 2 and any(s.parent_span_id == done[good_id].span_id for s in spans)

    spans = receiver.wait_for(arrived)
    run, failed = runs(spans)[good_id], runs(spans)[bad_id]
    assert not run.parent_span_id and run.attributes["podserve.model"] == "affine"
    assert run.attributes["podserve.job.outcome"] == "succeeded"
    assert run.attributes["podserve.rows"] == 2 and run.attributes["podserve.job.attempt"] == 1
    assert failed.attributes["podserve.job.outcome"] == "failed"
    assert failed.status_code == 2  # STATUS_CODE_ERROR
    children = [s for s in spans if s.parent_span_id == run.span_id]
    assert "infer" in {s.name for s in children}
    assert any(_is_query(s) for s in children)  # the result's store
    logged = postgres.query(
        db_url, "SELECT trace_id FROM podserve_prediction_log WHERE request_id = $1", good_id
    )
    assert [row["trace_id"] for row in logged] == [run.trace_id]


def _is_query(span: ReceivedSpan) -> bool:
    """An asyncpg instrumentation span (the prediction-log writer's COPY/INSERT)."""
    return span.attributes.get("db.system") == "postgresql"


def test_a_recycled_workers_last_log_rows_are_counted(
    model_repo: Path, pg_server: postgres.PostgresServer, tmp_path: Path
) -> None:
    """Each worker exits after ~20 requests: its prediction log's last write, made while it
    drains (after the metrics refresher's last pass), was never counted (~6-8 rows short per
    recycle), where the README says a recycled worker's counts stay in the totals."""
    sent = 120
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        env = {
            "PODSERVE_DATABASE_URL": url,
            "PODSERVE_SPOOL_DIR": str(tmp_path / "spool"),
            "PODSERVE_MAX_REQUESTS": "20",
        }
        with ServerProcess(model_repo, workers=2, env=env) as proc:
            for _ in range(sent):
                response = httpx.post(f"{proc.url}/v2/models/affine/infer", json=AFFINE, timeout=30)
                assert response.status_code == 200, response.text
            written = "podserve_prediction_log_rows_written_total"
            metrics = _wait_for_metrics(proc.url, lambda s: s.value(written) >= sent)
            rows = postgres.query(url, "SELECT count(*) AS n FROM podserve_prediction_log")
            assert proc.logs().count("Booting worker") > 2  # workers did recycle
    assert metrics.value(written) == sent
    assert rows[0]["n"] == sent
