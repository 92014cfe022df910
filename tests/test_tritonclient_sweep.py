"""tritonclient's methods beyond the round trips of test_tritonclient.py: the shared-memory
calls podserve does not support (a 400 that says so), the sequence and priority options it
checks and ignores as Triton does for a model without a sequence batcher or priority levels,
and the asyncio client."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from server_process import ServerProcess

Client = triton.InferenceServerClient

SHARED_MEMORY_CALLS: dict[str, tuple[str, Callable[[Client], Any]]] = {
    "system status": ("system", lambda c: c.get_system_shared_memory_status()),
    "system region status": ("system", lambda c: c.get_system_shared_memory_status("r")),
    "system register": ("system", lambda c: c.register_system_shared_memory("r", "/k", 64)),
    "system unregister all": ("system", lambda c: c.unregister_system_shared_memory()),
    "system unregister": ("system", lambda c: c.unregister_system_shared_memory("r")),
    "cuda status": ("CUDA", lambda c: c.get_cuda_shared_memory_status()),
    "cuda region status": ("CUDA", lambda c: c.get_cuda_shared_memory_status("r")),
    "cuda register": ("CUDA", lambda c: c.register_cuda_shared_memory("r", b"\0" * 64, 0, 64)),
    "cuda unregister all": ("CUDA", lambda c: c.unregister_cuda_shared_memory()),
    "cuda unregister": ("CUDA", lambda c: c.unregister_cuda_shared_memory("r")),
}


@pytest.fixture()
def triton_client(server: ServerProcess) -> Client:
    return triton.InferenceServerClient(f"127.0.0.1:{server.port}")


def _affine_input(rows: int = 1) -> triton.InferInput:
    tensor = triton.InferInput("x", [rows, 4], "FP32")
    tensor.set_data_from_numpy(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4))
    return tensor


@pytest.mark.parametrize("call", SHARED_MEMORY_CALLS, ids=str)
def test_shared_memory_says_it_is_not_supported(triton_client: Client, call: str) -> None:
    """Each of Triton's shared-memory routes is a 400 naming the missing feature and the way
    round it (it was routing's 404 "no route", which reads as a wrong URL or version)."""
    kind, method = SHARED_MEMORY_CALLS[call]
    with pytest.raises(InferenceServerException) as refused:
        method(triton_client)
    assert refused.value.status() == "400"
    assert f"does not support {kind} shared memory" in refused.value.message()
    assert "request body" in refused.value.message()


def test_shared_memory_named_in_an_infer_request_is_refused(triton_client: Client) -> None:
    """An output asked into a region was answered 200 with the data in the body (the client
    reads its region and finds nothing); an input from a region read as a tensor without
    data. Both say shared memory is not supported."""
    output = triton.InferRequestedOutput("y")
    output.set_shared_memory("region-y", 16)
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("affine", [_affine_input()], outputs=[output])
    assert refused.value.status() == "400"
    assert "output 'y' names shared-memory region 'region-y'" in refused.value.message()
    tensor = triton.InferInput("x", [1, 4], "FP32")
    tensor.set_shared_memory("region-x", 16)
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("affine", [tensor])
    assert refused.value.status() == "400"
    assert "input 'x' names shared-memory region 'region-x'" in refused.value.message()
    assert "does not support shared memory" in refused.value.message()


def test_shared_memory_is_not_announced(triton_client: Client) -> None:
    extensions = triton_client.get_server_metadata()["extensions"]
    assert not {"system_shared_memory", "cuda_shared_memory"} & set(extensions)


@pytest.mark.parametrize(
    "options",
    [
        {"sequence_id": 5, "sequence_start": True},
        {"sequence_id": 5, "sequence_end": True},
        {"sequence_id": "session-a", "sequence_start": True, "sequence_end": True},
        {"priority": 1},
    ],
    ids=["start", "end", "string id", "priority"],
)
def test_sequence_and_priority_are_accepted_and_ignored(
    triton_client: Client, options: dict[str, Any]
) -> None:
    """No model here is stateful and there are no priority levels: the request is answered
    as any other (every request stands alone)."""
    result = triton_client.infer("affine", [_affine_input()], request_id="seq", **options)
    np.testing.assert_array_equal(result.as_numpy("y"), [[0, 3, 6, 9]])
    assert result.get_response()["id"] == "seq"


@pytest.mark.parametrize(
    ("options", "parameter"),
    [
        ({"sequence_id": -1}, "sequence_id"),
        ({"sequence_id": 2.5}, "sequence_id"),
        ({"sequence_id": 5, "sequence_start": "yes"}, "sequence_start"),
        ({"sequence_id": 5, "sequence_end": 1}, "sequence_end"),
        ({"priority": -1}, "priority"),
        ({"priority": "high"}, "priority"),
    ],
    ids=["negative id", "float id", "string start", "int end", "negative priority", "text"],
)
def test_malformed_sequence_and_priority_options_are_a_400(
    triton_client: Client, options: dict[str, Any], parameter: str
) -> None:
    """Triton parses them before it schedules (a 400 "Unable to parse '<parameter>'"); they
    were ignored here whatever their type, so a client's bug went unseen until it moved to
    Triton."""
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("affine", [_affine_input()], **options)
    assert refused.value.status() == "400"
    assert f"Unable to parse '{parameter}'" in refused.value.message()


def test_async_infer_answers_each_request(triton_client: Client, server: ServerProcess) -> None:
    pooled = triton.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=4)
    try:
        pending = [
            pooled.async_infer("affine", [_affine_input()], request_id=str(i)) for i in range(8)
        ]
        ids = [request.get_result().get_response()["id"] for request in pending]
        assert ids == [str(i) for i in range(8)]
        with pytest.raises(InferenceServerException) as missing:
            pooled.async_infer("missing", [_affine_input()]).get_result()
        assert missing.value.status() == "404"
    finally:
        pooled.close()


def test_asyncio_client(server: ServerProcess) -> None:
    """tritonclient.http.aio: the same routes through aiohttp, shared memory included."""

    async def session() -> None:
        client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.port}")
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready("affine", "1")
            assert not await client.is_model_ready("missing")
            assert (await client.get_model_config("affine"))["max_batch_size"] == 16
            stats = await client.get_inference_statistics("affine", "2")
            assert stats["model_stats"][0]["version"] == "2"
            assert (await client.get_log_settings())["log_format"] == "json"
            result = await client.infer(
                "affine", [_affine_input(2)], request_compression_algorithm="gzip",
                response_compression_algorithm="deflate",
            )  # fmt: skip
            assert result.as_numpy("y").shape == (2, 4)
            with pytest.raises(InferenceServerException, match="does not load models"):
                await client.load_model("tabular", config="{}", files={"file:1/model.onnx": b""})
            with pytest.raises(InferenceServerException, match="does not support system shared"):
                await client.unregister_system_shared_memory()
        finally:
            await client.close()

    asyncio.run(session())
