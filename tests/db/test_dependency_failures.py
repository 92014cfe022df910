"""A slow, hung or unreachable PostgreSQL and a full spool volume: what clients and the
database see. Real PostgreSQL, real servers (Gunicorn, one worker: the breaker is per worker).

- A feature lookup keeps to the request's deadline, and a lapsed deadline does not count
  toward the breaker.
- A lookup that timed out does not leave its query running (waiting on a lock) in PostgreSQL.
- Job submission and status answer a retryable 503/504 (with Retry-After), never a 500.
- A journal or spool that cannot be written does not fail predictions, tears no journal
  line and leaves no temp file behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

import postgres
from podserve.db import journal as journal_module
from podserve.db import prediction_log as prediction_log_module
from podserve.db import spool as spool_module
from podserve.db.journal import Journal, forget, recover_dead_journals
from podserve.db.pool import Database
from podserve.db.prediction_log import PredictionLog
from podserve.db.spool import STALE_TEMP_S, Spool
from podserve.settings import Settings
from server_process import ServerProcess
from tcp_proxy import TcpProxy

FEATURES_TIMEOUT_S = 1.0
DEADLINE_MS = 200
RAW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
LOOKUP = {"parameters": {"entity_ids": ["e1", "e2"]}}


# --- helpers ---------------------------------------------------------------------------
def waiting_backends(url: str) -> int:
    """podserve's backends in this database that are waiting on a lock."""
    return postgres.scalar(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'podserve-%' AND wait_event_type = 'Lock'",
    )


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = call()
    return response, time.perf_counter() - started


def wait_until_lookups_work(client: httpx.Client) -> None:
    """Between tests: the breaker (reset 1 s) may still be open from the one before."""
    assert wait_for(
        lambda: client.post("/v2/models/affine/infer", json=LOOKUP).status_code == 200, 10, 0.2
    )


# --- the server: features and jobs through a proxy -------------------------------------
@pytest.fixture(scope="module")
def loaded(db_url: str) -> str:
    async def load() -> None:
        conn = await asyncpg.connect(db_url)
        try:
            await conn.executemany(
                'INSERT INTO podserve_features (feature_set, entity_id, "values") '
                "VALUES ($1, $2, $3)",
                [("affine", f"e{i}", [float(i)] * 4) for i in range(20)],
            )
        finally:
            await conn.close()

    postgres.run(load())
    return db_url


