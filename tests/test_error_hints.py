"""Client-facing messages that say what to do: a misspelt setting's likely name, the header a
form-typed JSON body lacks, the other protocol's URL for a V1/V2 body sent to the wrong one,
the Bearer scheme a bare key lacks; and V1 row answers' FP32 written as V2 writes them."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import orjson
import pytest
from starlette.requests import Request

from podserve.auth import ApiKeys, AuthMiddleware
from podserve.errors import BadRequest, UnsupportedMediaType
from podserve.http_body import check_content_type
from podserve.json_response import OPTIONS
from podserve.model_config import TensorSpec
from podserve.protocol_v1 import encode_outputs, encode_predictions, parse_predict_doc
from podserve.protocol_v2 import InferRequest, encode_infer_response, parse_infer_request
from podserve.settings import unknown_settings

JSON = {"content-type": "application/json"}
V2_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


# --- unknown settings ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "meant"),
    [
        ("PODSERVE_PROT", "PODSERVE_PORT"),  # two letters swapped
        ("PODSERVE_MODEL_REPO", "PODSERVE_MODEL_REPOSITORY"),  # a word cut short
        ("PODSERVE_DB_URL", "PODSERVE_DATABASE_URL"),  # an abbreviation
        ("PODSERVE_MODEL_DIR", "PODSERVE_MODEL_REPOSITORY"),  # another server's name
        ("PODSERVE_MODEL_PATH", "PODSERVE_MODEL_REPOSITORY"),
        ("PODSERVE_WORKER", "PODSERVE_WORKERS"),  # as before
        ("PODSERVE_DB_POOL", "PODSERVE_DB_POOL_MAX or PODSERVE_DB_POOL_MIN"),  # two as close
    ],
)
def test_a_likely_typo_gets_the_setting_it_meant(name: str, meant: str) -> None:
    assert unknown_settings({name: "1"}) == [f"{name} (did you mean {meant}?)"]


@pytest.mark.parametrize(
    "name",
    ["PODSERVE_FOO", "PODSERVE_DEBUG", "PODSERVE_TOKEN", "PODSERVE_HOSTNAME", "PODSERVE_ENV",
     "PODSERVE_LOG_FORMAT", "PODSERVE_HTTP_PORT", "PODSERVE_NOTHING_LIKE_IT_AT_ALL",
     "PODSERVE_A_B", "PODSERVE_GPU"],
)  # fmt: skip
def test_an_unrelated_name_gets_no_guess(name: str) -> None:
    assert unknown_settings({name: "1"}) == [name]


# --- 415 ---------------------------------------------------------------------------
def test_a_form_typed_body_is_told_the_json_header() -> None:
    """curl -d sends application/x-www-form-urlencoded: the body is JSON, the header is not."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", b"application/x-www-form-urlencoded")],
    }
    with pytest.raises(UnsupportedMediaType) as caught:
        check_content_type(Request(scope))
    message = caught.value.message
    assert "'application/x-www-form-urlencoded' is not supported" in message
    assert "'Content-Type: application/json'" in message
    assert "-H 'Content-Type: application/json'" in message
    assert "application/octet-stream" in message and "Inference-Header-Content-Length" in message


# --- V1 / V2 mix-ups ---------------------------------------------------------------
def test_a_v2_body_on_v1_is_pointed_to_v2() -> None:
    text = TensorSpec(name="text", datatype="BYTES", shape=[-1, 1])
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    with pytest.raises(BadRequest, match=r"looks like a V2 \(Open Inference Protocol\)") as caught:
        parse_predict_doc(body, [text])
    assert "/v2/models/<model>/infer" in caught.value.message
    assert '{"instances": [...]}' in caught.value.message


