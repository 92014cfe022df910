"""A pod whose pools alone may open more connections than PostgreSQL accepts says so at start.

Past max_connections, connecting fails ("too many clients") under load: 503s that count
toward the breaker with a healthy database, and nothing in the logs said why beforehand.
"""

from __future__ import annotations

import logging

import asyncpg
import pytest

import postgres
from podserve.db.services import CONNECTION_LIMITS_SQL, DatabaseServices
from podserve.settings import Settings

WARNING = "PODSERVE_WORKERS x PODSERVE_DB_POOL_MAX exceeds"
# The settings that keep slots from an ordinary role; reserved_connections exists from 16 on.
RESERVED = ("superuser_reserved_connections", "reserved_connections")


def _ordinary_role_slots(url: str) -> int:
    """max_connections less every reserved setting this server has (pg_settings lists only
    those it knows), worked out apart from the query under test."""
    sql = "SELECT name, setting::int AS n FROM pg_settings WHERE name = ANY($1::text[])"
    rows = postgres.query(url, sql, ["max_connections", *RESERVED])
    settings = {row["name"]: row["n"] for row in rows}
    return settings["max_connections"] - sum(settings.get(name, 0) for name in RESERVED)


def _start_and_stop(settings: Settings) -> None:
    async def scenario() -> None:
        services = DatabaseServices(settings, runtime=None)  # type: ignore[arg-type]
        await services.start()
        await services.close()

    postgres.run(scenario())


@pytest.mark.parametrize(("workers", "pool_max", "warned"), [(4, 1000, True), (2, 4, False)])
def test_a_pool_budget_past_max_connections_is_logged(
    db_url: str, caplog: pytest.LogCaptureFixture, workers: int, pool_max: int, warned: bool
) -> None:
    settings = Settings(database_url=db_url, workers=workers, db_pool_min=0,
                        db_pool_max=pool_max, prediction_log=False, jobs_enabled=False,
                        prediction_log_retention_s=0)  # fmt: skip
    max_connections = postgres.scalar(db_url, "SELECT current_setting('max_connections')::int")
    assert (workers * pool_max > max_connections) == warned  # the premise, on this server
    with caplog.at_level(logging.WARNING, logger="podserve.db.services"):
        _start_and_stop(settings)
    records = [r for r in caplog.records if WARNING in r.getMessage()]
    assert bool(records) == warned, [r.getMessage() for r in caplog.records]
    if warned:
        assert records[0].connections == workers * pool_max  # type: ignore[attr-defined]


def test_the_limits_query_counts_every_reserved_setting_this_server_has(db_url: str) -> None:
    """PostgreSQL 16 added reserved_connections (kept for pg_use_reserved_connections); before
    16 there is no such setting, and asking for it plainly is an error: the query must run on
    both, and on 16+ leave those slots out too."""
    version = postgres.scalar(db_url, "SELECT current_setting('server_version_num')::int")
    if version < 160000:  # the premise on this server: the setting is missing, not 0
        with pytest.raises(asyncpg.UndefinedObjectError):
            postgres.scalar(db_url, "SELECT current_setting('reserved_connections')")
    row = postgres.query(db_url, CONNECTION_LIMITS_SQL)[0]
    assert row["server"] == _ordinary_role_slots(db_url)
    assert row["db"] == -1 and row["role"] == -1  # none set on the test database and role


@pytest.mark.parametrize(("over", "warned"), [(0, False), (1, True)])
def test_the_warning_starts_one_connection_past_what_an_ordinary_role_may_open(
    db_url: str, caplog: pytest.LogCaptureFixture, over: int, warned: bool
) -> None:
    """One worker whose pool may open every slot an ordinary role gets: no warning; one more:
    the warning (on 16+ with reserved_connections > 0, the old query told it too late)."""
    pool_max = _ordinary_role_slots(db_url) + over
    settings = Settings(database_url=db_url, workers=1, db_pool_min=0, db_pool_max=pool_max,
                        prediction_log=False, jobs_enabled=False,
                        prediction_log_retention_s=0)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="podserve.db.services"):
        _start_and_stop(settings)
    records = [r for r in caplog.records if WARNING in r.getMessage()]
    assert bool(records) == warned, [r.getMessage() for r in caplog.records]
