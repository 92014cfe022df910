"""Prediction-log retention (PODSERVE_PREDICTION_LOG_RETENTION_S): rows older than it are
deleted in batches, by one purger at a time, through the existing (model, logged_at) index."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

import postgres
from metrics_support import scrape
from podserve.db import log_retention
from podserve.db.log_retention import LOCK_KEY, LogRetention
from podserve.db.pool import Database
from podserve.settings import Settings
from server_process import ServerProcess
from tcp_proxy import TcpProxy

DAY_S = 86_400.0
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
PURGED = "podserve_prediction_log_rows_purged_total"

_INSERT = """
INSERT INTO podserve_prediction_log
    (request_id, client_request_id, model, model_version, outputs, timings_ms, logged_at)
SELECT gen_random_uuid(), $1 || i, $2, '1', '{}', '{}', now() - make_interval(secs => $3)
FROM generate_series(1, $4) AS i
"""


@pytest.fixture
def url(pg_server: postgres.PostgresServer) -> Iterator[str]:
    """A fresh, migrated database per test: a pass deletes every old row it finds, so the
    counts of one test must not see another's rows."""
    with postgres.fresh_database(pg_server.admin_url) as fresh:
        postgres.migrate(fresh)
        yield fresh


def _insert(url: str, tag: str, model: str, age_s: float, count: int) -> None:
    postgres.query(url, _INSERT, f"{tag}-", model, age_s, count)


def _count(url: str, tag: str) -> int:
    return postgres.scalar(
        url,
        "SELECT count(*) FROM podserve_prediction_log WHERE client_request_id LIKE $1",
        f"{tag}-%",
    )


def _settings(url: str, **knobs: object) -> Settings:
    return Settings(
        database_url=url,
        db_pool_min=0,
        prediction_log_retention_s=DAY_S,
        **{"db_connect_timeout_s": 0.5, "db_command_timeout_s": 2.0, **knobs},
    )


def _seed(url: str, run: str) -> int:
    """Old rows of three models (one of them with only old rows) and fresh rows of two:
    returns how many are old."""
    _insert(url, f"{run}-old-a", "affine", 2 * DAY_S, 2500)
    _insert(url, f"{run}-old-b", "other", 3 * DAY_S, 700)
    _insert(url, f"{run}-old-c", "gone", DAY_S + 60, 30)
    _insert(url, f"{run}-new-a", "affine", 60, 40)
    _insert(url, f"{run}-new-b", "other", DAY_S - 600, 25)  # near the cutoff, inside it
    return 2500 + 700 + 30


def test_old_rows_go_fresh_rows_stay(url: str) -> None:
    run = uuid.uuid4().hex[:8]
    old = _seed(url, run)

    async def scenario() -> tuple[int | None, int | None, int, int]:
        db = Database(_settings(url))
        await db.open()
        purger = LogRetention(db, _settings(url))
        purger.batch_rows = 1000  # several batches per model
        try:
            first = await purger.purge_pass()
            second = await purger.purge_pass()  # nothing left: a cheap no-op
            return first, second, purger.rows_purged, purger.passes
        finally:
            await db.close()

    first, second, counted, passes = postgres.run(scenario())
    assert (first, second, counted, passes) == (old, 0, old, 2)
    assert _count(url, f"{run}-old") == 0
    assert _count(url, f"{run}-new-a") == 40 and _count(url, f"{run}-new-b") == 25


def test_a_purger_skips_while_another_holds_the_lock(url: str) -> None:
    """One purger at a time: with the advisory lock taken (as a purger in another pod has it
    during each batch), a pass deletes nothing and says so; once free, it deletes."""
    run = uuid.uuid4().hex[:8]
    _insert(url, f"{run}-old", "locked", 2 * DAY_S, 300)

    async def scenario() -> dict[str, object]:
        db = Database(_settings(url))
        await db.open()
        purger = LogRetention(db, _settings(url))
        holder = await asyncpg.connect(url)
        try:
            async with holder.transaction():
                assert await holder.fetchval("SELECT pg_try_advisory_xact_lock($1)", LOCK_KEY)
                skipped = await purger.purge_pass()
                left = await holder.fetchval(
                    "SELECT count(*) FROM podserve_prediction_log WHERE model = 'locked'"
                )
            done = await purger.purge_pass()  # the holder committed: the lock is free
            return {
                "skipped": skipped,
                "left": left,
                "done": done,
                "passes_skipped": purger.passes_skipped,
            }
        finally:
            await holder.close()
            await db.close()

    stats = postgres.run(scenario())
    assert stats == {"skipped": None, "left": 300, "done": 300, "passes_skipped": 1}
    assert _count(url, f"{run}-old") == 0


def test_two_purgers_at_once_delete_each_row_once(url: str) -> None:
    """Two workers' passes at the same moment: the lock lets one batch run at a time, a
    purger that finds it taken ends its pass, and the rows deleted add up exactly."""
    run = uuid.uuid4().hex[:8]
    old = _seed(url, run)

    async def scenario() -> list[tuple[int | None, int]]:
        dbs = [Database(_settings(url)) for _ in range(2)]
        for db in dbs:
            await db.open()
        purgers = [LogRetention(db, _settings(url)) for db in dbs]
        for purger in purgers:
            purger.batch_rows = 200
        try:
            results = await asyncio.gather(*(p.purge_pass() for p in purgers))
            # A purger that ended early (the other had the lock) finishes on its next pass.
            while any(await asyncio.gather(*(p.purge_pass() for p in purgers))):
                pass
            return [(result, p.rows_purged) for result, p in zip(results, purgers, strict=True)]
        finally:
            for db in dbs:
                await db.close()

    results = postgres.run(scenario())
    assert sum(purged for _, purged in results) == old
    assert _count(url, f"{run}-old") == 0
    assert _count(url, f"{run}-new") == 65


