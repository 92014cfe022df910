"""A database that was never migrated: the jobs API answers 503 naming the fix, as feature
lookups do, and the job runner's loops say so once each, then recover once it is migrated.

Before: POST /v2/models/<m>/jobs and GET /v2/jobs/<id> answered 500 "internal server error",
each logging two tracebacks (podserve's "unhandled error" and uvicorn's), and the purge loop
warned every minute for ever.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import httpx
import orjson

import postgres
from server_process import ServerProcess

MISSING = "database schema is missing: run `podserve db migrate`"
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def _lines(server: ServerProcess, msg: str) -> list[dict]:
    lines = [orjson.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    return [line for line in lines if line["msg"] == msg]


def _wait_for(server: ServerProcess, msg: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not _lines(server, msg):
        assert time.monotonic() < deadline, f"no {msg!r} in:\n{server.logs()[-3000:]}"
        time.sleep(0.1)


def _assert_schema_missing(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == {"error": MISSING}
    assert response.headers["retry-after"] == "1"  # PODSERVE_RETRY_AFTER_S, as other 503s


def test_jobs_on_an_unmigrated_database_answer_503_then_work_once_migrated(
    empty_db: str, db_models: Path, tmp_path: Path
) -> None:
    env = postgres.server_env(
        empty_db,
        tmp_path / "spool",
        PODSERVE_JOBS_POLL_MS="100",
        PODSERVE_JOBS_RESULT_TTL_S="2",  # the purge runs every ~1 s
    )
    with (
        ServerProcess(db_models, workers=1, env=env) as server,
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        for _ in range(2):
            _assert_schema_missing(client.post("/v2/models/affine/jobs", json=BODY))
            _assert_schema_missing(client.get(f"/v2/jobs/{uuid.uuid4()}"))
        lookup = {"parameters": {"entity_ids": ["a"]}}  # the same answer as feature lookups
        _assert_schema_missing(client.post("/v2/models/affine/infer", json=lookup))

        # Several claim polls and purge passes: one warning each, no more.
        _wait_for(server, "cannot purge expired jobs")
        time.sleep(3)
        for msg in ("cannot claim jobs", "cannot purge expired jobs"):
            assert [line["error"] for line in _lines(server, msg)] == [MISSING], msg
        assert "Traceback" not in server.logs()
        assert not _lines(server, "unhandled error")

        postgres.migrate(empty_db)
        _wait_for(server, "can claim jobs again")
        _wait_for(server, "can purge expired jobs again")
        response = client.post("/v2/models/affine/jobs", json=BODY)
        assert response.status_code == 202, response.text
        deadline = time.monotonic() + 15
        while (job := client.get(response.headers["location"]).json())["status"] != "succeeded":
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        assert "Traceback" not in server.logs()