@pytest.mark.parametrize(
    "body",
    [{"instances": [[1, 2, 3, 4]]}, {"inputs": {"x": [[1, 2, 3, 4]]}}, {"inputs": [[1, 2, 3, 4]]}],
    ids=["rows", "named columns", "columns"],
)
def test_a_v1_body_on_v2_is_pointed_to_v1(body: dict) -> None:
    with pytest.raises(BadRequest, match="looks like a KServe V1 request") as caught:
        parse_infer_request(orjson.dumps(body))
    assert "/v1/models/<model>:predict" in caught.value.message
    assert '"datatype"' in caught.value.message


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"inputs": []},
        {"inputs": [{"name": "x"}], "instances": [1]},
        {"inputs": 3},
        {"inputs": {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}},
    ],
    ids=["empty", "empty inputs", "v2 inputs beside instances", "a number", "a v2 tensor, no list"],
)
def test_a_broken_v2_body_keeps_its_own_message(body: dict) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_infer_request(orjson.dumps(body))
    assert "KServe V1" not in caught.value.message


def test_mix_ups_name_the_model_in_the_url(client: httpx.Client) -> None:
    v1 = client.post("/v1/models/affine:predict", content=orjson.dumps(V2_BODY), headers=JSON)
    assert v1.status_code == 400, v1.text
    assert "POST it to /v2/models/affine/infer" in v1.json()["error"]
    v2 = client.post(
        "/v2/models/affine/infer", content=orjson.dumps({"instances": [[1, 2, 3, 4]]}), headers=JSON
    )
    assert v2.status_code == 400, v2.text
    assert "looks like a KServe V1 request" in v2.json()["error"]
    assert "POST it to /v1/models/affine:predict" in v2.json()["error"]
    form = client.post(
        "/v2/models/affine/infer",
        content=orjson.dumps(V2_BODY),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415, form.text
    assert "-H 'Content-Type: application/json'" in form.json()["error"]


# --- authentication ----------------------------------------------------------------
KEY = "inline-key-0123456789abcdef"


def _answer(headers: list[tuple[bytes, bytes]]) -> tuple[int, dict, dict]:
    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("a request without a valid key reached the app")

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    middleware = AuthMiddleware(app, ApiKeys(KEY, None), frozenset())
    scope = {"type": "http", "method": "POST", "path": "/v2/models/m/infer", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    start, body = sent[0], sent[1]
    head = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], head, orjson.loads(body["body"])


@pytest.mark.parametrize(
    ("value", "says"),
    [
        (KEY.encode(), "needs the Bearer scheme"),
        (b"Basic Zm9vOmJhcg==", "only the Bearer scheme is accepted"),
        (b"Bearer ", "carries no key"),
    ],
    ids=["bare key", "basic", "empty bearer"],
)
def test_an_authorization_header_without_a_bearer_key_says_how(value: bytes, says: str) -> None:
    status, headers, answer = _answer([(b"authorization", value)])
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="podserve"'
    message = answer["error"]
    assert message.startswith("missing credentials: ") and says in message, message
    assert "'Authorization: Bearer <key>'" in message and "'X-API-Key: <key>'" in message
    assert "0123456789" not in message and "Zm9v" not in message  # never echoed


def test_no_header_at_all_keeps_the_short_message() -> None:
    status, _, answer = _answer([])
    assert status == 401
    assert answer["error"] == (
        "missing credentials: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    )


# --- V1 row answers' FP32 ----------------------------------------------------------
def test_v1_rows_write_fp32_as_v2_and_the_columns_do() -> None:
    """tolist() made each FP32 a float64: 0.7669022679328918 where V2 and V1's columns
    write 0.76690227."""
    probabilities = np.array([[0.7669022679328918, 0.2330977], [0.1, 0.9]], np.float32)
    outputs = {"label": np.array([0, 1], np.int64), "probabilities": probabilities}
    order = ["label", "probabilities"]
    rows = orjson.dumps(encode_predictions(outputs, order, 2), option=OPTIONS)
    assert rows == (
        b'{"predictions":[{"label":0,"probabilities":[0.76690227,0.2330977]},'
        b'{"label":1,"probabilities":[0.1,0.9]}]}'
    )
    columns = orjson.loads(orjson.dumps(encode_outputs(outputs, order), option=OPTIONS))
    request = InferRequest(id=None, parameters={}, inputs={}, datatypes={})
    v2 = orjson.loads(encode_infer_response("m", "1", request, outputs, order)[0])
    from_rows = [row["probabilities"] for row in orjson.loads(rows)["predictions"]]
    assert from_rows == columns["outputs"]["probabilities"]
    assert [value for row in from_rows for value in row] == v2["outputs"][1]["data"]


def test_v1_rows_of_other_float_shapes_and_types() -> None:
    """A 1-d FP32 output, a non-contiguous one, FP16 (widened, as V2 does) and FP64 (as is)."""
    wide = np.array([[0.1, 9.0], [0.2, 9.0]], np.float32)
    outputs = {
        "score": np.array([0.1, 0.2], np.float32),
        "column": wide[:, :1],  # not C-contiguous
        "half": np.array([0.1, 0.2], np.float16),
        "double": np.array([0.1, 0.2], np.float64),
    }
    answer = orjson.dumps(encode_predictions(outputs, list(outputs), 2), option=OPTIONS)
    assert answer == (
        b'{"predictions":[{"score":0.1,"column":[0.1],"half":0.099975586,"double":0.1},'
        b'{"score":0.2,"column":[0.2],"half":0.19995117,"double":0.2}]}'
    )
    scalar = encode_predictions({"total": np.array(0.1, np.float32)}, ["total"], 2)
    assert orjson.dumps(scalar, option=OPTIONS) == b'{"predictions":0.1}'


# --- routing's 404 and 405 ---------------------------------------------------------
def test_routing_errors_say_what_is_there() -> None:
    """The words for app.py's HTTPException handler: Starlette's own are a bare "Not Found"
    and "Method Not Allowed"."""
    from podserve.errors import routing_error_message  # here: the other tests run on old code

    wrong_method = routing_error_message(
        405, "Method Not Allowed", "GET", "/v2/models/m/infer", "POST", "/docs"
    )
    assert wrong_method == "Method Not Allowed: /v2/models/m/infer takes POST, not GET"
    root = routing_error_message(404, "Not Found", "GET", "/", None, "/docs")
    assert root.startswith("Not Found: no route GET /; the APIs are under /v2")
    assert "/v2/models/<model>/infer" in root and "/v1/models/<model>:predict" in root
    assert root.endswith("docs at /docs")
    no_docs = routing_error_message(404, "Not Found", "POST", "/v2/models/m/infer/", None, None)
    assert "(drop the trailing '/')" in no_docs and "docs at" not in no_docs
    long = routing_error_message(404, "Not Found", "GET", "/" + "a" * 5000, None, None)
    assert len(long) < 400
    assert routing_error_message(404, "unknown model 'm'", "GET", "/x", None, None) == (
        "unknown model 'm'"
    )


def test_put_on_v1_predict_allows_post_not_get(client: httpx.Client) -> None:
    """PUT /v1/models/m:predict matched the status route (GET) first: 405 with Allow: GET."""
    response = client.put("/v1/models/affine:predict", content=b"{}", headers=JSON)
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    get = client.get("/v1/models/affine:predict")
    assert get.status_code == 405 and get.headers["allow"] == "POST"
    assert get.json()["error"] == "predict takes POST, with a JSON body"
    assert client.get("/v1/models/affine").json()["ready"] is True


def test_routing_404_and_405_through_the_app(client: httpx.Client) -> None:
    get = client.get("/v2/models/affine/infer")
    assert get.status_code == 405 and get.headers["allow"] == "POST"
    assert get.json()["error"] == "Method Not Allowed: /v2/models/affine/infer takes POST, not GET"
    root = client.get("/")
    assert root.status_code == 404
    assert root.json()["error"].startswith("Not Found: no route GET /; the APIs are under /v2")
