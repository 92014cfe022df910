"""Methods and paths around the routes.

HEAD on the GET routes (RFC 9110 9.1: a server must support GET and HEAD): load-balancer
health checks (Azure Front Door's default probe, HAProxy's `httpchk HEAD`) and `curl -I` used
to get 405, so they saw every pod as down. A trailing slash used to get a 307 to a Location
built from the Host header."""

from __future__ import annotations

import time

import httpx
import pytest

from metrics_support import scrape
from server_process import ServerProcess

GET_ROUTES = [
    "/v2/health/live",
    "/v2/health/ready",
    "/v2",
    "/v2/models/affine",
    "/v1/models/affine",
]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_head_answers_as_get_without_a_body(client: httpx.Client, path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert head.status_code == get.status_code == 200, head.text
    assert head.content == b""
    assert head.headers["content-length"] == str(len(get.content))
    assert head.headers["content-type"] == get.headers["content-type"]
    # The connection is still in step: no body bytes were sent after the HEAD's headers.
    assert client.get(path).status_code == 200


def test_head_on_a_metrics_scrape_and_an_unknown_model(client: httpx.Client) -> None:
    head = client.head("/metrics")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/plain")
    missing = client.head("/v2/models/nope")
    assert missing.status_code == 404 and missing.content == b""


def test_head_on_a_post_route_is_405_allowing_post(client: httpx.Client) -> None:
    response = client.head("/v2/models/affine/infer")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"


def test_head_requests_are_counted_under_their_route(server: ServerProcess) -> None:
    route = "/v2/models/{model_name}"
    before = scrape(server.url).value("podserve_requests_total", route=route, model="affine")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for _ in range(3):
            assert http.head("/v2/models/affine").status_code == 200
    deadline = time.monotonic() + 10  # workers write their samples every second
    while True:
        after = scrape(server.url).value("podserve_requests_total", route=route, model="affine")
        if after - before >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after - before >= 3  # not "unmatched": the route matched as a GET


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/affine/infer/"),
        ("GET", "/v2/models/affine/"),
        ("GET", "/v2/health/live/"),
    ],
)
def test_a_trailing_slash_is_a_json_404_not_a_redirect_to_the_host_header(
    client: httpx.Client, method: str, path: str
) -> None:
    response = client.request(method, path, json={}, headers={"host": "evil.example"})
    assert response.status_code == 404, response.headers
    assert "location" not in response.headers
    assert response.json()["error"]


def test_get_on_v1_predict_is_405_allowing_post(client: httpx.Client) -> None:
    """It matched the model-status route as a model named "affine:predict": a 404 that
    said no such model, where the method was what was wrong."""
    response = client.get("/v1/models/affine:predict")
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    assert "POST" in response.json()["error"]
    assert client.get("/v1/models/nope").status_code == 404


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/models/nope", "/metrics"])
def test_answers_do_not_name_the_server_stack(client: httpx.Client, path: str) -> None:
    """uvicorn added `server: uvicorn` to every answer: it tells a scanner which stack (and
    which advisories) to try, and costs every answer its bytes. `Date` stays (RFC 9110 6.6.1)."""
    response = client.get(path)
    assert "server" not in response.headers, response.headers
    assert "date" in response.headers


@pytest.mark.parametrize(
    ("path", "infer_path"),
    [
        ("/v2/models/affine/generate", "/v2/models/affine/infer"),
        ("/v2/models/affine/generate_stream", "/v2/models/affine/infer"),
        ("/v2/models/affine/versions/1/generate", "/v2/models/affine/versions/1/infer"),
        ("/v2/models/affine/versions/01/generate_stream", "/v2/models/affine/versions/1/infer"),
    ],
)
def test_generate_says_the_extension_is_not_supported(
    client: httpx.Client, path: str, infer_path: str
) -> None:
    """Triton's generate extension was routing's bare 404 "no route", which reads as a wrong
    URL or version: a 400 says what is missing and where the tensors go instead."""
    response = client.post(path, json={"text_input": "hello", "max_tokens": 8})
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    assert "does not support Triton's generate extension" in message
    assert f"POST the input tensors to {infer_path}" in message


def test_generate_of_an_unknown_model_or_with_get(client: httpx.Client) -> None:
    """As in Triton, which looks the model up first: no such model is a 404; GET a 405."""
    missing = client.post("/v2/models/nope/generate", json={})
    assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["error"]
    assert client.post("/v2/models/affine/versions/9/generate", json={}).status_code == 404
    wrong_method = client.get("/v2/models/affine/generate")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
