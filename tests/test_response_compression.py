"""Compressed answers (Accept-Encoding gzip/deflate, tritonclient's
response_compression_algorithm) from real Gunicorn servers, read by real clients; and the load
generators, which must keep asking for uncompressed answers."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from load_client import AFFINE, closed_loop
from server_process import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
DECOMPRESS = {"gzip": gzip.decompress, "deflate": zlib.decompress}  # deflate: the zlib format
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress}
SENTENCES = [f"sentence {i} about serving models" for i in range(64)]


def text_body(count: int, binary: bool = False) -> dict:
    """V2 infer on the demo text model: ~380 bytes of JSON per sentence (32 floats)."""
    body: dict[str, Any] = {"inputs": [{"name": "text", "shape": [count], "datatype": "BYTES",
                                        "data": SENTENCES[:count]}]}  # fmt: skip
    if binary:
        body["outputs"] = [{"name": "embedding", "parameters": {"binary_data": True}}]
    return body


def affine_body(rows: int) -> dict:
    tensor = {"name": "x", "shape": [rows, 4], "datatype": "FP32", "data": [0.0] * rows * 4}
    return {"inputs": [tensor]}


class Answer(NamedTuple):
    """An answer as it came over the wire: `content` holds the bytes before any decoding."""

    status_code: int
    headers: httpx.Headers
    content: bytes


def _send(url: str, method: str, path: str, body: dict | None, accept: list[str]) -> Answer:
    # httpx sends its own `gzip, deflate, br` when the request has none: always say.
    headers = [("accept-encoding", value) for value in accept]
    content = None if body is None else orjson.dumps(body)
    if content is not None:
        headers.append(("content-type", "application/json"))
    with httpx.Client(base_url=url, timeout=30) as client:
        request = client.build_request(method, path, content=content, headers=headers)
        response = client.send(request, stream=True)
        try:
            raw = b"".join(response.iter_raw())  # raw: not decompressed
        finally:
            response.close()
    return Answer(response.status_code, response.headers, raw)


def raw_post(url: str, path: str, body: dict, accept: str | list[str]) -> Answer:
    return _send(url, "POST", path, body, [accept] if isinstance(accept, str) else accept)


def raw_get(url: str, path: str, accept: str) -> Answer:
    return _send(url, "GET", path, None, [accept])


def check_compressed(response: Answer, coding: str, plain: bytes) -> None:
    """Sent with `coding`, its Content-Length the compressed size, and it inflates to `plain`."""
    assert response.status_code == 200, response.content[:300]
    assert response.headers.get("content-encoding") == coding, response.headers
    assert response.headers["vary"].lower() == "accept-encoding"
    assert int(response.headers["content-length"]) == len(response.content) < len(plain)
    assert DECOMPRESS[coding](response.content) == plain


def check_plain(response: Answer, vary: bool = True) -> None:
    assert "content-encoding" not in response.headers, response.headers
    assert int(response.headers["content-length"]) == len(response.content)
    assert (response.headers.get("vary", "").lower() == "accept-encoding") is vary, response.headers


# --- tritonclient.http ------------------------------------------------------------------------
class RecordingClient(triton.InferenceServerClient):
    """The real client, keeping the headers of each answer to a POST (infer)."""

    headers: dict[str, str | None]

    def _post(self, *args: Any, **kwargs: Any) -> Any:
        response = super()._post(*args, **kwargs)
        names = ("Content-Encoding", "Content-Length", "Inference-Header-Content-Length", "Vary")
        self.headers = {name.lower(): response.get(name) for name in names}
        return response


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_reads_compressed_answers(
    server: ServerProcess, algorithm: str, binary: bool
) -> None:
    """The same embeddings as uncompressed, from a smaller body; with binary outputs, the
    header length is the JSON part's length in the uncompressed body, where tritonclient
    splits it after inflating the whole body."""
    client = RecordingClient(f"127.0.0.1:{server.port}")
    sentences = np.array(SENTENCES[:16], dtype=object)
    text = triton.InferInput("text", [16], "BYTES")
    text.set_data_from_numpy(sentences, binary_data=binary)
    outputs = [triton.InferRequestedOutput("embedding", binary_data=binary)]

    plain = client.infer("text", [text], outputs=outputs)
    plain_headers = client.headers
    assert plain_headers["content-encoding"] is None
    packed = client.infer("text", [text], outputs=outputs, response_compression_algorithm=algorithm)
    assert client.headers["content-encoding"] == algorithm
    assert client.headers["vary"] == "Accept-Encoding"
    assert int(client.headers["content-length"]) < int(plain_headers["content-length"])
    header_length = client.headers["inference-header-content-length"]
    assert header_length == plain_headers["inference-header-content-length"]
    assert (header_length is not None) is binary
    np.testing.assert_array_equal(packed.as_numpy("embedding"), plain.as_numpy("embedding"))
    assert packed.as_numpy("embedding").shape == (16, 32)


# --- raw HTTP: headers, sizes, negotiation ----------------------------------------------------
ANSWERS = {
    "v2 json": ("/v2/models/text/infer", text_body(16)),
    "v2 binary": ("/v2/models/text/infer", text_body(16, binary=True)),
    "v1": ("/v1/models/tabular:predict", {"instances": [[1.0] * 30] * 64}),
}


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("answer", list(ANSWERS))
def test_answers_are_compressed_as_asked(server: ServerProcess, answer: str, coding: str) -> None:
    path, body = ANSWERS[answer]
    plain = raw_post(server.url, path, body, "identity")
    check_plain(plain)
    packed = raw_post(server.url, path, body, coding)
    check_compressed(packed, coding, plain.content)
    if answer == "v2 binary":
        length = packed.headers["inference-header-content-length"]
        assert length == plain.headers["inference-header-content-length"]
        orjson.loads(DECOMPRESS[coding](packed.content)[: int(length)])  # the JSON part, whole


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip, deflate", "gzip"),
        ("deflate, gzip", "gzip"),  # a tie: gzip
        ("deflate", "deflate"),
        ("gzip;q=0, deflate", "deflate"),  # q=0 refuses gzip
        ("gzip;q=0", None),
        ("GZIP ; Q=0.5 ,  Deflate;q=0.6", "deflate"),  # case and whitespace
        ("deflate;q=0.9, *", "gzip"),  # `*` gives gzip q=1
        ("*", "gzip"),
        ("*;q=0", None),  # nothing acceptable: sent uncompressed, not refused
        ("identity;q=0", None),  # neither coding listed: not acceptable either
        ("identity;q=0, deflate;q=0.1", "deflate"),
        ("identity, gzip;q=0.5", None),  # identity preferred
        ("identity, gzip", "gzip"),
        ("x-gzip", "gzip"),
        ("br, zstd", None),
        ("", None),
        ("gzip;q=oops, deflate", "deflate"),  # a malformed weight drops its element
        ("gzip;q=2", None),
        ("gzip;q=nan, deflate;q=0.001", "deflate"),
        (["br", "deflate"], "deflate"),  # two header lines make one list
        (", ".join(["br"] * 15 + ["gzip"]), "gzip"),  # 16 elements: read
        (", ".join(["br"] * 16 + ["gzip"]), None),  # more: answered plain, unread
        ("," * 30_000, None),
    ],
)
def test_accept_encoding_negotiation(
    server: ServerProcess, accept: str | list[str], expected: str | None
) -> None:
    path, body = ANSWERS["v2 json"]
    plain = raw_post(server.url, path, body, "identity").content
    response = raw_post(server.url, path, body, accept)
    if expected is None:
        assert response.status_code == 200
        check_plain(response)
        assert response.content == plain
    else:
        check_compressed(response, expected, plain)


def test_small_answers_and_errors_go_uncompressed_with_vary(server: ServerProcess) -> None:
    """Under PODSERVE_RESPONSE_COMPRESSION_MIN_BYTES (1 KiB): as they are; errors too; both
    say Vary, as every answer of a route that may compress."""
    small = raw_post(server.url, "/v2/models/text/infer", text_body(1), "gzip")
    assert small.status_code == 200 and len(small.content) < 1024
    check_plain(small)
    one_row = {"instances": [[1.0] * 30]}
    check_plain(raw_post(server.url, "/v1/models/tabular:predict", one_row, "gzip"))
    for path, body, status in [
        ("/v2/models/missing/infer", text_body(1), 404),
        ("/v2/models/text/infer", {"inputs": [{"name": "nope"}]}, 400),
    ]:
        error = raw_post(server.url, path, body, "gzip")
        assert error.status_code == status
        check_plain(error)
        assert "error" in orjson.loads(error.content)


def test_a_large_answer_is_compressed_off_the_event_loop(server: ServerProcess) -> None:
    """64 sentences: ~24 KB of JSON, compressed in a thread; two at once, all intact (128
    rows: within one model's share of PODSERVE_MAX_QUEUE_ROWS, 256, in a worker of several
    models, should both reach one worker)."""
    path, body = "/v2/models/text/infer", text_body(64)
    plain = raw_post(server.url, path, body, "identity").content

    async def post(coding: str) -> Answer:
        headers = {"accept-encoding": coding, "content-type": "application/json"}
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            request = client.build_request("POST", path, json=body, headers=headers)
            response = await client.send(request, stream=True)
            try:
                raw = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
            return Answer(response.status_code, response.headers, raw)

    async def together() -> list[Answer]:
        return await asyncio.gather(*(post(coding) for coding in ("gzip", "deflate")))

    for index, response in enumerate(asyncio.run(together())):
        check_compressed(response, ("gzip", "deflate")[index % 2], plain)
        assert "postprocess;dur=" in response.headers["server-timing"]
    from podserve.response_compression import COMPRESS_ON_LOOP_MAX_BYTES

    assert len(plain) > COMPRESS_ON_LOOP_MAX_BYTES  # large enough for the thread


def test_json_routes_compress_large_answers(server: ServerProcess) -> None:
    """Statistics of every model (~4 KB); metadata (~300 bytes) goes as it is."""
    for coding in ("gzip", "deflate"):
        response = raw_get(server.url, "/v2/models/stats", coding)
        assert response.status_code == 200
        assert response.headers.get("content-encoding") == coding, response.headers
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.headers["vary"].lower() == "accept-encoding"
        assert len(orjson.loads(DECOMPRESS[coding](response.content))["model_stats"]) > 5
    check_plain(raw_get(server.url, "/v2/models/text", "gzip"))


def test_metrics_scrapes_are_compressed_as_prometheus_asks(server: ServerProcess) -> None:
    """Prometheus sends `Accept-Encoding: gzip`; a scrape is text that shrinks ~10x."""
    response = raw_get(server.url, "/metrics", "gzip")
    assert response.status_code == 200
    assert response.headers.get("content-encoding") == "gzip", response.headers
    assert int(response.headers["content-length"]) == len(response.content)
    assert response.headers["vary"].lower() == "accept-encoding"
    text = DECOMPRESS["gzip"](response.content).decode()
    assert "podserve_requests_total" in text and len(text) > 4 * len(response.content)
    plain = raw_get(server.url, "/metrics", "identity")
    check_plain(plain)
    assert plain.content.startswith(b"# HELP"), plain.content[:100]


# --- the settings -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_server(affine_repo: Path) -> Iterator[ServerProcess]:
    """Compression off, with no size floor: nothing but the switch stops it."""
    env = {"PODSERVE_RESPONSE_COMPRESSION": "false", "PODSERVE_RESPONSE_COMPRESSION_MIN_BYTES": "0"}
    with ServerProcess(affine_repo, workers=1, env=env) as proc:
        yield proc


@pytest.fixture(scope="module")
def threshold_server(affine_repo: Path, plain_server: ServerProcess) -> Iterator[ServerProcess]:
    """Compression on from exactly the size of the 16-row affine answer."""
    plain = raw_post(plain_server.url, "/v2/models/affine/infer", affine_body(16), "identity")
    size = len(plain.content)
    env = {"PODSERVE_RESPONSE_COMPRESSION_MIN_BYTES": str(size)}
    with ServerProcess(affine_repo, workers=1, env=env) as proc:
        proc.min_bytes = size  # type: ignore[attr-defined]
        yield proc


@pytest.fixture(scope="module")
def eager_server(affine_repo: Path) -> Iterator[ServerProcess]:
    """Compression on with no size floor."""
    env = {"PODSERVE_RESPONSE_COMPRESSION_MIN_BYTES": "0"}
    with ServerProcess(affine_repo, workers=1, env=env) as proc:
        yield proc


def test_an_answer_that_would_grow_goes_plain(eager_server: ServerProcess) -> None:
    """`{"live":true}` (13 bytes) would take ~30 gzipped; a one-row answer (~120) shrinks."""
    for coding in ("gzip", "deflate"):
        live = raw_get(eager_server.url, "/v2/health/live", coding)
        assert live.status_code == 200 and live.content == b'{"live":true}'
        assert len(COMPRESS[coding](live.content)) > len(live.content)
        check_plain(live)
        one_row = raw_post(eager_server.url, "/v2/models/affine/infer", affine_body(1), coding)
        plain = raw_post(eager_server.url, "/v2/models/affine/infer", affine_body(1), "identity")
        check_compressed(one_row, coding, plain.content)


def test_the_size_floor_is_inclusive(threshold_server: ServerProcess) -> None:
    at_floor = raw_post(threshold_server.url, "/v2/models/affine/infer", affine_body(16), "gzip")
    assert len(DECOMPRESS["gzip"](at_floor.content)) == threshold_server.min_bytes  # type: ignore[attr-defined]
    assert at_floor.headers.get("content-encoding") == "gzip"
    below = raw_post(threshold_server.url, "/v2/models/affine/infer", affine_body(15), "gzip")
    assert 0 < len(below.content) < threshold_server.min_bytes  # type: ignore[attr-defined]
    check_plain(below)


def test_switched_off_nothing_is_compressed(
    plain_server: ServerProcess, threshold_server: ServerProcess
) -> None:
    """The same request that the other server compresses goes plain, and without Vary."""
    for body in (affine_body(16), affine_body(1)):
        compressed = raw_post(threshold_server.url, "/v2/models/affine/infer", body, "gzip")
        off = raw_post(plain_server.url, "/v2/models/affine/infer", body, "gzip")
        assert off.status_code == 200
        check_plain(off, vary=False)
        if body["inputs"][0]["shape"][0] == 16:
            check_compressed(compressed, "gzip", off.content)
    check_plain(raw_get(plain_server.url, "/v2/models/stats", "gzip"), vary=False)


# --- the load generators ask for uncompressed answers -----------------------------------------
class Recorder(BaseHTTPRequestHandler):
    """Answers every POST or GET with a small V2/V1/job-like JSON; keeps Accept-Encoding."""

    protocol_version = "HTTP/1.1"
    seen: list[str | None]

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(self.headers.get("Accept-Encoding"))
        body = orjson.dumps({"outputs": [], "predictions": [], "id": "1", "status": "succeeded"})
        self.send_response(202 if self.path.endswith("/jobs") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Location", "/v2/jobs/1")
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET = _answer

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture()
def recorder() -> Iterator[tuple[str, list[str | None]]]:
    handler = type("Recording", (Recorder,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.seen
    finally:
        server.shutdown()
        server.server_close()


def test_locust_users_ask_for_identity(recorder: tuple[str, list[str | None]]) -> None:
    """FastHttp asks for `gzip, deflate, br` unless the request says otherwise."""
    url, seen = recorder
    code = (
        "from locust.env import Environment\n"
        "import loadtests.locustfile as l\n"
        f"l.PodserveUser.host = {url!r}; env = Environment()\n"
        "l.TabularV2User(env).infer(); l.V1PredictUser(env).predict(); l.TextUser(env).embed()\n"
        "l.EntityUser(env).by_entity(); l.JobUser(env).submit_and_poll()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ),
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(seen) == 6 and set(seen) == {"identity"}, seen  # 5 posts, 1 job poll


def test_the_tests_load_client_asks_for_identity(recorder: tuple[str, list[str | None]]) -> None:
    url, seen = recorder
    result = asyncio.run(closed_loop(url, "/v2/models/affine/infer", AFFINE, 1, 5, max_requests=3))
    assert result.statuses == {200: 3}, (result.statuses, result.errors)
    assert seen == ["identity"] * 3
