"""Request bodies sent with Content-Encoding gzip or deflate (tritonclient's
request_compression_algorithm): inflated within the body limit, corrupt data refused."""

from __future__ import annotations

import gzip
import zlib

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from podserve.errors import BadRequest, PayloadTooLarge
from podserve.http_body import ENCODINGS, inflate
from server_process import ServerProcess

PAYLOAD = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "data": [1, 2, 3, 4]}]})  # fmt: skip


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