def test_a_failed_pass_is_logged_and_retried(
    url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Database unreachable: the pass fails, is logged, and the next one deletes; the task
    keeps running."""
    run = uuid.uuid4().hex[:8]
    _insert(url, f"{run}-old", "retried", 2 * DAY_S, 50)

    async def scenario(proxy: TcpProxy) -> dict[str, object]:
        settings = _settings(postgres.with_port(url, proxy.port))
        db = Database(settings)
        await db.open()
        purger = LogRetention(db, settings)
        purger.interval_s = 0.1
        proxy.cut()
        purger.start()
        try:
            for _ in range(100):
                if purger.errors >= 2:
                    break
                await asyncio.sleep(0.05)
            errors = purger.errors
            proxy.restore()
            for _ in range(200):
                if purger.rows_purged >= 50:
                    break
                await asyncio.sleep(0.05)
            alive = purger._task is not None and not purger._task.done()
        finally:
            await purger.stop()
            await db.close()
        return {"errors": errors, "purged": purger.rows_purged, "alive": alive}

    with (
        caplog.at_level(logging.INFO, logger=log_retention.__name__),
        TcpProxy(*postgres.host_port(url)) as proxy,
    ):
        stats = postgres.run(scenario(proxy))
    assert stats["errors"] >= 2 and stats["purged"] == 50 and stats["alive"], stats
    messages = [record.getMessage() for record in caplog.records]
    assert any("cannot purge old prediction-log rows now" in m for m in messages)
    assert any("old prediction-log rows purged" in m for m in messages)
    assert _count(url, f"{run}-old") == 0


def test_the_batch_delete_uses_the_model_time_index(url: str) -> None:
    """No index of its own: the (model, logged_at) index finds the batch, a TID scan
    deletes it, whatever the planner thinks of the table (generic plan, as prepared)."""
    _insert(url, "plan", "planned", 2 * DAY_S, 2000)
    postgres.query(url, "ANALYZE podserve_prediction_log")

    async def explain() -> str:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE purge_batch(text, timestamptz, int) AS {_delete_sql()}")
            async with conn.transaction():
                rows = await conn.fetch(
                    "EXPLAIN (COSTS OFF) "
                    "EXECUTE purge_batch('planned', now() - interval '1 day', 1000)"
                )
                plan = "\n".join(row[0] for row in rows)
                raise _Rollback(plan)
        except _Rollback as done:
            return done.plan
        finally:
            await conn.close()

    plan = postgres.run(explain())
    assert "Index Scan using podserve_prediction_log_model_time" in plan, plan
    assert "Tid Scan" in plan and "Seq Scan" not in plan, plan


class _Rollback(Exception):
    def __init__(self, plan: str) -> None:
        self.plan = plan


def _delete_sql() -> str:
    return log_retention._DELETE


@pytest.mark.parametrize("value", ["-1", "inf", "nan"])
def test_the_retention_must_be_finite_and_not_negative(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PODSERVE_PREDICTION_LOG_RETENTION_S", value)
    with pytest.raises(ValidationError, match="prediction_log_retention_s"):
        Settings()


def test_retention_is_off_by_default() -> None:
    assert Settings().prediction_log_retention_s == 0


# --- end to end: a real server with retention on ---------------------------------------------
@pytest.fixture
def retention_server(
    url: str, db_models: Path, tmp_path: Path
) -> Iterator[tuple[ServerProcess, str]]:
    run = uuid.uuid4().hex[:8]
    _insert(url, f"{run}-old", "affine", 2 * DAY_S, 3000)
    _insert(url, f"{run}-old", "slow", 40, 20)  # older than the 30 s retention as well
    # 30 s: passes every 3 s (a tenth), the first 1.5-3 s after start.
    env = postgres.server_env(
        url, tmp_path, PODSERVE_PREDICTION_LOG_RETENTION_S="30", PODSERVE_LOG_LEVEL="info"
    )
    with ServerProcess(db_models, workers=2, env=env) as server:
        yield server, run


def test_a_server_purges_old_rows_and_counts_them(
    retention_server: tuple[ServerProcess, str], url: str
) -> None:
    server, run = retention_server
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(20):
            response = http.post(
                "/v2/models/affine/infer", json=BODY, headers={"x-request-id": f"{run}-new-{i}"}
            )
            assert response.status_code == 200
    deadline = time.monotonic() + 30
    while _count(url, f"{run}-old") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _count(url, f"{run}-old") == 0, server.logs()[-3000:]
    assert _count(url, f"{run}-new") == 20  # answered seconds ago: kept
    deadline = time.monotonic() + 10
    while (purged := scrape(server.url).value(PURGED)) < 3020 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert purged == 3020  # the one purging worker's count, whichever worker answers
    logs = server.logs()
    assert "old prediction-log rows purged" in logs, logs[-3000:]
