"""Request ids (request_id.py): X-Request-ID on every answer, on every log line of its request,
and the access line's fields. A real one-worker server with the access log on and small body
bounds (a 413 by size, a 503 while another body holds the worker's budget)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import multiprocessing
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_process import ServerProcess

INFER = "/v2/models/affine/infer"
ONE_ROW = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
BODY_LIMIT = 256 * 1024  # PODSERVE_MAX_BODY_BYTES and PODSERVE_MAX_BODY_BYTES_IN_FLIGHT
NEW_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(affine_repo: Path) -> Iterator[ServerProcess]:
    env = {
        "PODSERVE_ACCESS_LOG": "true",
        "PODSERVE_LOG_LEVEL": "debug",  # observability's "request" line: one more line per request
        "PODSERVE_MAX_BODY_BYTES": str(BODY_LIMIT),
        "PODSERVE_MAX_BODY_BYTES_IN_FLIGHT": str(BODY_LIMIT),
    }
    with ServerProcess(affine_repo, workers=1, env=env) as proc:
        yield proc


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


def _padded(size: int) -> bytes:
    """A valid one-row request of exactly `size` bytes."""
    core = json.dumps(ONE_ROW).encode()
    return core[:-1] + b" " * (size - len(core)) + b"}"


def _answer_while_the_budget_is_held(server: ServerProcess) -> httpx.Response:
    """A 503: another request's body, mostly sent, holds the worker's body budget."""
    holder = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        head = f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY_LIMIT}\r\n\r\n"
        holder.sendall(head.encode() + b" " * (BODY_LIMIT - 1000))  # held whole past 64 KiB
        deadline = time.monotonic() + 20  # until the worker has read the holder's bytes
        while True:
            response = httpx.post(f"{server.url}{INFER}", content=_padded(BODY_LIMIT // 2))
            # (a body under the 64 KiB uvicorn buffers anyway is not counted: this one is)
            if response.status_code == 503 or time.monotonic() > deadline:
                return response
            time.sleep(0.05)
    finally:
        holder.close()


def _lines(server: ServerProcess, request_id: str, count: int = 1) -> list[dict]:
    """The JSON lines carrying `request_id`, once there are `count` (written after the answer)."""

    def found(logs: str) -> list[dict]:
        lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("request_id") == request_id]

    return found(server.wait_for_logs(lambda logs: len(found(logs)) >= count))


def _access_line(server: ServerProcess, request_id: str) -> dict:
    lines = _lines(server, request_id, count=2)  # the access line and the DEBUG "request" one
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    assert len(access) == 1, lines
    return access[0]


def test_every_answer_carries_a_new_request_id(server: ServerProcess, client: httpx.Client) -> None:
    answers = {
        200: client.post(INFER, json=ONE_ROW),
        400: client.post(INFER, content=b"{not json", headers={"content-type": "application/json"}),
        404: client.post("/v2/models/missing/infer", json=ONE_ROW),
        413: client.post(INFER, content=_padded(BODY_LIMIT + 1)),
        503: _answer_while_the_budget_is_held(server),
    }
    assert {status: r.status_code for status, r in answers.items()} == {s: s for s in answers}
    ids = [response.headers.get("x-request-id") for response in answers.values()]
    assert all(NEW_ID.fullmatch(str(request_id)) for request_id in ids), ids
    assert len(set(ids)) == len(ids), ids
    for status, response in answers.items():
        assert _access_line(server, response.headers["x-request-id"])["status"] == status


def test_a_supplied_id_is_echoed_and_on_every_line_of_its_request(
    server: ServerProcess, client: httpx.Client
) -> None:
    supplied = "client-7f3a/retry:2"
    response = client.post(INFER, json=ONE_ROW, headers={"x-request-id": supplied})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == supplied
    lines = _lines(server, supplied, count=2)
    assert {line["logger"] for line in lines} == {"uvicorn.access", "podserve.observability"}
    assert [line["msg"] for line in lines if line["level"] == "debug"] == ["request"]


@pytest.mark.parametrize(
    "bad",
    [b"x" * 129, b"has space", b"tab\there", b"caf\xc3\xa9", b""],
    ids=["too-long", "space", "tab", "non-ascii", "empty"],
)
def test_a_bad_id_is_replaced_and_never_logged(server: ServerProcess, bad: bytes) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("GET", "/v2")
    connection.putheader("X-Request-ID", bad)
    connection.endheaders()
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 200
    replaced = response.getheader("x-request-id")
    assert replaced is not None and NEW_ID.fullmatch(replaced), replaced
    _access_line(server, replaced)
    if bad:
        assert bad.decode("latin-1") not in server.logs()


def test_the_access_line_of_an_inference(server: ServerProcess, client: httpx.Client) -> None:
    response = client.post(INFER, json=ONE_ROW, headers={"x-request-id": "infer-1"})
    assert response.status_code == 200
    line = _access_line(server, "infer-1")
    port = line["client"].rpartition(":")[2]
    assert line["client"] == f"127.0.0.1:{port}" and int(port) > 0
    assert line["duration_ms"] > 0
    expected = {"method": "POST", "path": INFER, "status": 200, "model": "affine"}
    assert {key: line[key] for key in expected} == expected
    assert line["bytes"] == len(response.content)
    # uvicorn's message is as it was: whoever parses the text still can.
    assert line["msg"] == f'{line["client"]} - "POST {INFER} HTTP/1.1" 200'


def test_the_access_line_of_a_404(server: ServerProcess, client: httpx.Client) -> None:
    named = client.post("/v2/models/missing/infer", json=ONE_ROW, headers={"x-request-id": "n"})
    unrouted = client.get("/nowhere", headers={"x-request-id": "u"})
    assert named.status_code == unrouted.status_code == 404
    line = _access_line(server, "n")
    assert (line["status"], line["model"], line["bytes"]) == (404, "missing", len(named.content))
    line = _access_line(server, "u")
    assert (line["method"], line["path"], line["status"]) == ("GET", "/nowhere", 404)
    assert "model" not in line  # no route names one


def test_the_id_is_on_answers_with_the_access_log_off(affine_repo: Path) -> None:
    """The default: no access line, the header all the same."""
    with ServerProcess(affine_repo, workers=1) as server:
        response = httpx.post(f"{server.url}{INFER}", json=ONE_ROW)
        assert response.status_code == 200
        assert NEW_ID.fullmatch(response.headers["x-request-id"])
        assert '"uvicorn.access"' not in server.logs()


def test_an_unhandled_errors_500_carries_the_id() -> None:
    """Starlette answers it outside every middleware (ServerErrorMiddleware): the app's 500
    handler adds the header. In process: no route of a real server fails like that."""
    from podserve.app import create_app
    from podserve.settings import Settings

    async def boom() -> None:
        raise RuntimeError("a bug")

    async def go() -> httpx.Response:
        app = create_app(Settings())
        app.add_api_route("/boom", boom)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom", headers={"x-request-id": "bug-1"})

    response = asyncio.run(go())
    assert response.status_code == 500
    assert response.headers["x-request-id"] == "bug-1"


def test_the_access_line_of_an_answer_sent_past_the_middleware_has_its_status() -> None:
    """The 500 above is sent outside RequestIdMiddleware, which never sees its status:
    the access line takes uvicorn's own (the last argument of its message)."""
    from podserve.request_id import AccessFields, RequestRecord, _current

    scope = {"type": "http", "method": "GET", "path": "/boom", "client": ("127.0.0.1", 5)}
    message = '%s - "%s %s HTTP/%s" %d'
    args = ("127.0.0.1:5", "GET", "/boom", "1.1", 500)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, message, args, None)
    token = _current.set(RequestRecord(b"bug-2", scope))
    try:
        assert AccessFields().filter(record)
    finally:
        _current.reset(token)
    fields = {key: getattr(record, key) for key in ("status", "method", "path", "client")}
    assert fields == {"status": 500, "method": "GET", "path": "/boom", "client": "127.0.0.1:5"}


def _child_id(queue: multiprocessing.Queue) -> None:
    from podserve.request_id import new_request_id

    queue.put(new_request_id())


def test_a_forked_worker_does_not_repeat_its_parents_ids() -> None:
    """Gunicorn's workers are forked from the master, which has imported the module."""
    from podserve.request_id import new_request_id

    parent = new_request_id()
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_id, args=(queue,))
    child.start()
    child_id = queue.get(timeout=30)
    child.join(30)
    assert child_id[:20] != parent[:20], (parent, child_id)
