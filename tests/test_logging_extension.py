"""Triton's logging extension: the pod's log settings, read and changed at run time."""

from __future__ import annotations

import json
import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from podserve import log_control, pod_settings
from podserve.errors import BadRequest
from podserve.log_control import LogSettings
from server_process import ServerProcess

INFO = LogSettings(logging.INFO, access_log=False)
DEFAULTS = INFO.as_triton()


@pytest.mark.parametrize(
    ("start", "request_body", "level"),
    [
        (logging.INFO, {"log_verbose_level": 2}, logging.DEBUG),
        (logging.INFO, {"log_info": False}, logging.WARNING),
        (logging.INFO, {"log_warning": False}, logging.ERROR),
        (logging.INFO, {"log_error": False}, logging.CRITICAL),
        (logging.ERROR, {"log_info": True}, logging.INFO),
        (logging.DEBUG, {"log_warning": True}, logging.DEBUG),  # already shown: unchanged
        (logging.DEBUG, {"log_verbose_level": 0}, logging.INFO),
        (logging.INFO, {"log_verbose_level": 0, "log_info": True}, logging.INFO),
        (logging.WARNING, {"log_file": "", "log_format": "json"}, logging.WARNING),
    ],
)
def test_switches_move_the_threshold(start: int, request_body: dict, level: int) -> None:
    updated = LogSettings(start, access_log=False).updated(request_body)
    assert updated == LogSettings(level, access_log=False)
    for name, value in request_body.items():  # what was asked for is what is reported
        assert updated.as_triton()[name] == value or (name == "log_verbose_level" and value > 1)


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"log_info": True, "log_warning": False}, "contradict each other"),
        ({"log_verbose_level": 1, "log_error": False}, "contradict each other"),
        ({"log_verbose_level": True}, "non-negative integer"),
        ({"log_verbose_level": -1}, "non-negative integer"),
        ({"log_verbose_level": "1"}, "non-negative integer"),
        ({"log_info": 1}, "log_info must be true or false"),
        ({"access_log": "yes"}, "access_log must be true or false"),
        ({"log_file": "/var/log/podserve.log"}, "log_file must be empty"),
        ({"log_format": "ISO8601"}, "log_format must be 'json'"),
        ({"log_level": "debug"}, "unknown log settings ['log_level']"),
        (["log_info"], "must be a JSON object"),
    ],
)
def test_bad_settings_are_refused(request_body: object, message: str) -> None:
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        INFO.updated(request_body)


def test_access_log_switch_keeps_the_level() -> None:
    assert INFO.updated({"access_log": True}) == LogSettings(logging.INFO, access_log=True)
    assert INFO.updated({}) == INFO


def _write_in_child(words: pod_settings.SharedWords) -> None:
    words.write((logging.DEBUG, 1))


def test_shared_words_cross_fork() -> None:
    """What a forked worker writes, its siblings (here: the parent) read."""
    words = pod_settings.SharedWords("test", 2)
    assert words.read() == (0, (0, 0))
    child = multiprocessing.get_context("fork").Process(target=_write_in_child, args=(words,))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert words.read() == (1, (logging.DEBUG, 1))
    with pytest.raises(ValueError, match="3 values for 2 fields"):
        words.write((1, 2, 3))


def test_unknown_start_up_level_is_refused() -> None:
    assert log_control.from_settings("warning", True) == LogSettings(logging.WARNING, True)
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        log_control.from_settings("loud", False)


# --- a real 2-worker server ------------------------------------------------------------
@pytest.fixture()
def log_server(model_repo: Path) -> Iterator[ServerProcess]:
    """Its own server per test: the tests change its log settings."""
    with ServerProcess(model_repo, workers=2) as proc:
        yield proc


