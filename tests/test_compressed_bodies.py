"""Request bodies sent with Content-Encoding gzip or deflate (tritonclient's
request_compression_algorithm): inflated within the body limit, corrupt data refused."""

from __future__ import annotations

import asyncio
import gzip
import time
import zlib
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from starlette.requests import Request

from podserve import http_body
from podserve.errors import BadRequest, Overloaded, PayloadTooLarge
from podserve.http_body import ENCODINGS, inflate
from podserve.metrics import rejection_reason
from server_process import ServerProcess

PAYLOAD = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "data": [1, 2, 3, 4]}]})  # fmt: skip
# Incompressible, so that its compressed forms span several of inflate's 64 KiB input chunks.
LARGE = np.random.default_rng(0).bytes(300_000)
EMPTY_MEMBER = gzip.compress(b"")  # 20 bytes


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(PAYLOAD)),
        ("x-gzip", gzip.compress(PAYLOAD)),
        ("deflate", zlib.compress(PAYLOAD)),  # RFC 9110: the zlib format
        ("deflate", _raw_deflate(PAYLOAD)),  # what some clients send under that name
        ("gzip", gzip.compress(PAYLOAD[:10]) + gzip.compress(PAYLOAD[10:])),  # two members
    ],
)
def test_inflated(encoding: str, body: bytes) -> None:
    assert inflate(body, ENCODINGS[encoding], 1024) == PAYLOAD


@pytest.mark.parametrize(
    ("encoding", "body", "error", "message"),
    [
        ("gzip", b"not gzip at all", BadRequest, "not valid compressed data"),
        ("deflate", b"\x00\x01\x02 neither zlib nor deflate", BadRequest, "not valid"),
        ("gzip", gzip.compress(PAYLOAD)[:-12], BadRequest, "truncated"),
        ("gzip", b"", BadRequest, "truncated"),
        ("deflate", zlib.compress(PAYLOAD) + b"junk", BadRequest, "after the end"),
        ("gzip", gzip.compress(b"\0" * 4096), PayloadTooLarge, "decompressed body exceeds"),
    ],
)
def test_refused(encoding: str, body: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        inflate(body, ENCODINGS[encoding], 1024)


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(LARGE)),
        ("gzip", gzip.compress(LARGE[:12345]) + gzip.compress(LARGE[12345:])),
        ("deflate", zlib.compress(LARGE)),
        ("deflate", _raw_deflate(LARGE)),
    ],
    ids=["gzip", "gzip, two members", "deflate, zlib", "deflate, raw"],
)
def test_large_bodies_inflate_in_chunks(encoding: str, body: bytes) -> None:
    """Inflated from several input chunks: whole, exactly to the limit; 413 one byte short of
    it; truncated or followed by junk, refused as a whole body is."""
    wbits = ENCODINGS[encoding]
    assert inflate(body, wbits, len(LARGE)) == LARGE
    with pytest.raises(PayloadTooLarge, match="decompressed body exceeds"):
        inflate(body, wbits, len(LARGE) - 1)
    with pytest.raises(BadRequest, match="truncated"):
        inflate(body[:-1000], wbits, len(LARGE))
    junk = "not valid compressed data" if encoding == "gzip" else "after the end"
    with pytest.raises(BadRequest, match=junk):
        inflate(body + b"junk", wbits, len(LARGE))


