"""A pod whose pools alone may open more connections than PostgreSQL accepts says so at start.

Past max_connections, connecting fails ("too many clients") under load: 503s that count
toward the breaker with a healthy database, and nothing in the logs said why beforehand.
"""

from __future__ import annotations

import logging

import pytest

import postgres
from podserve.db.services import DatabaseServices
from podserve.settings import Settings

WARNING = "PODSERVE_WORKERS x PODSERVE_DB_POOL_MAX exceeds"


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