def _settings_per_worker(server: ServerProcess, want: int = 2) -> dict[str, dict]:
    """GET /v2/logging on fresh connections until `want` workers have answered."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 20
    while len(seen) < want and time.monotonic() < deadline:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            response = http.get("/v2/logging")
        assert response.status_code == 200, response.text
        seen[response.headers["x-podserve-worker"]] = response.json()
    assert len(seen) == want, seen
    return seen


def _wait_for_pod(server: ServerProcess, expected: dict) -> dict[str, dict]:
    """Every worker follows a change within FOLLOW_INTERVAL_S (0.5 s); allow 30 times that
    for a loaded machine (it returns as soon as they all do)."""
    deadline = time.monotonic() + 15
    while True:
        seen = _settings_per_worker(server)
        if all(s == expected for s in seen.values()) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def test_a_change_reaches_every_worker(log_server: ServerProcess) -> None:
    client = triton.InferenceServerClient(f"127.0.0.1:{log_server.port}")
    assert "logging" in client.get_server_metadata()["extensions"]
    assert client.get_log_settings() == DEFAULTS
    answer = client.update_log_settings({"log_verbose_level": 1, "access_log": True})
    expected = {**DEFAULTS, "log_verbose_level": 1, "access_log": True}
    assert answer == expected
    seen = _wait_for_pod(log_server, expected)
    assert all(s == expected for s in seen.values()), seen
    with pytest.raises(InferenceServerException, match="contradict each other"):
        client.update_log_settings({"log_info": False, "log_verbose_level": 1})
    assert all(s == expected for s in _settings_per_worker(log_server).values())


def test_changes_on_two_workers_at_once_both_hold(log_server: ServerProcess) -> None:
    """Each worker changes the pod's current settings, not its own copy of them, which may
    not have followed the other's change yet (it follows every half second)."""
    first, second = log_server.client_per_worker()
    try:
        assert first.post("/v2/logging", json={"access_log": True}).status_code == 200
        assert second.post("/v2/logging", json={"log_verbose_level": 1}).status_code == 200
    finally:
        first.close()
        second.close()
    expected = {**DEFAULTS, "access_log": True, "log_verbose_level": 1}
    seen = _wait_for_pod(log_server, expected)
    assert all(s == expected for s in seen.values()), seen


def test_access_log_on_an_open_connection(log_server: ServerProcess) -> None:
    """The switch holds for keep-alive connections opened before it was turned on."""
    with httpx.Client(base_url=log_server.url, timeout=10) as http:
        assert http.get("/v2/models/tabular/ready?before=1").status_code == 200
        with httpx.Client(base_url=log_server.url, timeout=10) as other:  # maybe another worker
            assert other.post("/v2/logging", json={"access_log": True}).status_code == 200
        _wait_for_pod(log_server, {**DEFAULTS, "access_log": True})
        assert http.get("/v2/models/tabular/ready?during=1").status_code == 200
        assert http.post("/v2/logging", json={"access_log": False}).status_code == 200
        _wait_for_pod(log_server, DEFAULTS)  # the connection may have moved to another worker
        assert http.get("/v2/models/tabular/ready?after=1").status_code == 200
    time.sleep(0.3)  # a line for `after=1` (access log off by then) would be written by now
    logs = log_server.wait_for_logs(lambda logs: "/v2/models/tabular/ready?during=1" in logs)
    assert "/v2/models/tabular/ready?during=1" in logs
    assert "/v2/models/tabular/ready?before=1" not in logs
    assert "/v2/models/tabular/ready?after=1" not in logs


