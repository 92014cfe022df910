"""Property-based fuzzing of the live HTTP API: whatever a client sends, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server_process import ServerProcess

DATATYPES = ["BOOL", "INT8", "INT32", "INT64", "UINT8", "FP16", "FP32", "FP64", "BYTES", "X"]
PATHS = [
    "/v2/models/affine/infer",
    "/v2/models/affine/versions/1/infer",
    "/v2/models/mixed/infer",
    "/v2/models/text/infer",
    "/v2/models/tabular/infer",
    "/v2/models/fixed/infer",
    "/v2/models/nope/infer",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=30,
)
shapes = st.lists(st.integers(-2, 40), max_size=4) | json_values
tensors = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["x", "input", "text", "ids", "weights", "flags", "?"]),
        "datatype": st.sampled_from(DATATYPES) | json_values,  # a list once made a 500
        "shape": shapes,
        "data": json_values | st.lists(st.floats(allow_nan=False), max_size=64),
    },
    optional={"parameters": json_values},
)
requests = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={"id": json_values, "outputs": json_values, "parameters": json_values},
)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), body=requests)
def test_v2_never_answers_5xx(http: httpx.Client, path: str, body: dict) -> None:
    response = http.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(
        ["/v1/models/affine:predict", "/v1/models/mixed:predict", "/v1/models/text:predict"]
    ),
    body=st.fixed_dictionaries({"instances": json_values}) | json_values,
)
def test_v1_never_answers_5xx(http: httpx.Client, path: str, body: object) -> None:
    response = http.post(
        path, content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert response.status_code < 500, (body, response.text)


HEADER_VALUES = (
    st.integers(-5, 300).map(str)
    | st.text(alphabet="0123456789-+.ax", min_size=1, max_size=4)
    # Digits to str.isdigit() that int() refuses ("²"), and more digits than int() reads.
    | st.text(alphabet="0123456789\u00b2\u00b3\u00b9", min_size=1, max_size=4).map(
        lambda value: value.encode("latin-1")
    )
    | st.integers(4290, 4400).map(lambda digits: "9" * digits)
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=256), header=HEADER_VALUES)
def test_binary_extension_garbage_never_5xx(
    http: httpx.Client, raw: bytes, header: str | bytes
) -> None:
    response = http.post(
        "/v2/models/affine/infer",
        content=raw,
        headers={
            "inference-header-content-length": header,
            "content-type": "application/octet-stream",
        },
    )
    assert response.status_code < 500, (raw, header, response.text)


def test_openapi_schema_operations_never_5xx(http: httpx.Client) -> None:
    """Every documented GET with sample path values answers, and never with a 5xx."""
    spec = http.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        if "get" not in operations:
            continue
        for model, version in [("affine", "1"), ("nope", "x"), ("text", "99")]:
            url = path.replace("{model_name}", model).replace("{model_version}", version)
            assert http.get(url).status_code < 500, url