def test_many_empty_members_are_refused_promptly() -> None:
    """4 MiB of empty 20-byte gzip members: each member used to copy the rest of the body,
    ~10 s of CPU for this one (minutes for 16 MiB). Now refused past the member cap at once."""
    body = EMPTY_MEMBER * (4 * 1024 * 1024 // len(EMPTY_MEMBER))
    started = time.perf_counter()
    try:
        inflate(body, ENCODINGS["gzip"], 16 * 1024 * 1024)
        refusal = ""
    except BadRequest as exc:
        refusal = exc.message
    elapsed = time.perf_counter() - started
    assert elapsed < 2, f"took {elapsed:.1f} s: quadratic in the number of members again?"
    assert "gzip members; send it as one gzip stream" in refusal


@pytest.mark.parametrize("capped", [True, False], ids=["capped", "cap lifted"])
def test_inflation_work_is_linear_in_the_body(
    monkeypatch: pytest.MonkeyPatch, capped: bool
) -> None:
    """Counts the compressed bytes handed to zlib (each call copies the input left over when a
    member ends): a few times the body at most (here 3.2: each 20-byte member is handed a 64-byte
    chunk), cap or no cap; handed the rest of the body per member, it was ~27 GB for this 1 MiB."""
    fed = 0

    class CountingInflater:
        def __init__(self, wbits: int) -> None:
            self.inflater = zlib.decompressobj(wbits)

        def decompress(self, data: bytes, max_length: int = 0) -> bytes:
            nonlocal fed
            fed += len(data)
            return self.inflater.decompress(data, max_length)

        @property
        def eof(self) -> bool:
            return self.inflater.eof

        @property
        def unused_data(self) -> bytes:
            return self.inflater.unused_data

    monkeypatch.setattr(http_body, "zlib", SimpleNamespace(decompressobj=CountingInflater,
                                                           error=zlib.error))  # fmt: skip
    if not capped:
        monkeypatch.setattr(http_body, "MAX_GZIP_MEMBERS", 10**9)
    body = EMPTY_MEMBER * (1024 * 1024 // len(EMPTY_MEMBER))
    try:
        assert inflate(body, ENCODINGS["gzip"], 1024) == b""
    except BadRequest as exc:
        assert capped and "gzip members" in exc.message
    assert fed <= 4 * len(body), f"{fed} compressed bytes handed to zlib for {len(body)}"


def test_many_members_inflate_up_to_the_cap() -> None:
    """Non-empty members of all sizes, one of them longer than an input chunk, up to the cap
    inflate whole; one more member is refused (400) saying why."""
    cap = http_body.MAX_GZIP_MEMBERS
    rng = np.random.default_rng(1)
    pieces = [rng.bytes(1 + i % 300) for i in range(cap)]
    pieces[cap // 2] = LARGE
    body = b"".join(gzip.compress(piece) for piece in pieces)
    assert inflate(body, ENCODINGS["gzip"], 16 * 1024 * 1024) == b"".join(pieces)
    with pytest.raises(BadRequest, match=f"more than {cap} gzip members"):
        inflate(body + gzip.compress(b"one too many"), ENCODINGS["gzip"], 16 * 1024 * 1024)


def test_a_bomb_stops_at_the_limit() -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MiB in ~64 KiB
    assert len(bomb) < 100_000
    with pytest.raises(PayloadTooLarge):
        inflate(bomb, ENCODINGS["gzip"], 1024 * 1024)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_compressed_requests(
    server: ServerProcess, algorithm: str, binary: bool
) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    rows = np.arange(64 * 30, dtype=np.float32).reshape(64, 30) / 100  # > 1 KiB: off the loop
    tensor = triton.InferInput("input", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    plain = client.infer("tabular", [tensor])
    packed = client.infer(
        "tabular", [tensor], request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )  # fmt: skip
    np.testing.assert_array_equal(packed.as_numpy("probabilities"), plain.as_numpy("probabilities"))


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (gzip.compress(PAYLOAD), 200, ""),
        (b"\x1f\x8b\x08 broken", 400, "not valid compressed data"),
        (gzip.compress(b" " * (17 * 1024 * 1024)), 413, "decompressed body exceeds"),
    ],
    ids=["small, on the loop", "corrupt", "inflates past PODSERVE_MAX_BODY_BYTES"],
)
def test_over_http(client: httpx.Client, body: bytes, status: int, message: str) -> None:
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    response = client.post("/v2/models/affine/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    if status == 200:
        assert response.json()["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]
    else:
        assert message in response.json()["error"]


def test_many_members_over_http(client: httpx.Client) -> None:
    """4 MiB of empty gzip members: a prompt 400, not ~10 s of a worker thread's CPU."""
    body = EMPTY_MEMBER * (4 * 1024 * 1024 // len(EMPTY_MEMBER))
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    started = time.perf_counter()
    response = client.post("/v2/models/affine/infer", content=body, headers=headers)
    elapsed = time.perf_counter() - started
    assert elapsed < 2, f"answered in {elapsed:.1f} s: quadratic in the number of members again?"
    assert response.status_code == 400, response.text
    assert "gzip members; send it as one gzip stream" in response.json()["error"]


def _receiving(body: bytes) -> Callable[[], Awaitable[dict[str, object]]]:
    """An ASGI receive() that hands over `body` in one message."""

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def test_the_wait_for_the_inflate_slot_is_bounded() -> None:
    """A compressed body waits for its worker's inflate slot at most the body-read timeout,
    then 503 + Retry-After under its own rejection reason; it used to wait as long as the
    bodies ahead of it took. Once the slot is free, the same body is inflated."""
    body = gzip.compress(LARGE)  # > INFLATE_ON_LOOP_MAX_BYTES: inflated in a thread, in the slot
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [
        (b"content-length", str(len(body)).encode()), (b"content-encoding", b"gzip"),
    ]}  # fmt: skip

    async def scenario() -> None:
        slot = http_body._large_slot(http_body._LARGE_INFLATES)
        await slot.acquire()  # another body's inflation, taking its time
        request = Request(scope, _receiving(body))
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="PODSERVE_BODY_READ_TIMEOUT_S") as info:
            await asyncio.wait_for(http_body.read_body(request, 16 * 1024 * 1024, 0.2), 5)
        assert 0.2 <= time.perf_counter() - started < 2
        assert info.value.status_code == 503 and info.value.headers["Retry-After"] == "1"
        assert rejection_reason(info.value) == "body_budget"
        slot.release()
        request = Request(scope, _receiving(body))
        assert await http_body.read_body(request, 16 * 1024 * 1024, 0.2) == LARGE
        assert not slot.locked()  # given back after the inflation

    asyncio.run(scenario())