def test_a_replacement_worker_takes_the_pods_setting(log_server: ServerProcess) -> None:
    """A worker forked after the change starts with it, not with PODSERVE_LOG_LEVEL."""
    with httpx.Client(base_url=log_server.url, timeout=10) as http:
        assert http.post("/v2/logging", json={"log_info": False}).json()["log_info"] is False
    expected = {**DEFAULTS, "log_info": False}
    assert all(s == expected for s in _wait_for_pod(log_server, expected).values())
    before = set(log_server.worker_pids())
    victim = min(before)
    logged_before = len(log_server.logs().splitlines())
    log_server.replace_worker(victim)
    seen = _settings_per_worker(log_server)
    assert str(victim) not in seen
    assert all(s == expected for s in seen.values()), seen
    # Its own start-up too ("Started server process", "model loaded", "models ready"): it
    # logged them at PODSERVE_LOG_LEVEL, before its first look at the pod's setting.
    new = set(log_server.worker_pids()) - before
    lines = [json.loads(line) for line in log_server.logs().splitlines()[logged_before:]
             if line.startswith("{")]  # fmt: skip
    chatter = [  # Gunicorn's own "Booting worker" line comes before any podserve code runs
        r["msg"]
        for r in lines
        if r.get("pid") in new and r["level"] == "info" and r.get("logger") != "gunicorn.error"
    ]
    assert new and not chatter, chatter


def test_bad_requests_leave_the_settings_alone(log_server: ServerProcess) -> None:
    with httpx.Client(base_url=log_server.url, timeout=10) as http:
        for body, message in (
            (b"{nope", "malformed JSON"),
            (b"[]", "must be a JSON object"),
            (b'{"log_file": "/tmp/podserve.log"}', "log_file must be empty"),
            (b'{"log_verbose_level": -3}', "non-negative integer"),
        ):
            response = http.post("/v2/logging", content=body)
            assert response.status_code == 400, response.text
            assert message in response.json()["error"]
        # What a cross-site page may send without a preflight: refused, as any non-JSON.
        change = b'{"log_verbose_level": 1}'
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            for path in ("/v2/logging", "/v2/trace/setting"):
                headers = {"content-type": content_type}
                response = http.post(path, content=change, headers=headers)
                assert response.status_code == 415, response.text
        response = http.post("/v2/logging", content=change, headers={"content-encoding": "br"})
        assert response.status_code == 415, response.text
    assert all(s == DEFAULTS for s in _settings_per_worker(log_server).values())


def _request_lines(server: ServerProcess) -> list[dict]:
    lines = (line for line in server.logs().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("msg") == "request"]


def test_verbose_logs_each_requests_phases(log_server: ServerProcess) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
    with httpx.Client(base_url=log_server.url, timeout=10) as http:
        assert http.post("/v2/models/tabular/infer", json=body).status_code == 200
        time.sleep(0.3)
        assert _request_lines(log_server) == []  # info: no per-request line
        assert http.post("/v2/logging", json={"log_verbose_level": 1}).status_code == 200
        _wait_for_pod(log_server, {**DEFAULTS, "log_verbose_level": 1})
        response = http.post("/v2/models/tabular/infer", json=body)
        assert response.status_code == 200

    def infer_lines() -> list[dict]:
        return [e for e in _request_lines(log_server) if e["path"] == "/v2/models/tabular/infer"]

    log_server.wait_for_logs(lambda _: bool(infer_lines()))  # written after the answer
    (line,) = infer_lines()
    assert line["level"] == "debug" and line["status"] == 200 and line["model"] == "tabular"
    assert line["rows"] == 1 and line["batch_rows"] == 1  # alone in its batch
    assert {"parse", "queue", "infer"} <= set(line["phases_ms"])
    assert line["ms"] >= max(line["phases_ms"].values())


def test_changes_can_be_turned_off(model_repo: Path) -> None:
    env = {"PODSERVE_ALLOW_SETTINGS_CHANGES": "false"}
    with ServerProcess(model_repo, workers=1, env=env) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        assert client.get_log_settings() == DEFAULTS
        for change in (
            lambda: client.update_log_settings({"log_verbose_level": 1}),
            lambda: client.update_trace_settings(settings={"trace_level": ["OFF"]}),
            lambda: client.update_trace_settings("affine", {"trace_level": ["OFF"]}),
        ):
            with pytest.raises(InferenceServerException, match="turned off") as err:
                change()
            assert err.value.status() == "403"
        assert client.get_log_settings() == DEFAULTS
