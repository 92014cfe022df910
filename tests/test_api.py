"""End-to-end Open Inference Protocol and KServe V1 against real Gunicorn with 2 workers."""

from __future__ import annotations

import socket

import httpx
import numpy as np
import orjson
import pytest

from podserve.phases import parse_server_timing
from server_process import ServerProcess

JSON = {"content-type": "application/json"}


def _infer_body(data: list, shape: list[int], name: str = "x", datatype: str = "FP32") -> dict:
    return {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}


def test_server_metadata_and_health(client: httpx.Client) -> None:
    assert client.get("/v2").json()["name"] == "podserve"
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_comes_from_the_session(client: httpx.Client) -> None:
    meta = client.get("/v2/models/tabular").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}]
    assert {o["name"] for o in meta["outputs"]} == {"label", "probabilities"}
    text = client.get("/v2/models/text").json()
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert text["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}]
    versions = client.get("/v2/models/affine").json()
    assert versions["versions"] == ["1", "2"]
    assert client.get("/v2/models/affine/versions/1").json()["parameters"]["version"] == "1"
    assert client.get("/v2/models/affine/ready").status_code == 200
    assert client.get("/v2/models/affine/versions/2/ready").status_code == 200


def test_infer_json_with_server_timing(client: httpx.Client) -> None:
    response = client.post("/v2/models/affine/infer", json=_infer_body([1, 2, 3, 4], [1, 4]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "2"  # newest version is the default
    assert body["outputs"][0]["data"] == [3.0, 6.0, 9.0, 12.0]
    phases = parse_server_timing(response.headers["server-timing"])
    assert {"parse", "queue", "infer", "postprocess"} <= set(phases)
    assert "features" not in phases and "log" not in phases  # phases that did not run


def test_error_answers_carry_the_phases_their_request_went_through(
    client: httpx.Client,
) -> None:
    """A 400 shows its parse; a 504 its wait for a batch (the queue time deadlines are hit by,
    missing from the header, the metrics and the spans until now)."""
    bad = client.post("/v2/models/affine/infer", json=_infer_body([1, 2, 3], [1, 3]))
    assert bad.status_code == 400
    assert set(parse_server_timing(bad.headers["server-timing"])) == {"parse"}
    late = client.post(
        "/v2/models/affine/infer",
        json=_infer_body([1, 2, 3, 4], [1, 4]),
        headers={"x-podserve-timeout-ms": "0.001"},
    )
    assert late.status_code == 504, late.text
    assert {"parse", "queue"} <= set(parse_server_timing(late.headers["server-timing"]))


def test_v2_timeout_parameter_sets_the_deadline_when_sooner(client: httpx.Client) -> None:
    """Triton's per-request `timeout` (microseconds, in the body's parameters): the sooner of
    it and X-Podserve-Timeout-Ms wins; 0 means no deadline of its own."""
    body = _infer_body([1, 2, 3, 4], [1, 4])
    url = "/v2/models/affine/infer"
    soon = client.post(url, json=body | {"parameters": {"timeout": 1}})
    assert soon.status_code == 504, soon.text
    assert "deadline" in soon.json()["error"]
    header_sooner = client.post(
        url, json=body | {"parameters": {"timeout": 60_000_000}},
        headers={"x-podserve-timeout-ms": "0.001"},
    )  # fmt: skip
    assert header_sooner.status_code == 504, header_sooner.text
    body_sooner = client.post(
        url, json=body | {"parameters": {"timeout": 1}}, headers={"x-podserve-timeout-ms": "60000"}
    )
    assert body_sooner.status_code == 504, body_sooner.text
    for roomy in (60_000_000, 0):
        ok = client.post(url, json=body | {"parameters": {"timeout": roomy}})
        assert ok.status_code == 200, ok.text


def test_infer_specific_version_and_requested_outputs(client: httpx.Client) -> None:
    body = _infer_body([1, 2, 3, 4], [1, 4]) | {"id": "req-7", "outputs": [{"name": "y"}]}
    response = client.post("/v2/models/affine/versions/1/infer", json=body)
    assert response.json()["id"] == "req-7"
    assert response.json()["outputs"][0]["data"] == [3.0, 5.0, 7.0, 9.0]


def test_text_pipeline_accepts_strings(client: httpx.Client) -> None:
    body = _infer_body(["hello world", "héllo wörld 🚀"], [2], name="text", datatype="BYTES")
    response = client.post("/v2/models/text/infer", json=body)
    assert response.status_code == 200, response.text
    out = response.json()["outputs"][0]
    assert out["shape"] == [2, 32]
    vectors = np.array(out["data"]).reshape(2, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    phases = parse_server_timing(response.headers["server-timing"])
    assert {"preprocess", "postprocess"} <= set(phases)


def test_tabular_probabilities(client: httpx.Client) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    rows = data.data[:8].astype(np.float32)
    body = _infer_body(rows.reshape(-1).tolist(), [8, 30], name="input")
    outputs = {
        o["name"]: o for o in client.post("/v2/models/tabular/infer", json=body).json()["outputs"]
    }
    assert outputs["label"]["datatype"] == "INT64"
    assert outputs["label"]["data"] == data.target[:8].tolist()
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(8, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_all_json_datatypes_round_trip(client: httpx.Client) -> None:
    body = {
        "inputs": [
            {"name": "ids", "shape": [2, 2], "datatype": "INT64", "data": [[1, 2], [3, 4]]},
            {"name": "weights", "shape": [2], "datatype": "FP64", "data": [0.25, 1.5]},
            {
                "name": "flags",
                "shape": [2, 3],
                "datatype": "BOOL",
                "data": [True, False, True, False, False, True],
            },
        ]
    }
    response = client.post("/v2/models/mixed/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["id_sum"] == {
        "name": "id_sum",
        "datatype": "INT64",
        "shape": [2],
        "data": [3, 7],
    }
    assert outputs["doubled"]["data"] == [0.5, 3.0]
    assert outputs["inverted"]["datatype"] == "BOOL"
    assert outputs["inverted"]["data"] == [False, True, False, True, True, False]


def test_unbatchable_model_served(client: httpx.Client) -> None:
    response = client.post("/v2/models/fixed/infer", json=_infer_body([1, 2, 3], [1, 3]))
    assert response.json()["outputs"][0]["data"] == [-1.0, -2.0, -3.0]


def test_kserve_v1(client: httpx.Client) -> None:
    assert client.get("/v1/models/tabular").json()["ready"] is True
    response = client.post("/v1/models/affine:predict", json={"instances": [[1, 2, 3, 4]]})
    assert response.status_code == 200, response.text
    assert response.json() == {"predictions": [[3.0, 6.0, 9.0, 12.0]]}
    assert "server-timing" in response.headers
    text = client.post("/v1/models/text:predict", json={"instances": ["one", "two words"]})
    assert np.array(text.json()["predictions"]).shape == (2, 32)
    multi = client.post(
        "/v1/models/mixed:predict",
        json={"instances": [{"ids": [1, 2], "weights": 1.0, "flags": [True, True, False]}]},
    )
    assert multi.status_code == 200, multi.text
    assert multi.json()["predictions"][0]["id_sum"] == 3


def test_kserve_v1_named_instances_on_a_single_input_model(client: httpx.Client) -> None:
    """TF Serving's row format may name the input in each instance, one input or several."""
    row = [float(i % 7) for i in range(30)]
    named = client.post("/v1/models/tabular:predict", json={"instances": [{"input": row}] * 2})
    plain = client.post("/v1/models/tabular:predict", json={"instances": [row] * 2})
    assert named.status_code == 200, named.text
    assert named.json() == plain.json()


def test_what_is_served_is_listed(client: httpx.Client) -> None:
    """KServe V1's model list and Triton's repository index agree with the metadata."""
    names = client.get("/v1/models").json()["models"]
    assert {"affine", "tabular", "text"} <= set(names) and names == sorted(names)
    index = client.post("/v2/repository/index")
    assert index.status_code == 200, index.text
    for body in ({"ready": True}, {"ready": False}, {}):  # every served version is ready
        assert client.post("/v2/repository/index", json=body).json() == index.json()
    versions: dict[str, list[str]] = {}
    for entry in index.json():
        assert entry["state"] == "READY", entry
        versions.setdefault(entry["name"], []).append(entry["version"])
    assert sorted(versions) == names
    for name, listed in versions.items():
        assert listed == client.get(f"/v2/models/{name}").json()["versions"], name
    assert versions["affine"] == ["1", "2"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v2/repository/models/tabular/load", None, 400, "does not load models at run time"),
        ("/v2/repository/models/tabular/unload", None, 400, "does not unload models"),
        ("/v2/repository/models/nope/load", None, 400, "model 'nope' is not among them"),
        ("/v2/repository/index", b"[1", 400, "malformed JSON"),
        ("/v2/repository/index", b"[]", 400, "must be a JSON object"),
        ("/v2/repository/index", b'{"ready": "yes"}', 400, "'ready' must be true or false"),
    ],
)
def test_repository_calls_podserve_does_not_serve_say_why(
    client: httpx.Client, path: str, body: bytes | None, status: int, message: str
) -> None:
    response = client.post(path, content=body, headers=JSON)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_openapi_documents_the_endpoints(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert "/v2/models/{model_name}/infer" in spec["paths"]
    assert "/v1/models/{model_name}:predict" in spec["paths"]
    body = spec["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]
    assert "inputs" in body["content"]["application/json"]["schema"]["properties"]
    assert client.get("/docs").status_code == 200


VALID = _infer_body([1, 2, 3, 4], [1, 4])
# One case per line: the list reads as a table.
# fmt: off
BAD_REQUESTS = [
    ("malformed json", "/v2/models/affine/infer", b"{not json", JSON, 400, "malformed JSON"),
    ("not an object", "/v2/models/affine/infer", b"[1, 2]", JSON, 400, "JSON object"),
    ("no inputs", "/v2/models/affine/infer", b"{}", JSON, 400, "'inputs'"),
    ("wrong content type", "/v2/models/affine/infer", b"x=1",
     {"content-type": "application/x-www-form-urlencoded"}, 415, "content type"),
    ("unknown model", "/v2/models/nope/infer", VALID, JSON, 404, "unknown model 'nope'"),
    ("unknown version", "/v2/models/affine/versions/9/infer", VALID, JSON, 404, "no version '9'"),
    ("unknown model, bad body", "/v2/models/nope/infer", b"{not json", JSON, 404,
     "unknown model 'nope'"),
    ("unknown model, empty body", "/v2/models/nope/infer", b"", JSON, 404, "unknown model"),
    ("unknown model, form body", "/v2/models/nope/infer", b"x=1",
     {"content-type": "application/x-www-form-urlencoded"}, 404, "unknown model"),
    ("unknown input", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4], [1, 4], name="z"),
     JSON, 400, "unknown input(s) ['z']"),
    ("missing input", "/v2/models/mixed/infer", _infer_body([1, 2], [1, 2], "ids", "INT64"),
     JSON, 400, "missing input(s)"),
    ("shape vs data", "/v2/models/affine/infer", _infer_body([1, 2, 3], [1, 4]), JSON, 400,
     "needs 4 elements, data has 3"),
    ("shape vs model", "/v2/models/affine/infer", _infer_body([1, 2, 3], [1, 3]), JSON, 400,
     "dim 1 is 3, model expects 4"),
    ("rank vs model", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4], [4]), JSON, 400,
     "model expects 2"),
    ("wrong datatype", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4], [1, 4],
     datatype="FP64"), JSON, 400, "datatype FP64 does not match the model's FP32"),
    ("floats for ints", "/v2/models/mixed/infer", {"inputs": [
        {"name": "ids", "shape": [1, 2], "datatype": "INT64", "data": [1.5, 2]},
        {"name": "weights", "shape": [1], "datatype": "FP64", "data": [1]},
        {"name": "flags", "shape": [1, 3], "datatype": "BOOL", "data": [True, True, True]}]},
     JSON, 400, "cannot hold floats"),
    ("strings for floats", "/v2/models/affine/infer", _infer_body(["a", "b", "c", "d"], [1, 4]),
     JSON, 400, "cannot hold strings"),
    ("unknown datatype", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4], [1, 4],
     datatype="FP8"), JSON, 400, "unknown datatype"),
    ("datatype a list", "/v2/models/affine/infer",
     {"inputs": [VALID["inputs"][0] | {"datatype": ["FP32"]}]}, JSON, 400,
     "'datatype' must be a string"),
    ("datatype an object", "/v2/models/affine/infer",
     {"inputs": [VALID["inputs"][0] | {"datatype": {"FP32": 1}}]}, JSON, 400,
     "'datatype' must be a string"),
    ("booleans among floats", "/v2/models/affine/infer", _infer_body([True, 1.5, 2, 3], [1, 4]),
     JSON, 400, "datatype FP32 cannot hold booleans"),
    ("binary_data_output a string", "/v2/models/affine/infer",
     VALID | {"parameters": {"binary_data_output": "false"}}, JSON, 400,
     "Unable to parse 'binary_data_output'"),
    ("binary_data a string", "/v2/models/affine/infer",
     VALID | {"outputs": [{"name": "y", "parameters": {"binary_data": "false"}}]}, JSON, 400,
     "Unable to parse 'binary_data'"),
    ("negative dim", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4], [-1, 4]), JSON, 400,
     "non-negative"),
    ("large shape tiny data", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4],
     [1000, 4]), JSON, 400, "elements"),
    ("huge shape tiny data", "/v2/models/affine/infer", _infer_body([1, 2, 3, 4],
     [10**12, 4]), JSON, 413, "rows exceed the limit"),
    ("ragged", "/v2/models/affine/infer", _infer_body([[1, 2], [3]], [1, 4]), JSON, 400,
     "ragged"),
    ("NaN forbidden", "/v2/models/affine/infer", b'{"inputs":[{"name":"x","shape":[1,4],'
     b'"datatype":"FP32","data":[1,2,3,NaN]}]}', JSON, 400, "malformed JSON"),
    ("Inf via overflow", "/v2/models/affine/infer", b'{"inputs":[{"name":"x","shape":[1,4],'
     b'"datatype":"FP32","data":[1,2,3,1e39]}]}', JSON, 400, "NaN or Inf"),
    ("unknown output", "/v2/models/affine/infer", VALID | {"outputs": [{"name": "q"}]}, JSON,
     400, "unknown output 'q'"),
    ("zero rows", "/v2/models/affine/infer", _infer_body([], [0, 4]), JSON, 400, "no rows"),
    ("too many rows", "/v2/models/affine/infer", _infer_body([0.0] * 4 * 1025, [1025, 4]), JSON,
     413, "exceed the limit"),
    ("deep nesting", "/v2/models/affine/infer", b"[" * 5000 + b"]" * 5000, JSON, 400,
     "malformed JSON"),
    ("bad binary header", "/v2/models/affine/infer", b"{}",
     {"inference-header-content-length": "99"}, 400, "outside the body"),
    ("non-ASCII digit binary header", "/v2/models/affine/infer", VALID,
     {**JSON, "inference-header-content-length": "\u00b2".encode("latin-1")}, 400,
     "Inference-Header-Content-Length must be a non-negative integer"),
    ("bad timeout header", "/v2/models/affine/infer", VALID,
     {**JSON, "x-podserve-timeout-ms": "soon"}, 400, "Timeout-Ms"),
    ("string timeout parameter", "/v2/models/affine/infer",
     VALID | {"parameters": {"timeout": "1000"}}, JSON, 400, "'timeout' must be a non-negative"),
    ("negative timeout parameter", "/v2/models/affine/infer",
     VALID | {"parameters": {"timeout": -5}}, JSON, 400, "microseconds, got -5"),
    ("fractional timeout parameter", "/v2/models/affine/infer",
     VALID | {"parameters": {"timeout": 1.5}}, JSON, 400, "microseconds, got 1.5"),
    ("unknown content encoding", "/v2/models/affine/infer", VALID,
     {**JSON, "content-encoding": "br"}, 415, "content encoding"),
    ("v1 neither rows nor columns", "/v1/models/affine:predict", {"rows": []}, JSON, 400,
     "'instances' list (rows) or 'inputs' (columns)"),
    ("v1 empty columns", "/v1/models/affine:predict", {"inputs": []}, JSON, 400,
     "input 'x' is empty"),
    ("v1 ragged", "/v1/models/affine:predict", {"instances": [[1, 2, 3, 4], [1]]}, JSON, 400,
     "ragged"),
    ("v1 booleans among floats", "/v1/models/affine:predict", {"instances": [[True, 2, 3, 4]]},
     JSON, 400, "cannot hold booleans"),
    ("v1 named and plain rows", "/v1/models/affine:predict",
     {"instances": [{"x": [1, 2, 3, 4]}, [1, 2, 3, 4]]}, JSON, 400, "all values or all objects"),
    ("v1 unknown model", "/v1/models/nope:predict", {"instances": [[1]]}, JSON, 404,
     "unknown model"),
    ("v1 unknown model, form body", "/v1/models/nope:predict", b"x=1",
     {"content-type": "application/x-www-form-urlencoded"}, 404, "unknown model"),
    ("unknown route", "/v3/nothing", VALID, JSON, 404, "Not Found"),
]
# fmt: on


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "message"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_clear_4xx(
    client: httpx.Client, path: str, body: bytes | dict, headers: dict, status: int, message: str
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    response = client.post(path, content=content, headers=headers)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_oversized_body_rejected_before_reading(server: ServerProcess) -> None:
    # Declares 64 MiB but sends only the headers: a 413 proves the server did not wait for it.
    request = (
        "POST /v2/models/affine/infer HTTP/1.1\r\nHost: test\r\n"
        f"Content-Type: application/json\r\nContent-Length: {64 * 1024 * 1024}\r\n\r\n"
    )
    reply = ""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode())
        while "exceeds the limit" not in reply:  # headers and body may come in two packets
            chunk = sock.recv(4096).decode()
            if not chunk:
                break
            reply += chunk
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "exceeds the limit" in reply


