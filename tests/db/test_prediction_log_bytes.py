"""The prediction log's byte bound (PODSERVE_PREDICTION_LOG_BUFFER_BYTES): big rows spill to
the spool, and are refused, long before the row bound; the journal does not keep an outage's
rows on disk after they are durable."""

from __future__ import annotations

import asyncio
import errno
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import postgres
from metrics_support import scrape
from podserve.db.journal import Journal
from podserve.db.pool import Database
from podserve.db.prediction_log import ROW_OVERHEAD_BYTES, PredictionLog, row_bytes
from podserve.db.spool import Spool
from podserve.errors import ServiceUnavailable
from podserve.settings import Settings
from server_process import ServerProcess
from tcp_proxy import TcpProxy

CONTENT = 10_000  # characters of each test row's inputs


def _row(prefix: str, i: int) -> list[Any]:
    """A row as make_row builds it (inputs=full), of a known size."""
    client_id = f"{prefix}{i:04d}"
    return [
        str(uuid.uuid4()),
        client_id,
        "affine",
        "1",
        '"' + "x" * (CONTENT - 2) + '"',  # inputs: a JSON string of CONTENT characters
        None,
        "[]",
        "{}",
        None,
        time.time(),
    ]


def _size(prefix: str) -> int:
    return ROW_OVERHEAD_BYTES + CONTENT + len("[]") + len(f"{prefix}0000")


def test_row_bytes_counts_the_text_fields() -> None:
    assert row_bytes(_row("size-", 1)) == _size("size-")
    digest_row = ["id", None, "m", "1", None, "d" * 64, "[1]", "{}", None, 0.0]
    assert row_bytes(digest_row) == ROW_OVERHEAD_BYTES + len("[1]")


def _count(url: str, prefix: str) -> int:
    return postgres.scalar(
        url,
        "SELECT count(*) FROM podserve_prediction_log WHERE client_request_id LIKE $1",
        f"{prefix}%",
    )


class _FullDisk:
    """Spool.write on a full volume (ENOSPC) while `full` is set: what the spiller sees."""

    def __init__(self, spool: Spool) -> None:
        self.write = spool.write
        self.full = False

    def __call__(self, rows: list[Any]) -> Path:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.write(rows)


def test_big_rows_spill_and_are_refused_by_bytes_and_the_count_returns_to_zero(
    db_url: str, tmp_path: Path
) -> None:
    prefix = f"bytes-{uuid.uuid4().hex[:6]}-"
    size = _size(prefix)
    knobs = {
        "spool_dir": tmp_path,
        "db_pool_min": 0,
        "prediction_log_buffer_rows": 1000,  # far away: only the byte bound can act
        "prediction_log_buffer_bytes": 10 * size,
        "prediction_log_batch_rows": 100,
        "prediction_log_flush_ms": 20,
        "prediction_log_max_backoff_s": 0.2,
        "db_connect_timeout_s": 0.5,
        "db_command_timeout_s": 0.5,
    }

    def consistent(plog: PredictionLog) -> bool:
        return plog.buffer_bytes == sum(map(row_bytes, plog.buffer))

    async def scenario(proxy: TcpProxy) -> dict[str, Any]:
        settings = Settings(database_url=postgres.with_port(db_url, proxy.port), **knobs)
        db = Database(settings)
        await db.open()
        plog = PredictionLog(db, Spool(tmp_path), settings)
        disk = _FullDisk(plog.spool)
        plog.spool.write = disk  # type: ignore[method-assign]
        await plog.start()
        stats: dict[str, Any] = {}
        proxy.cut()  # database down: writes fail, batches come back to the buffer
        appended = 0
        for _ in range(9):
            plog.append(_row(prefix, appended))
            appended += 1
            await asyncio.sleep(0.01)
        stats["before_limit"] = (plog.rows_spooled, consistent(plog))
        plog.append(_row(prefix, appended))  # 10 rows: the byte bound
        appended += 1
        for _ in range(100):
            if plog.rows_spooled:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # let a failed write put its batch back
        stats["spilled"] = (plog.rows_spooled, len(list(tmp_path.glob("*.seg"))))
        stats["after_spill"] = (plog.buffer_bytes <= 5 * size, consistent(plog))
        # The spool fails too: the buffer grows to twice the byte bound, then refuses.
        disk.full = True
        refused_at = None
        for _ in range(40):
            try:
                plog.append(_row(prefix, appended))
            except ServiceUnavailable as exc:
                refused_at = (len(plog.buffer), plog.buffer_bytes)
                stats["retry_after"] = exc.headers
                break
            appended += 1
        stats["refused"] = refused_at is not None and refused_at[1] >= 20 * size
        stats["refused_rows"] = refused_at and refused_at[0]
        stats["consistent_when_full"] = consistent(plog)
        await asyncio.sleep(0.5)  # failing spills and writes take rows out and put them back
        stats["consistent_after_failures"] = consistent(plog)
        disk.full = False
        proxy.restore()
        for _ in range(200):
            if plog.rows_written >= appended and not plog.buffer:
                break
            await asyncio.sleep(0.05)
        stats["end"] = {
            "written": plog.rows_written,
            "buffer_rows": plog.buffer_depth,
            "buffer_bytes": plog.buffer_bytes,
        }
        await plog.close()
        await db.close()
        stats["appended"] = appended
        return stats

    with TcpProxy(*postgres.host_port(db_url)) as proxy:
        stats = postgres.run(scenario(proxy))
    assert stats["before_limit"] == (0, True), stats
    spooled, segments = stats["spilled"]
    assert spooled >= 5 and segments >= 1, stats  # at 10 rows of a 1,000-row buffer
    assert stats["after_spill"] == (True, True), stats
    assert stats["refused"], stats
    assert stats["retry_after"] == {"Retry-After": "1"}, stats  # PODSERVE_RETRY_AFTER_S
    assert stats["refused_rows"] < 30, stats  # twice the bytes, nowhere near 2 x 1,000 rows
    assert stats["consistent_when_full"] and stats["consistent_after_failures"], stats
    appended = stats["appended"]
    assert stats["end"] == {"written": appended, "buffer_rows": 0, "buffer_bytes": 0}, stats
    assert _count(db_url, prefix) == appended
    assert not list(tmp_path.glob("*.seg"))


