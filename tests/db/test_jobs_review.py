"""Durable jobs, the review's findings: leases per attempt, results that are large or refused,
SIGTERM during a long job, job metrics, work kept off the event loop, purging, claim cost.

Most tests run a JobRunner in this process against the module's PostgreSQL and a real
ServingRuntime (ONNX Runtime), so that they can hold an attempt at a chosen point; the
metrics test runs a real server.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import numpy as np
import orjson
import pytest
from job_harness import LEASE_S, job_body, job_harness, job_settings
from onnx import TensorProto, helper, numpy_helper

import postgres
from metrics_support import scrape
from model_builders import OPSET, affine_model, save, slow_model
from podserve import connection_balance
from podserve.db import jobs as jobs_module
from podserve.db.jobs import _CLAIM, JobRunner, JobStore
from podserve.db.pool import Database
from podserve.settings import Settings
from server_process import ServerProcess
from tcp_proxy import TcpProxy

TILE = 256  # the wide model: x [n, 64] -> y [n, 64 * TILE]


def _tile_model(width: int = 64, times: int = TILE) -> Any:
    """A result far larger than its request (Tile): cheap to compute, costly to store."""
    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "reps"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width * times])],
        [numpy_helper.from_array(np.array([1, times], np.int64), "reps")],
    )
    return helper.make_model(graph, opset_imports=OPSET)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("review-models")
    save(affine_model(2.0, 1.0), repo, "affine", 1)
    save(_tile_model(), repo, "wide", 1)
    save(slow_model(layers=240), repo, "slower", 1)  # ~10-50 ms of CPU per row
    return repo


@pytest.fixture(autouse=True)
def _empty_queue(db_url: str) -> None:
    """A runner claims whatever is queued: each test starts with no jobs."""
    postgres.query(db_url, "TRUNCATE podserve_jobs")


def _wide_rows(count: int) -> list[list[float]]:
    """Values with 4-5 digits, as real outputs have: ~8 bytes each in JSON."""
    rng = np.random.default_rng(7)
    return np.round(rng.random((count, 64)), 4).tolist()


@asynccontextmanager
async def _trigger(conn: asyncpg.Connection, body: str) -> AsyncIterator[None]:
    """A BEFORE UPDATE trigger on podserve_jobs running `body` when a result is stored."""
    await conn.execute(f"""
        CREATE FUNCTION review_on_result() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.result IS NOT NULL AND OLD.result IS NULL THEN {body} END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER review_on_result BEFORE UPDATE ON podserve_jobs
            FOR EACH ROW EXECUTE FUNCTION review_on_result();
    """)
    try:
        yield
    finally:
        await conn.execute("DROP TRIGGER review_on_result ON podserve_jobs")
        await conn.execute("DROP FUNCTION review_on_result()")


# --- 1. a lease lost while the worker lives -------------------------------------------------
def test_a_job_reclaimed_by_its_own_worker_keeps_the_live_attempts_lease(
    db_url: str, models: Path
) -> None:
    """Attempt 1 loses its lease (forced: what an outage longer than the lease leaves) and the
    same worker claims attempt 2. When attempt 1 ends it must not take attempt 2's lease
    entry with it: attempt 2 stays renewed for several leases and succeeds as attempt 2 (it
    used to expire, be claimed again, and so on until 'gave up')."""

    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models, jobs_concurrency=2, jobs_max_attempts=3) as h:
            gates = [asyncio.Event() for _ in range(6)]
            calls = [0]
            real_run = h.runtime.pool.run

            async def gated(fn: Any, *args: Any, priority: int) -> Any:
                gate = gates[calls[0]]  # the n-th inference is the n-th attempt
                calls[0] += 1
                await gate.wait()
                return await real_run(fn, *args, priority=priority)

            h.runtime.pool.run = gated  # type: ignore[method-assign]
            job = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]]), None)
            h.runner.start()
            await h.wait(job, lambda _: calls[0] == 1)
            deadline = time.monotonic() + 10
            while calls[0] < 2 and time.monotonic() < deadline:  # the renewer may win a round
                await h.conn.execute(
                    "UPDATE podserve_jobs SET lease_expires_at = now() - interval '1 ms' "
                    "WHERE id = $1 AND attempts = 1",
                    job,
                )
                await asyncio.sleep(0.05)
            gates[0].set()  # the stale attempt ends; its result is discarded
            while h.runner.results_discarded < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(3 * LEASE_S)  # attempt 2 still computing, for three leases
            held = await h.row(job)
            attempts_seen = calls[0]
            for gate in gates[1:]:
                gate.set()
            final = await h.finished(job)
            return {"held": dict(held), "seen": attempts_seen, "final": dict(final)}

    result = postgres.run(scenario())
    assert result["held"]["status"] == "running" and result["held"]["attempts"] == 2, result
    assert result["seen"] == 2, result
    assert (result["final"]["status"], result["final"]["attempts"]) == ("succeeded", 2), result
    assert result["final"]["error"] is None  # the lease-loss note is cleared by success


def test_a_renewal_extends_only_the_attempt_that_holds_the_lease(db_url: str) -> None:
    async def scenario() -> tuple[bool, bool]:
        settings = Settings(database_url=db_url, db_pool_min=0, jobs_lease_s=600)
        db = Database(settings)
        await db.open()
        store = JobStore(db, settings)
        try:
            job = await store.submit("affine", "1", b"{}", None)
            lease = "SELECT lease_expires_at FROM podserve_jobs WHERE id = $1::uuid"
            await asyncio.to_thread(
                postgres.query,
                db_url,
                "UPDATE podserve_jobs SET status = 'running', attempts = 2, lease_owner = 'me', "
                "lease_expires_at = now() + interval '1 second' WHERE id = $1::uuid",
                str(job),
            )
            before = await asyncio.to_thread(postgres.scalar, db_url, lease, str(job))
            await store.renew([(job, 1)], "me")  # a stale attempt: no effect
            stale = await asyncio.to_thread(postgres.scalar, db_url, lease, str(job))
            await store.renew([(job, 2)], "me")
            live = await asyncio.to_thread(postgres.scalar, db_url, lease, str(job))
            return stale == before, live > before
        finally:
            await db.close()

    assert postgres.run(scenario()) == (True, True)


# --- 2. large, refused and never-finished results --------------------------------------
def test_a_large_result_gets_a_store_timeout_to_match(db_url: str, models: Path) -> None:
    """The command timeout (0.5 s here, 2 s by default) is sized for lookups. A store that
    takes longer in proportion to the result (a trigger sleeps 1 s per 8 MiB here) still
    completes on the first attempt; it used to time out on every attempt."""

    async def scenario() -> dict[str, Any]:
        async with (
            job_harness(db_url, models, db_command_timeout_s=0.5) as h,
            _trigger(h.conn, "PERFORM pg_sleep(octet_length(NEW.result) / 8388608.0);"),
        ):
            job = await h.store.submit("wide", "1", job_body(_wide_rows(64)), None)
            h.runner.start()
            row = await h.finished(job, timeout=30)
            return {"row": dict(row), "size": len(row["result"] or b"")}

    result = postgres.run(scenario())
    row = result["row"]
    assert (row["status"], row["attempts"], row["error"]) == ("succeeded", 1, None), row
    assert result["size"] > 6 * 2**20  # the trigger slept 0.75 s or more: past 0.5 s


def test_a_result_the_database_refuses_fails_the_job_at_once(db_url: str, models: Path) -> None:
    async def scenario() -> dict[str, Any]:
        refuse = "RAISE EXCEPTION 'result refused here' USING ERRCODE = 'program_limit_exceeded';"
        async with job_harness(db_url, models) as h, _trigger(h.conn, refuse):
            job = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]]), None)
            h.runner.start()
            return dict(await h.finished(job))

    row = postgres.run(scenario())
    assert (row["status"], row["attempts"]) == ("failed", 1), row
    assert row["error"] == (
        "result could not be stored: ProgramLimitExceededError: result refused here"
    )


def test_a_store_that_times_out_is_retried_and_the_final_error_says_why(
    db_url: str, models: Path
) -> None:
    """PostgreSQL never finishes storing the result in time (a trigger sleeps 5 s): the store
    is cancelled there (its row lock released), the job is requeued with the reason, and the
    last attempt fails with it, instead of a bare 'gave up after 2 attempts'."""

    async def scenario() -> dict[str, Any]:
        async with (
            job_harness(db_url, models, db_command_timeout_s=0.3) as h,
            _trigger(h.conn, "PERFORM pg_sleep(5);"),
        ):
            job = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]]), None)
            h.runner.start()
            waiting = await h.wait(job, lambda r: r["status"] == "queued" and r["error"])
            final = await h.finished(job)
            return {"waiting": dict(waiting), "final": dict(final), "runner": h.runner}

    result = postgres.run(scenario())
    final = result["final"]
    cancelled = "TimeoutError: PostgreSQL cancelled the statement: canceling statement due to"
    assert (final["status"], final["attempts"]) == ("failed", 2), result
    assert final["error"].startswith(f"result could not be stored: {cancelled}"), final
    assert "PODSERVE_DB_COMMAND_TIMEOUT_S plus 1 s per 4 MiB" in final["error"]
    assert result["waiting"]["error"] == final["error"]  # shown while it waited to retry
    assert (result["runner"].jobs_requeued, result["runner"].jobs_failed) == (1, 1)


def test_a_job_out_of_attempts_names_the_last_error(db_url: str, models: Path) -> None:
    """Its last worker died holding it (at the maximum of 2 attempts): the final error says
    what went wrong, and attempts reads 2, not 3."""

    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models) as h:
            job = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]]), None)
            await h.conn.execute(
                "UPDATE podserve_jobs SET status = 'running', attempts = 2, "
                "lease_owner = 'dead-worker', lease_expires_at = now() - interval '1 s' "
                "WHERE id = $1",
                job,
            )
            h.runner.start()
            return dict(await h.finished(job))

    row = postgres.run(scenario())
    assert (row["status"], row["attempts"]) == ("failed", 2), row
    assert row["error"] == (
        "gave up after 2 attempts; last error: the lease of dead-worker ran out "
        "(worker gone or cut off)"
    )


def test_a_result_over_the_limit_fails_with_a_clear_error(db_url: str, models: Path) -> None:
    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models, jobs_max_result_bytes=1000) as h:
            job = await h.store.submit("affine", "1", job_body([[1, 2, 3, 4]] * 100), None)
            h.runner.start()
            return dict(await h.finished(job))

    row = postgres.run(scenario())
    assert (row["status"], row["attempts"]) == ("failed", 1), row
    assert "exceeds PODSERVE_JOBS_MAX_RESULT_BYTES (1000)" in row["error"]


# --- 3. shutdown during a long job ------------------------------------------------------------
def test_stop_terminates_a_long_job_inference_and_hands_the_job_back(
    db_url: str, models: Path
) -> None:
    """A job of several seconds of ONNX Runtime: stop() frees the inference thread at once
    (the pool's threads join quickly, so the worker can exit) and the job goes back to the
    queue, attempt refunded, not failed. Before, the thread computed on to the end."""

    async def scenario() -> dict[str, Any]:
        async with job_harness(db_url, models, jobs_lease_s=60) as h:
            rows = np.full((192, 256), 0.3).tolist()
            job = await h.store.submit("slower", "1", job_body(rows), None)
            h.runner.start()
            await h.wait(job, lambda r: r["status"] == "running")
            deadline = time.monotonic() + 10
            while h.runtime.pool.busy == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # inside the session run
            started = time.monotonic()
            await h.runner.stop()
            stopped_s = time.monotonic() - started
            joiner = threading.Thread(target=h.runtime.pool.shutdown, daemon=True)
            joiner.start()
            await asyncio.to_thread(joiner.join, 20)
            return {
                "stop_s": stopped_s,
                "free_s": time.monotonic() - started,
                "row": dict(await h.row(job)),
                "failed": h.runner.jobs_failed,
            }

    result = postgres.run(scenario())
    row = result["row"]
    assert (row["status"], row["attempts"], row["result"]) == ("queued", 0, None), result
    assert result["failed"] == 0, result
    assert result["free_s"] < 6.0, result  # before: the whole run, 13.6 s


# --- 4. job metrics ---------------------------------------------------------------------------
def test_job_metrics_are_exported_and_a_scrape_never_waits_on_the_database(
    db_url: str, proxy: TcpProxy, proxied_url: str, models: Path, tmp_path: Path
) -> None:
    env = postgres.server_env(
        proxied_url,
        tmp_path,
        PODSERVE_JOBS_POLL_MS="50",
        PODSERVE_JOBS_COUNT_INTERVAL_S="0.2",
        PODSERVE_JOBS_MAX_ATTEMPTS="2",
    )
    with (
        ServerProcess(models, workers=2, env=env) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        good = http.post("/v2/models/affine/jobs", content=job_body([[1, 2, 3, 4]]))
        bad = http.post("/v2/models/affine/jobs", json={"parameters": {"entity_ids": ["no"]}})
        assert (good.status_code, bad.status_code) == (202, 202), (good.text, bad.text)
        for response in (good, bad):
            deadline = time.monotonic() + 20
            while http.get(response.headers["location"]).json()["status"] in ("queued", "running"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        # Three jobs waiting (not yet due), counted by the database query.
        for _ in range(3):
            postgres.query(
                db_url,
                "INSERT INTO podserve_jobs (id, model, body, run_after) "
                "VALUES ($1, 'affine', '\\x7b7d', now() + interval '1 hour')",
                uuid.uuid4(),
            )
        # The gauge is counted every 0.2 s, the counters flushed once a second: wait for both.
        # The good job's prediction-log row is written with its result: counted too.
        wanted = {"queued": 3, "running": 0, "succeeded": 1, "failed": 1, "log_rows": 1}
        deadline = time.monotonic() + 10
        while True:
            metrics = scrape(server.url)
            seen = {
                "queued": metrics.value("podserve_jobs_pending", status="queued"),
                "running": metrics.value("podserve_jobs_pending", status="running"),
                "succeeded": metrics.value("podserve_jobs_succeeded_total"),
                "failed": metrics.value("podserve_jobs_failed_total"),
                "log_rows": metrics.value("podserve_prediction_log_rows_written_total"),
            }
            if seen == wanted:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)
        for name in ("requeued", "results_discarded", "claim_errors"):
            assert metrics.find(f"podserve_jobs_{name}_total"), name

        proxy.blackhole()  # the database hangs: a scrape must not notice
        try:
            time.sleep(0.5)
            started = time.monotonic()
            down = scrape(server.url)
            assert time.monotonic() - started < 2.0
            assert down.value("podserve_jobs_pending", status="queued") == 3  # the last count
        finally:
            proxy.restore()


# --- 5. bodies and results off the event loop -------------------------------------------------
def test_a_large_job_is_parsed_and_encoded_off_the_event_loop(
    db_url: str, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    threads: dict[str, list[str]] = {"parse": [], "encode": []}

    def recorded(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads[name].append(threading.current_thread().name)
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        jobs_module, "parse_infer_request", recorded("parse", jobs_module.parse_infer_request)
    )
    monkeypatch.setattr(
        jobs_module, "encode_infer_response", recorded("encode", jobs_module.encode_infer_response)
    )

    async def scenario() -> tuple[str, str]:
        async with job_harness(db_url, models) as h:
            body = job_body(_wide_rows(200))  # ~110 KiB of JSON, a ~6 MiB result
            assert len(body) > 64 * 1024
            job = await h.store.submit("wide", "1", body, None)
            h.runner.start()
            row = await h.finished(job)
            return row["status"], threading.current_thread().name

    status, loop_thread = postgres.run(scenario())
    assert status == "succeeded"
    assert threads["parse"] and loop_thread not in threads["parse"], threads
    assert threads["encode"] and loop_thread not in threads["encode"], threads


# --- 6. purging -------------------------------------------------------------------------------
def test_a_purge_pass_deletes_every_expired_job(db_url: str, models: Path) -> None:
    postgres.query(
        db_url,
        "INSERT INTO podserve_jobs (id, model, body, status, finished_at, expires_at) "
        "SELECT gen_random_uuid(), 'affine', '\\x7b7d', 'succeeded', now(), "
        "now() - interval '1 s' FROM generate_series(1, 2500)",
    )

    async def scenario() -> int:
        settings = job_settings(db_url, models)
        db = Database(settings)
        await db.open()
        try:
            runner = JobRunner(JobStore(db, settings), None, None, settings, None)  # type: ignore[arg-type]
            return await runner._purge_pass()
        finally:
            await db.close()

    assert postgres.run(scenario()) == 2500
    assert postgres.scalar(db_url, "SELECT count(*) FROM podserve_jobs") == 0


@pytest.mark.parametrize(("slot", "counts"), [(None, True), (0, True), (1, False)])
def test_one_worker_per_pod_counts_the_jobs(
    db_url: str, models: Path, monkeypatch: pytest.MonkeyPatch, slot: int | None, counts: bool
) -> None:
    """The count is of the whole database: every worker of every pod ran it."""
    monkeypatch.setattr(connection_balance, "own_slot", lambda: slot)

    async def scenario() -> set[str]:
        settings = job_settings(db_url, models, jobs_count_interval_s=15)
        db = Database(settings)
        await db.open()
        runner = JobRunner(JobStore(db, settings), None, None, settings, None)  # type: ignore[arg-type]
        try:
            runner.start()
            return {task.get_name() for task in runner.tasks}
        finally:
            await runner.stop()
            await db.close()

    assert ("jobs-count" in postgres.run(scenario())) is counts


# --- 7. claiming: same jobs, same order, cost independent of the backlog ------------------
_ROWS = """
INSERT INTO podserve_jobs (id, model, body, status, run_after, created_at, lease_owner,
                           lease_expires_at, attempts, expires_at)
VALUES ($1, 'affine', '\\x7b7d', $2, now() + make_interval(secs => $3), now() - interval '1 h',
        CASE WHEN $2 = 'running' THEN 'other' END,
        CASE WHEN $2 = 'running' THEN now() + make_interval(secs => $4) END,
        CASE WHEN $2 = 'queued' THEN 0 ELSE 1 END,
        CASE WHEN $2 = 'succeeded' THEN now() + interval '1 h' END)
"""


def test_the_claim_takes_due_and_orphaned_jobs_in_order_skipping_locked_ones(db_url: str) -> None:
    names = ["due", "orphaned", "leased", "later", "done", "due_too"]
    ids = {name: uuid.uuid4() for name in names}
    specs = {  # status, run_after from now (s), lease from now (s)
        "due": ("queued", -30, 0),
        "orphaned": ("running", -60, -1),  # its lease ran out: claimable, and first
        "leased": ("running", -90, 30),
        "later": ("queued", 3600, 0),
        "done": ("succeeded", -120, 0),
        "due_too": ("queued", -10, 0),
    }
    for name, (status, run_after, lease) in specs.items():
        postgres.query(db_url, _ROWS, ids[name], status, float(run_after), float(lease))

    async def scenario() -> tuple[list[uuid.UUID], list[uuid.UUID], list[str | None]]:
        settings = Settings(database_url=db_url, db_pool_min=0)
        db = Database(settings)
        await db.open()
        locker = await asyncpg.connect(db_url)
        try:
            store = JobStore(db, settings)
            async with locker.transaction():  # another worker is claiming "orphaned"
                await locker.execute(
                    "SELECT 1 FROM podserve_jobs WHERE id = $1 FOR UPDATE", ids["orphaned"]
                )
                first = await store.claim("me", limit=1)
            rest = await store.claim("me", limit=10)
            return [j.id for j in first], [j.id for j in rest], [j.last_error for j in rest]
        finally:
            await locker.close()
            await db.close()

    first, rest, errors = postgres.run(scenario())
    assert first == [ids["due"]]  # the locked one skipped, not waited for, not a miss
    assert rest == [ids["orphaned"], ids["due_too"]]
    assert errors == ["the lease of other ran out (worker gone or cut off)", None]


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def test_the_claim_walks_an_index_whatever_the_backlog(pg_server: postgres.PostgresServer) -> None:
    """40k jobs queued, 40k finished (kept for their TTL), 300 running: the claim reads a few
    hundred index entries, where it used to gather and sort all 40k candidates."""
    with postgres.fresh_database(pg_server.admin_url) as url:
        postgres.migrate(url)
        postgres.query(
            url,
            "INSERT INTO podserve_jobs (id, model, body, status, finished_at, expires_at) "
            "SELECT gen_random_uuid(), 'affine', '\\x7b7d', 'succeeded', now(), "
            "now() + interval '1 day' FROM generate_series(1, 40000)",
        )
        postgres.query(
            url,
            "INSERT INTO podserve_jobs (id, model, body, status, run_after, lease_owner, "
            "lease_expires_at) SELECT gen_random_uuid(), 'affine', '\\x7b7d', 'running', "
            "now() - interval '1 h', 'w', now() + interval '1 h' FROM generate_series(1, 300)",
        )
        postgres.query(
            url,
            "INSERT INTO podserve_jobs (id, model, body) "
            "SELECT gen_random_uuid(), 'affine', '\\x7b7d' FROM generate_series(1, 40000)",
        )
        postgres.query(url, "ANALYZE podserve_jobs")

        async def explain() -> dict[str, Any]:
            conn = await asyncpg.connect(url)
            try:
                async with conn.transaction():
                    plan = await conn.fetchval(
                        f"EXPLAIN (ANALYZE, FORMAT JSON) {_CLAIM}", 1, "me", 30.0
                    )
                    raise _Rollback(plan)
            except _Rollback as done:
                return orjson.loads(done.plan)[0]["Plan"]
            finally:
                await conn.close()

        nodes = list(_plan_nodes(postgres.run(explain())))
    types = [node["Node Type"] for node in nodes]
    scans = [n for n in nodes if n.get("Index Name") == "podserve_jobs_claimable"]
    assert "Sort" not in types and scans, types
    visited = scans[0]["Actual Rows"] + scans[0].get("Rows Removed by Filter", 0)
    assert visited <= 301 + 10, scans[0]


class _Rollback(Exception):
    def __init__(self, plan: str) -> None:
        self.plan = plan
