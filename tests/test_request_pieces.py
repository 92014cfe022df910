"""A request of more rows than its model's max_batch_size runs in pieces of at most that
many rows, each batched like any request, and its answer joins their outputs in order.

One 256-row request to a slow model (max_batch_size 8) used to run as one session run that
held the worker's only inference thread for seconds: every other model's requests waited
behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from pieces_support import (
    SMALL_BODY_BYTES,
    WIDTH,
    build_repository,
    infer,
    output,
    rows_body,
    rows_for,
    runs,
    seconds_per_row,
    send_then_leave,
    server_timing,
    statuses,
    wait_for_metric,
    zeros_body,
)
from podserve.batcher import Batcher, BatchRecord, QueueBudget, SplitOutcome
from podserve.inference_pool import InferencePool
from podserve.model_repository import ModelRepository, load_repository
from podserve.onnx_model import ThreadBudget
from podserve.settings import Settings
from server_process import ServerProcess


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("pieces"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerProcess]:
    with ServerProcess(repo, workers=1) as proc:
        yield proc


@pytest.fixture(scope="module")
def per_row(server: ServerProcess) -> float:
    return seconds_per_row(server.url)


def test_a_large_request_runs_in_pieces_and_other_models_get_the_thread_meanwhile(
    server: ServerProcess, per_row: float
) -> None:
    # At least 12 pieces, however slow the host: the small request waits for a piece or
    # two, which must stay well under a third of the rest. (At a load average of 10 a row
    # took 0.63 s, `rows` fell to 32, 4 pieces, and one or two of them came near a third.)
    rows = rows_for(1.5, per_row, least=96)
    x = np.random.default_rng(1).uniform(-1, 1, (rows, WIDTH)).astype(np.float32)
    before = runs(server.url, "slow")

    async def big_and_small() -> tuple[httpx.Response, float, float]:
        async with httpx.AsyncClient(base_url=server.url, timeout=180) as http:
            headers = {"content-type": "application/json"}
            big = asyncio.create_task(
                http.post("/v2/models/slow/infer", content=rows_body(x), headers=headers)
            )
            await asyncio.sleep(0.3)  # its first pieces are running
            sent = time.perf_counter()
            small = await http.post(
                "/v2/models/affine/infer", content=rows_body(np.ones((1, 4), np.float32)),
                headers=headers,
            )  # fmt: skip
            small_s = time.perf_counter() - sent
            assert small.status_code == 200, small.text
            response = await big
            return response, small_s, time.perf_counter() - sent

    response, small_s, big_left_s = asyncio.run(big_and_small())
    assert response.status_code == 200, response.text
    # The small request waited for a piece or two, not for the rest of the big request.
    assert small_s < big_left_s / 3, (small_s, big_left_s)
    after = runs(server.url, "slow")
    assert after.get("8", 0) - before.get("8", 0) == rows // 8, (before, after)
    assert after.get(str(rows), 0) == before.get(str(rows), 0) == 0
    phases = server_timing(response)
    assert {"queue", "infer"} <= phases.keys(), phases
    # The same rows one request at a time: the same outputs, in the same order.
    with httpx.Client(base_url=server.url, timeout=60) as http:
        alone = np.concatenate([output(infer(http, "slow", x[i : i + 1])) for i in range(rows)])
    np.testing.assert_allclose(output(response), alone, rtol=1e-5, atol=1e-6)


def test_a_bad_row_in_a_later_piece_fails_the_request_and_drops_the_pieces_after_it(
    server: ServerProcess,
) -> None:
    rows, bad_row = 64, 28  # 8 pieces; the 4th holds the bad value
    x = np.full((rows, WIDTH), 0.01, np.float32)
    x[bad_row, 7] = 0.125  # the only such value: it becomes Inf in the body
    body = rows_body(x).replace(b"0.125", b"1e39")  # beyond FP32's range: Inf
    assert body.count(b"1e39") == 1
    before = runs(server.url, "slow")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post(
            "/v2/models/slow/infer", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert "NaN or Inf" in response.json()["error"]
        assert {"queue", "infer"} <= server_timing(response).keys()
        time.sleep(0.5)  # a piece after the bad one would have run by now
        after = runs(server.url, "slow")
        # The three pieces before the bad one ran; the bad one was refused before its run;
        # the four after it never ran.
        assert after.get("8", 0) - before.get("8", 0) == 3, (before, after)
        assert wait_for_metric(server.url, "podserve_queue_rows", 0) == 0
        assert infer(http, "slow", x[:1]).status_code == 200  # the model serves on


def test_a_client_that_leaves_mid_way_drops_the_remaining_pieces(server: ServerProcess) -> None:
    rows = 120  # 15 pieces, in a body under uvicorn's 64 KiB read-ahead (SMALL_BODY_BYTES)
    body = zeros_body(rows)
    assert len(body) < SMALL_BODY_BYTES
    before = runs(server.url, "slow")
    gone_before = statuses(server.url, "slow").get("499", 0)

    def a_piece_ran() -> bool:
        return runs(server.url, "slow").get("8", 0) > before.get("8", 0)

    send_then_leave(server.port, "slow", body, until=a_piece_ran)
    deadline = time.monotonic() + 10
    while statuses(server.url, "slow").get("499", 0) == gone_before:
        assert time.monotonic() < deadline, "the request that lost its client never ended"
        time.sleep(0.1)
    time.sleep(0.5)  # the piece running when it left has ended (or was terminated)
    settled = runs(server.url, "slow")
    time.sleep(1.0)
    after = runs(server.url, "slow")
    assert after == settled, "pieces kept running after the client left"
    ran = after.get("8", 0) - before.get("8", 0)
    assert 0 < ran < rows // 8 - 2, (ran, rows // 8)
    assert wait_for_metric(server.url, "podserve_queue_rows", 0) == 0
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert infer(http, "slow", np.ones((1, WIDTH), np.float32)).status_code == 200


def test_small_requests_to_the_same_model_run_between_the_pieces(repo: Path) -> None:
    """In-process, with the real batcher and session: a 1-row request that arrives while a
    32-row one runs its first piece is served before the big one's last piece, and the big
    one's answer adds up its pieces."""
    repository = load_repository(repo, Settings(), ThreadBudget(1, 1, False))
    model = repository.get("slow")
    x = np.random.default_rng(2).uniform(-1, 1, (32, WIDTH)).astype(np.float32)
    records: list[BatchRecord] = []

    async def scenario() -> tuple[SplitOutcome, object]:
        batcher = Batcher(model, InferencePool(1), QueueBudget(256, 1), [records.append])
        batcher.start()
        try:
            big = asyncio.ensure_future(batcher.submit(*model.validate({"x": x})))
            while not batcher.pool.busy:  # its first piece has the thread
                await asyncio.sleep(0.001)
            small = await batcher.submit(*model.validate({"x": x[:1]}))
            return await big, small
        finally:
            await batcher.stop()

    outcome, small = asyncio.run(scenario())
    assert isinstance(outcome, SplitOutcome)
    sizes = [sum(item.rows for item in record.requests) for record in records]
    assert sizes.count(8) == 4 and 1 in sizes, sizes
    assert sizes.index(1) < len(sizes) - 1, f"the small request waited for all pieces: {sizes}"
    piece_records = [r for r in records if sum(i.rows for i in r.requests) == 8]
    assert outcome.infer_s == pytest.approx(sum(r.result.infer_s for r in piece_records))
    np.testing.assert_array_equal(
        outcome.outputs["y"][:1],
        small.outputs["y"],  # type: ignore[attr-defined]
    )
    assert outcome.outputs["y"].shape == (32, WIDTH)


