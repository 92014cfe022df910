"""Prediction-log rows of the affine model, and a running PredictionLog, for tests that write
them to PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from podserve.db.pool import Database
from podserve.db.prediction_log import PredictionLog, make_row
from podserve.db.spool import Spool
from podserve.settings import Settings


def affine_rows(prefix: str, count: int) -> list[list[Any]]:
    """`count` rows whose client request ids are `prefix0`, `prefix1`, ... (to count them)."""
    tensor = {"x": np.ones((1, 4), np.float32)}
    return [
        make_row(
            str(uuid.uuid4()),
            f"{prefix}{i}",
            "affine",
            "1",
            tensor,
            tensor,
            {"infer": 0.001},
            None,
            "digest",
        )
        for i in range(count)
    ]


def log_settings(url: str, spool: Path, **knobs: Any) -> Settings:
    """Small batches, a fast flush and short timeouts (each of which `knobs` may change): a
    test sees each pass quickly."""
    defaults: dict[str, Any] = {
        "prediction_log_batch_rows": 10,
        "prediction_log_flush_ms": 20,
        "prediction_log_max_backoff_s": 0.2,
        "db_connect_timeout_s": 0.5,
        "db_command_timeout_s": 0.5,
    }
    return Settings(database_url=url, spool_dir=spool, db_pool_min=0, **(defaults | knobs))


@contextlib.asynccontextmanager
async def running_log(settings: Settings, spool_dir: Path) -> AsyncIterator[PredictionLog]:
    """A started PredictionLog over `spool_dir` and its database, closed after the block."""
    db = Database(settings)
    await db.open()
    plog = PredictionLog(db, Spool(spool_dir), settings)
    await plog.start()
    try:
        yield plog
    finally:
        await asyncio.wait_for(plog.close(), 10)
        await db.close()


async def until(check: Any, timeout: float = 10.0) -> bool:
    """Whether `check()` came true within `timeout` seconds (polled on the event loop)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())