@pytest.fixture(scope="module")
def server(
    loaded: str, proxied_url: str, db_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = postgres.server_env(
        proxied_url,
        tmp_path_factory.mktemp("spool"),
        PODSERVE_FEATURES_TIMEOUT_S=str(FEATURES_TIMEOUT_S),
        PODSERVE_DB_BREAKER_RESET_S="1",
        PODSERVE_JOBS_ENABLED="true",
        PODSERVE_JOBS_CONCURRENCY="0",  # accepts jobs, runs none: the table stays as written
    )
    with ServerProcess(db_models, workers=1, env=env) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        wait_until_lookups_work(http)
        yield http


# --- 1. the request deadline bounds the feature lookup ----------------------------------
def test_a_lookup_keeps_to_the_request_deadline_and_spares_the_breaker(
    client: httpx.Client, db_url: str
) -> None:
    header = {"X-Podserve-Timeout-Ms": str(DEADLINE_MS)}
    calls = [
        lambda: client.post("/v2/models/affine/infer", json=LOOKUP, headers=header),
        lambda: client.post(
            "/v1/models/affine:predict", json={"entity_ids": ["e3"]}, headers=header
        ),
    ]
    with postgres.table_locked(db_url, "podserve_features"):
        answers = [timed(calls[i % 2]) for i in range(6)]  # breaker threshold: 3
    for response, elapsed in answers:
        assert response.status_code == 504, response.text
        assert "request deadline" in response.json()["error"]
        # Before: the lookup's own 1 s timeout, whatever the deadline (loose for a busy host)
        assert DEADLINE_MS / 1000 * 0.8 <= elapsed < FEATURES_TIMEOUT_S, elapsed
    # Six deadlines ran out; the database did nothing wrong: the breaker is still closed.
    response = client.post("/v2/models/affine/infer", json=LOOKUP)
    assert response.status_code == 200, response.text


def test_a_deadline_longer_than_the_lookup_timeout_changes_nothing(
    client: httpx.Client, db_url: str
) -> None:
    with postgres.table_locked(db_url, "podserve_features"):
        response, elapsed = timed(
            lambda: client.post(
                "/v2/models/affine/infer", json=LOOKUP, headers={"X-Podserve-Timeout-Ms": "5000"}
            )
        )
    assert response.status_code == 504, response.text
    assert "PODSERVE_FEATURES_TIMEOUT_S" in response.json()["error"]
    assert "retry-after" in response.headers
    assert FEATURES_TIMEOUT_S * 0.9 <= elapsed < FEATURES_TIMEOUT_S + 2.0, elapsed  # not 5 s


# --- 2. a timed-out query does not go on in PostgreSQL ---------------------------------
@pytest.mark.parametrize("deadline", [None, DEADLINE_MS], ids=["features-timeout", "deadline"])
def test_a_timed_out_lookup_leaves_no_backend_waiting(
    client: httpx.Client, db_url: str, deadline: int | None
) -> None:
    headers = {"X-Podserve-Timeout-Ms": str(deadline)} if deadline else {}
    with postgres.table_locked(db_url, "podserve_features"):
        for _ in range(2):
            response = client.post("/v2/models/affine/infer", json=LOOKUP, headers=headers)
            assert response.status_code == 504, response.text
            timed_out = time.monotonic()
            # The lock is still held: only a cancelled query stops waiting for it.
            assert wait_for(lambda: waiting_backends(db_url) == 0, 2.0), (
                f"{waiting_backends(db_url)} podserve backends still waiting on the lock "
                f"{time.monotonic() - timed_out:.1f} s after their 504"
            )
    response = client.post("/v2/models/affine/infer", json=LOOKUP)  # the pool still works
    assert response.status_code == 200, response.text


def test_a_timed_out_background_query_leaves_no_backend_waiting(db_url: str) -> None:
    """The prediction log's writes and the jobs' queries (Database.background) terminated a
    timed-out connection at once, which cancelled asyncpg's CancelRequest: the backend
    went on waiting on the lock. A statement_timeout, on a sound connection, keeps it."""
    settings = Settings(database_url=db_url, db_pool_min=1, db_pool_max=1)

    async def scenario() -> tuple[bool, int]:
        db = Database(settings)
        await db.open()
        try:
            with pytest.raises(TimeoutError):
                async with db.background(5.0) as conn:
                    await conn.fetch("SELECT count(*) FROM podserve_jobs", timeout=0.3)
            cleared = await asyncio.to_thread(wait_for, lambda: waiting_backends(db_url) == 0, 2.0)
            async with db.background(5.0) as conn:
                pid = conn.get_server_pid()
                with pytest.raises(asyncpg.QueryCanceledError):
                    await conn.execute("SET statement_timeout = 100; SELECT pg_sleep(1)")
            async with db.background(5.0) as conn:  # the pool's one connection, kept
                return cleared, pid - conn.get_server_pid()
        finally:
            await db.close()

    with postgres.table_locked(db_url, "podserve_jobs"):
        cleared, other_backend = postgres.run(scenario())
    assert cleared, "the timed-out background query still waits on the lock in PostgreSQL"
    assert other_backend == 0, "a statement_timeout closed a sound connection"


# --- 5. jobs: slow or unreachable database -> 503/504, never 500 ----------------------
def test_jobs_answer_504_with_retry_after_while_the_table_is_locked(
    client: httpx.Client, db_url: str
) -> None:
    submitted = client.post("/v2/models/affine/jobs", json=RAW)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    with postgres.table_locked(db_url, "podserve_jobs"):
        submit, submit_s = timed(lambda: client.post("/v2/models/affine/jobs", json=RAW))
        status, status_s = timed(lambda: client.get(f"/v2/jobs/{job}"))
    for response, elapsed in ((submit, submit_s), (status, status_s)):
        assert response.status_code == 504, response.text
        assert "PODSERVE_DB_COMMAND_TIMEOUT_S" in response.json()["error"]
        assert int(response.headers["retry-after"]) >= 1
        assert elapsed < 3.0, elapsed  # command timeout 1 s (server_env)
    assert wait_for(lambda: client.get(f"/v2/jobs/{job}").status_code == 200, 10, 0.2)


def test_jobs_answer_503_or_504_while_the_database_is_unreachable(
    client: httpx.Client, proxy: TcpProxy, server: ServerProcess
) -> None:
    submitted = client.post("/v2/models/affine/jobs", json=RAW)
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()["id"]
    proxy.blackhole()  # a hung server or a dead network: nothing answers, nothing fails
    try:
        answers = [client.post("/v2/models/affine/jobs", json=RAW) for _ in range(3)]
        answers += [client.get(f"/v2/jobs/{job}") for _ in range(2)]
    finally:
        proxy.restore()
    for response in answers:
        assert response.status_code in (503, 504), response.text
        assert "retry-after" in response.headers
    assert '"unhandled error"' not in server.logs()
    assert wait_for(lambda: client.get(f"/v2/jobs/{job}").status_code == 200, 10, 0.2)


# --- 3./4. journal and spool on a volume that fails ------------------------------------
def _row(i: int, size: int = 100) -> list[Any]:
    return [f"id-{i:04d}", None, "m", "1", None, "d" * size, "[]", "{}", None, 0.0]


class _ShortThenFull:
    """os.write that, for files under `directory`, writes half of the first call's bytes,
    then fails with ENOSPC: what a volume filling up mid-write does. (os is one module for
    all: other writes, pytest's own included, pass through.)"""

    def __init__(self, directory: Path) -> None:
        self.directory = str(directory)
        self.calls = 0
        self.write = os.write

    def __call__(self, fd: int, data: Any) -> int:
        if not os.readlink(f"/proc/self/fd/{fd}").startswith(self.directory):
            return self.write(fd, data)
        self.calls += 1
        if self.calls == 1:
            return self.write(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_journal_write_leaves_no_torn_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(tmp_path)
    journal.open()
    assert journal.append(_row(0)) == 0
    with monkeypatch.context() as patch:
        patch.setattr(journal_module.os, "write", _ShortThenFull(tmp_path))
        with pytest.raises(OSError):
            journal.append(_row(1))
    assert journal.append(_row(2)) == 1  # the failed row got no number
    journal.close(all_durable=False)
    recovered = recover_dead_journals(tmp_path)
    rows = [row for _, segment_rows, _ in recovered for row in segment_rows]
    for path, _, fd in recovered:
        forget(path, fd)
    assert rows == [_row(0), _row(2)]  # row 2 is not glued onto a half of row 1


def test_a_failing_journal_keeps_rows_in_memory_logs_once_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    plog = PredictionLog(Database(settings), Spool(tmp_path), settings)
    assert plog.journal is not None
    plog.journal.open()
    failing = True
    append = plog.journal.append

    def flaky(row: list[Any]) -> int:
        if failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return append(row)

    monkeypatch.setattr(plog.journal, "append", flaky)
    monkeypatch.setattr(prediction_log_module, "JOURNAL_RETRY_S", 0.2)
    with caplog.at_level(logging.WARNING, logger=prediction_log_module.__name__):
        for i in range(20):
            plog.append(_row(i))
        assert len(plog.buffer) == 20 and not plog._pending
        assert plog.journal_errors == 1  # tried again only after JOURNAL_RETRY_S
        time.sleep(0.25)
        plog.append(_row(20))
        assert plog.journal_errors == 2
        failing = False
        time.sleep(0.25)
        plog.append(_row(21))
    assert list(plog._pending) == ["id-0021"]  # journaled again, crash-safe again
    assert plog.write_errors == 2  # exported: podserve_prediction_log_write_errors_total
    messages = [record.getMessage() for record in caplog.records]
    assert sum("cannot write the prediction-log journal" in m for m in messages) == 1
    assert sum("journal writable again" in m for m in messages) == 1
    plog.journal.close(all_durable=True)


def test_a_journal_that_cannot_open_does_not_stop_the_start(tmp_path: Path) -> None:
    """A full or read-only volume at start-up: the journal's open raised, and the worker
    failed to boot (a recycled worker then stopped the whole pod)."""
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none")
    plog = PredictionLog(Database(settings), Spool(tmp_path), settings)
    assert plog.journal is not None
    (tmp_path / "journal").write_text("in the way, as a read-only volume would be")
    plog._open_journal()  # what start() runs: no OSError
    assert plog.journal_errors == 1
    plog.append(_row(0))
    assert len(plog.buffer) == 1 and not plog._pending  # in memory only
    (tmp_path / "journal").unlink()  # the volume is writable again
    plog._journal_retry_at = time.monotonic()  # the retry is due
    plog.append(_row(1))
    assert list(plog._pending) == ["id-0001"]  # journaled again
    plog.journal.close(all_durable=True)


def test_a_failed_spool_write_removes_its_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)
    spool.open()
    with monkeypatch.context() as patch:
        patch.setattr(spool_module.os, "write", _ShortThenFull(tmp_path))
        with pytest.raises(OSError):
            spool.write([_row(i) for i in range(50)])
    assert list(tmp_path.iterdir()) == []
    spool.write([_row(0)])
    assert len(spool.segments()) == 1 and not list(tmp_path.glob(".*.tmp"))


def test_opening_a_spool_removes_temp_files_of_dead_writers(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            pid: f".{time.time_ns():020d}-{pid}-000000.seg.tmp"
            for pid in (int(dead.stdout), live.pid)
        }
        old = time.time() - 2 * STALE_TEMP_S
        for name in names.values():
            (tmp_path / name).write_bytes(b"PSL1 partial")
            os.utime(tmp_path / name, (old, old))
        # A fresh one of a PID unknown here: another pod's, on a shared volume, mid-write.
        fresh = f".{time.time_ns():020d}-{int(dead.stdout)}-000001.seg.tmp"
        (tmp_path / fresh).write_bytes(b"PSL1 partial")
        (tmp_path / "notes.tmp").write_bytes(b"not ours")
        Spool(tmp_path).open()
        left = {p.name for p in tmp_path.iterdir()}
    finally:
        live.kill()
        live.wait()
    assert left == {names[live.pid], fresh, "notes.tmp"}  # a live writer may still rename


# --- 3. end to end: the spool volume fills up ------------------------------------------
@pytest.fixture()
def tiny_volume(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        # A privilege, not an install step; the journal's failure handling is also tested
        # without a mount above (a write that fails, a journal directory that cannot open).
        pytest.skip("a volume that really fills up is a 1 MiB tmpfs, and mounting one needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"root, but no tmpfs mounts in this container: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(volume: Path) -> Path:
    """Write a file until the volume is full."""
    filler = volume / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while handle.write(b"x" * 4096):
            pass
    return filler


def _write_errors(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("podserve_prediction_log_write_errors_total"):
            return float(line.split()[-1])
    return 0.0


def test_a_full_journal_volume_does_not_fail_predictions(
    db_url: str, db_models: Path, tiny_volume: Path
) -> None:
    env = postgres.server_env(
        db_url,
        tiny_volume / "spool",
        PODSERVE_PREDICTION_LOG_INPUTS="full",
        PODSERVE_PREDICTION_LOG_FLUSH_MS="50",
    )
    prefix = uuid.uuid4().hex[:8]
    with (
        ServerProcess(db_models, workers=1, env=env) as server,
        httpx.Client(base_url=server.url, timeout=10) as http,
    ):
        filler = _fill(tiny_volume)
        statuses = [
            http.post(
                "/v2/models/affine/infer", json=RAW, headers={"x-request-id": f"{prefix}-{i}"}
            ).status_code
            for i in range(60)
        ]
        assert statuses == [200] * 60
        assert wait_for(lambda: _write_errors(http) >= 1, 5, 0.2)
        filler.unlink()
        time.sleep(prediction_log_module.JOURNAL_RETRY_S + 0.1)
        again = http.post("/v2/models/affine/infer", json=RAW, headers={"x-request-id": "x"})
        assert again.status_code == 200
        logs = server.logs()
    assert logs.count("cannot write the prediction-log journal") == 1, logs[-3000:]
    assert "journal writable again" in logs
    assert '"unhandled error"' not in logs
    assert wait_for(
        lambda: (
            postgres.scalar(
                db_url,
                "SELECT count(*) FROM podserve_prediction_log WHERE client_request_id LIKE $1",
                f"{prefix}-%",
            )
            == 60
        ),
        10,
    )
    leftovers = [p.name for p in (tiny_volume / "spool").rglob("*.tmp")]
    assert leftovers == []


def test_journal_lines_stay_whole_on_a_volume_that_fills_up(tiny_volume: Path) -> None:
    """Real ENOSPC, real short writes: every line in the journal is a whole row."""
    journal = Journal(tiny_volume / "journal", rotate_rows=100_000)
    journal.open()
    (tiny_volume / "filler").write_bytes(b"x" * (1024 - 64) * 1024)  # 64 KiB left
    written, failures = [], 0
    for i in range(400):
        try:
            journal.append(_row(i, 3000))  # ~3 KiB: many straddle a page and write short
            written.append(i)
        except OSError:
            failures += 1
    assert written and failures
    journal.close(all_durable=False)
    recovered = recover_dead_journals(tiny_volume / "journal")
    lines = [line for path, _, _ in recovered for line in path.read_bytes().splitlines()]
    for path, _, fd in recovered:
        forget(path, fd)
    assert [orjson.loads(line)[0] for line in lines] == [f"id-{i:04d}" for i in written]