def test_text_requests_run_in_pieces_give_what_one_run_gives(model_repo: Path) -> None:
    """The text model's tokenizer pads each run to its longest sentence; its output has no
    padded dim, so its requests are split too, and the pieces' embeddings are one run's."""
    repository: ModelRepository = load_repository(model_repo, Settings(), ThreadBudget(1, 1, False))
    model = repository.get("text")
    words = ["short", "a somewhat longer sentence", "the longest sentence of them all, by far"]
    rows = model.max_batch_size * 2 + 3
    texts = np.array([words[i % 3] * (1 + i % 5) for i in range(rows)], dtype=object)
    records: list[BatchRecord] = []

    async def scenario() -> SplitOutcome:
        batcher = Batcher(model, InferencePool(1), QueueBudget(4096, 1), [records.append])
        batcher.start()
        try:
            return await batcher.submit(*model.validate({"text": texts}))  # type: ignore[return-value]
        finally:
            await batcher.stop()

    outcome = asyncio.run(scenario())
    assert len(records) == 3, [len(r.requests) for r in records]
    inputs, count = model.validate({"text": texts})
    whole = model.run_batch([inputs], [count]).outputs[0]["embedding"]
    np.testing.assert_allclose(outcome.outputs["embedding"], whole, atol=1e-5)