def test_chunked_oversized_body_is_cut_off(client: httpx.Client) -> None:
    def chunks():  # no Content-Length: the limit is enforced while streaming
        for _ in range(40):
            yield b" " * (1024 * 1024)

    response = client.post("/v2/models/affine/infer", content=chunks(), headers=JSON)
    assert response.status_code == 413


def test_large_bodies_are_parsed_off_the_event_loop() -> None:
    """A 16 MiB JSON body is ~0.5 s of parsing: in a thread, not on the event loop, where it
    would stall every other request of the worker; a small one stays on the loop (a thread
    hop would cost more than its parse)."""
    import asyncio
    import threading

    from podserve.http_body import PARSE_ON_LOOP_MAX_BYTES, parse_body

    def where(body: bytes, tag: str) -> tuple[str, str]:
        return tag, threading.current_thread().name

    async def scenario() -> tuple[tuple[str, str], tuple[str, str]]:
        small = await parse_body(where, b"x" * PARSE_ON_LOOP_MAX_BYTES, "small")
        large = await parse_body(where, b"x" * (PARSE_ON_LOOP_MAX_BYTES + 1), "large")
        return small, large

    small, large = asyncio.run(scenario())
    loop_thread = threading.current_thread().name
    assert small == ("small", loop_thread)
    assert large[0] == "large" and large[1] != loop_thread
