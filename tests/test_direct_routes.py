"""DirectRoutes: the inference endpoints served past FastAPI's router, with the app's own
exception handlers, and everything else left to FastAPI."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.routing import APIRoute

from podserve.app import create_app, inference_routes
from podserve.direct_routes import DirectRoutes
from podserve.errors import BadRequest
from podserve.json_response import json_response
from podserve.settings import Settings

seen: list[dict] = []


def tiny_app() -> FastAPI:
    app = FastAPI()

    @app.post("/things/{name}/run")
    async def run(request: Request, name: str) -> Response:
        seen.append({"route": request.scope["route"].path, "name": name})
        if name == "bad":
            raise BadRequest("bad thing")
        if name == "boom":
            raise RuntimeError("boom")
        return json_response({"name": name, "body": (await request.body()).decode()})

    @app.exception_handler(BadRequest)
    async def bad(_: Request, exc: BadRequest) -> Response:
        return json_response({"error": exc.message}, exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        return json_response({"error": "internal server error"}, 500)

    routes = [r for r in app.routes if isinstance(r, APIRoute)]
    app.add_middleware(DirectRoutes, fastapi_app=app, routes=routes)
    return app


def call(method: str, path: str, body: bytes = b"") -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=tiny_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, content=body)

    return asyncio.run(go())


def test_serves_the_route_with_path_params_and_body() -> None:
    seen.clear()
    response = call("POST", "/things/alpha/run", b"payload")
    assert response.status_code == 200
    assert response.json() == {"name": "alpha", "body": "payload"}
    assert seen == [{"route": "/things/{name}/run", "name": "alpha"}]


def test_errors_go_through_the_apps_handlers() -> None:
    response = call("POST", "/things/bad/run")
    assert response.status_code == 400
    assert response.json() == {"error": "bad thing"}
    response = call("POST", "/things/boom/run")
    assert response.status_code == 500
    assert response.json() == {"error": "internal server error"}


def test_other_methods_and_paths_fall_through_to_fastapi() -> None:
    seen.clear()
    assert call("GET", "/things/alpha/run").status_code == 405
    assert call("POST", "/things/alpha/run/extra").status_code == 404
    assert seen == []


def test_podserve_serves_exactly_the_inference_routes() -> None:
    paths = sorted(route.path for route in inference_routes())
    assert paths == [
        "/v1/models/{model_name}:predict",
        "/v2/models/{model_name}/infer",
        "/v2/models/{model_name}/versions/{model_version}/infer",
    ]
    app = create_app()
    assert any(m.cls is DirectRoutes for m in app.user_middleware)


def test_a_request_before_the_models_are_loaded_is_a_503_with_retry_after() -> None:
    """ModelNotReady is a retryable 503 like the others: it says when to retry
    (PODSERVE_RETRY_AFTER_S), as the OpenAPI schema's 503 promises. The lifespan is not run,
    so the models are still loading; both a direct route and one through FastAPI's router."""

    async def go() -> list[httpx.Response]:
        app = create_app(Settings(retry_after_s=3))
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [
                await client.post("/v2/models/affine/infer", json={"inputs": []}),
                await client.get("/v2/models/affine"),
            ]

    for response in asyncio.run(go()):
        assert response.status_code == 503, response.text
        assert response.json() == {"error": "models are still loading"}
        assert response.headers["retry-after"] == "3"