def test_batches_are_bounded_by_bytes(db_url: str, tmp_path: Path) -> None:
    """A COPY takes at most a quarter of the byte bound, however many rows that is."""
    prefix = f"batch-{uuid.uuid4().hex[:6]}-"
    size = _size(prefix)
    settings = Settings(
        database_url=db_url,
        spool_dir=tmp_path,
        db_pool_min=0,
        prediction_log_buffer_bytes=40 * size,
        prediction_log_batch_rows=1000,
    )

    async def scenario() -> tuple[list[int], int, int]:
        db = Database(settings)
        await db.open()
        plog = PredictionLog(db, Spool(tmp_path), settings)
        batches: list[int] = []
        write = plog.write

        async def counting(rows: Any) -> int:
            batches.append(len(rows))
            return await write(rows)

        plog.write = counting  # type: ignore[method-assign]
        for i in range(25):
            plog.append(_row(prefix, i))
        await plog._drain_buffer()
        try:
            return batches, plog.buffer_bytes, plog.rows_written
        finally:
            assert plog.journal is not None
            plog.journal.close(all_durable=True)
            await db.close()

    batches, left, written = postgres.run(scenario())
    assert batches == [10, 10, 5] and left == 0 and written == 25  # 10 x size = a quarter
    assert _count(db_url, prefix) == 25


def test_a_durable_last_journal_segment_is_released(tmp_path: Path) -> None:
    """Segments rotate at a byte size too, and the last one is deleted once it is full and
    durable: after an outage of big rows the journal does not keep its peak size on disk."""
    journal = Journal(tmp_path, rotate_bytes=3 * CONTENT)
    journal.open()
    seqs = [journal.append(_row("jnl-", i)) for i in range(7)]
    files = sorted(tmp_path.iterdir())
    assert len(files) == 3  # 3 + 3 + 1 rows: rotated by bytes, not at 2,000 rows
    journal.release(6)  # rows 0-5 durable: both full segments go, the open one stays
    assert len(list(tmp_path.iterdir())) == 1
    journal.release(seqs[-1] + 1)  # all durable, the last segment not full: kept (reused)
    assert len(list(tmp_path.iterdir())) == 1
    journal.append(_row("jnl-", 7))
    journal.append(_row("jnl-", 8))  # 3 rows: the last segment is full now
    journal.release(journal.next_seq)
    assert list(tmp_path.iterdir()) == []  # nothing left on disk
    assert journal.append(_row("jnl-", 9)) == 9  # a new segment, numbering goes on
    assert len(list(tmp_path.iterdir())) == 1
    journal.close(all_durable=False)


