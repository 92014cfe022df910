"""OPTIONS on the routes (RFC 9110 9.3.7): 204 with the path's methods in `Allow`; it was
routing's 405 "Method Not Allowed" on every path, which says the server refuses the method
itself. Authentication applies to it as to any other method."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from metrics_support import scrape
from server_process import ServerProcess

KEY = "options-test-key-0123456789abcdef"


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v2/health/live", "GET, HEAD, OPTIONS"),
        ("/v2/models/affine", "GET, HEAD, OPTIONS"),
        ("/v2/models/affine/infer", "POST, OPTIONS"),
        ("/v2/models/affine/versions/2/infer", "POST, OPTIONS"),
        ("/v1/models/affine:predict", "POST, OPTIONS"),
        ("/v2/repository/index", "POST, OPTIONS"),
        ("/metrics", "GET, HEAD, OPTIONS"),
    ],
)
def test_options_answers_204_with_the_methods_of_the_path(
    client: httpx.Client, path: str, allow: str
) -> None:
    response = client.options(path)
    assert response.status_code == 204, response.text
    assert response.headers["allow"] == allow
    assert response.content == b""
    # The connection is still in step, and the methods it lists do answer.
    assert client.request(allow.split(", ")[0], path, json={}).status_code != 405


def test_options_on_an_unknown_path_is_routing_404(client: httpx.Client) -> None:
    response = client.options("/v3/nothing/here")
    assert response.status_code == 404
    assert "no route OPTIONS /v3/nothing/here" in response.json()["error"]


def test_head_and_get_are_unchanged(client: httpx.Client) -> None:
    """The OPTIONS route matches every path: the other methods must still reach theirs."""
    assert client.get("/v2/models/affine").status_code == 200
    assert client.head("/v2/models/affine").status_code == 200
    assert client.get("/v2/nothing").status_code == 404
    assert client.delete("/v2/models/affine").status_code == 405


@pytest.fixture(scope="module")
def keyed(affine_repo: Path) -> Iterator[ServerProcess]:
    with ServerProcess(affine_repo, workers=1, env={"PODSERVE_API_KEYS": KEY}) as server:
        yield server


def test_options_needs_a_key_like_any_method(keyed: ServerProcess) -> None:
    """podserve sends no CORS headers, so a key-less browser preflight gains nothing from an
    exemption; the route's methods stay as private as /docs. Exempt health paths stay open."""
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        refused = http.options("/v2/models/affine/infer")
        assert refused.status_code == 401
        assert "www-authenticate" in refused.headers and "allow" not in refused.headers
        keyed_answer = http.options("/v2/models/affine/infer", headers={"x-api-key": KEY})
        assert keyed_answer.status_code == 204
        assert keyed_answer.headers["allow"] == "POST, OPTIONS"
        assert http.options("/v2/health/ready").status_code == 204


def test_options_is_not_counted_as_a_request_of_the_route_it_asks_about(
    affine_repo: Path,
) -> None:
    """Counted under the infer route (status 204), preflights and probes diluted the Grafana
    per-phase panels, which divide by that route's request count."""
    with ServerProcess(affine_repo, workers=1) as server, httpx.Client(base_url=server.url) as http:
        for _ in range(3):
            assert http.options("/v2/models/affine/infer").status_code == 204
        samples = scrape(server.url)
    infer = "/v2/models/{model_name}/infer"
    assert samples.value("podserve_request_duration_seconds_count", route=infer) == 0
    counted = samples.value(
        "podserve_request_duration_seconds_count", route="options", status="204"
    )
    assert counted == 3
