"""Without PODSERVE_DATABASE_URL: raw tensors work, the database features say why they do not."""

from __future__ import annotations

import httpx
import pytest

from podserve.phases import parse_server_timing

RAW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v2/models/affine/infer", {"parameters": {"entity_ids": ["e1"]}}),
        ("POST", "/v1/models/affine:predict", {"entity_ids": ["e1"]}),
        ("POST", "/v2/models/affine/jobs", RAW),
    ],
    ids=["v2 entity ids", "v1 entity ids", "submit job"],
)
def test_database_features_answer_501_not_configured(
    client: httpx.Client, method: str, path: str, body: dict | None
) -> None:
    """501, not 503: retrying cannot help, and meshes and clients retry a 503."""
    response = client.request(method, path, json=body)
    assert response.status_code == 501, response.text
    assert "PODSERVE_DATABASE_URL" in response.json()["error"]
    assert "retry-after" not in response.headers


def test_no_job_can_exist_without_a_database(client: httpx.Client) -> None:
    response = client.get("/v2/jobs/00000000-0000-4000-8000-000000000000")
    assert response.status_code == 404  # permanent, so not a 503 to retry
    assert "PODSERVE_DATABASE_URL" in response.json()["error"]


def test_raw_tensors_work_without_a_database(client: httpx.Client) -> None:
    response = client.post("/v2/models/affine/infer", json=RAW)
    assert response.status_code == 200
    assert "log" not in parse_server_timing(response.headers["server-timing"])