# --- end to end: a real server with big rows and the database down ---------------------------
ROWS = 16
BIG_BODY = {
    "inputs": [
        {
            "name": "x",
            "shape": [ROWS, 4],
            "datatype": "FP32",
            "data": [0.123456789 + i for i in range(ROWS * 4)],
        }
    ]
}


@pytest.fixture
def big_row_server(
    proxied_url: str, db_models: Path, tmp_path: Path
) -> Iterator[tuple[ServerProcess, Path]]:
    env = postgres.server_env(
        proxied_url,
        tmp_path,
        PODSERVE_PREDICTION_LOG_INPUTS="full",
        PODSERVE_PREDICTION_LOG_BUFFER_BYTES="40000",  # ~20 of these rows; 10,000 rows default
        PODSERVE_PREDICTION_LOG_FLUSH_MS="50",
    )
    with ServerProcess(db_models, workers=1, env=env) as server:
        yield server, tmp_path


def test_a_server_spools_big_rows_by_bytes(
    big_row_server: tuple[ServerProcess, Path], db_url: str, proxy: TcpProxy
) -> None:
    server, spool_dir = big_row_server
    prefix = f"e2e-{uuid.uuid4().hex[:6]}-"
    total = 80
    statuses: list[int] = []
    segments = 0
    with httpx.Client(base_url=server.url, timeout=30) as http:
        proxy.cut()
        try:
            for i in range(total):
                response = http.post(
                    "/v2/models/affine/infer",
                    json=BIG_BODY,
                    headers={"x-request-id": f"{prefix}{i}"},
                )
                statuses.append(response.status_code)
                time.sleep(0.005)
            time.sleep(0.3)
            segments = len(list(spool_dir.glob("*.seg")))
        finally:
            proxy.restore()
    assert statuses == [200] * total
    assert segments >= 1, "80 rows of a 10,000-row buffer spilled: by bytes"
    deadline = time.monotonic() + 30
    while _count(db_url, prefix) < total and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _count(db_url, prefix) == total
    deadline = time.monotonic() + 10
    while list(spool_dir.glob("*.seg")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(spool_dir.glob("*.seg"))


def test_the_byte_bound_setting() -> None:
    assert Settings().prediction_log_buffer_bytes == 64 * 2**20
    with pytest.raises(ValueError, match="prediction_log_buffer_bytes"):
        Settings(prediction_log_buffer_bytes=0)


def _gauges(url: str) -> dict[str, float]:
    """The prediction log's backlog gauges (rows, bytes) from a /metrics scrape."""
    found = scrape(url)
    names = ("podserve_prediction_log_buffer_rows", "podserve_prediction_log_buffer_bytes")
    assert set(names) <= found.names
    return {name: found.value(name) for name in names}


def _until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_the_buffer_bytes_gauge_follows_the_rows_waiting_in_memory(
    db_url: str, db_models: Path, tmp_path: Path
) -> None:
    """podserve_prediction_log_buffer_bytes shows the measure the byte bound acts on: above
    zero, and at least a row's overhead per buffered row, while the database is cut off;
    zero again once the rows are written."""
    prefix = f"gauge-{uuid.uuid4().hex[:6]}-"
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with TcpProxy(*postgres.host_port(db_url)) as proxy:
        env = postgres.server_env(
            postgres.with_port(db_url, proxy.port),
            tmp_path,
            PODSERVE_PREDICTION_LOG_INPUTS="full",
            PODSERVE_PREDICTION_LOG_FLUSH_MS="50",
        )
        with (
            ServerProcess(db_models, workers=1, env=env) as server,
            httpx.Client(base_url=server.url, timeout=10) as http,
        ):
            proxy.cut()
            for i in range(20):
                answer = http.post(
                    "/v2/models/affine/infer", json=body, headers={"x-request-id": f"{prefix}{i}"}
                )
                assert answer.status_code == 200, answer.text
            gauges: dict[str, float] = {}

            def backlog_seen() -> bool:
                gauges.update(_gauges(server.url))
                return gauges["podserve_prediction_log_buffer_rows"] == 20

            assert _until(backlog_seen, 10), gauges
            assert gauges["podserve_prediction_log_buffer_bytes"] >= 20 * ROW_OVERHEAD_BYTES, gauges
            proxy.restore()
            assert _until(lambda: _count(db_url, prefix) == 20, 20)
            assert _until(lambda: set(_gauges(server.url).values()) == {0.0}, 10), _gauges(
                server.url
            )
