"""API-key / bearer authentication: accepted, rejected and missing credentials, exemptions,
key rotation through the mounted file, docs switched off, and a broken key file failing closed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from podserve import auth
from podserve.settings import Settings
from server_process import ServerProcess

INLINE_KEYS = "inline-key-0123456789abcdef, second-inline-key-fedcba9876543210"
FILE_KEY = "file-key-00112233445566778899aabbccddeeff"
ROTATED_KEY = "rotated-key-ffeeddccbbaa99887766554433221100"
BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
INFER = "/v2/models/affine/infer"


def _write_atomically(path: Path, text: str) -> None:
    """As the kubelet updates a mounted Secret: a new file renamed over the old one."""
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "api-keys"
    path.write_text(f"# podserve API keys, one per line\n{FILE_KEY}\n")
    return path


@pytest.fixture(scope="module")
def secured(model_repo: Path, key_file: Path) -> Iterator[ServerProcess]:
    env = {"PODSERVE_API_KEYS": INLINE_KEYS, "PODSERVE_API_KEYS_FILE": str(key_file)}
    with ServerProcess(model_repo, workers=2, env=env) as server:
        yield server


class KeyedServer(ServerProcess):
    """A server whose readiness probe itself needs the key."""

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"podserve exited:\n{self.logs()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(
                        f"{self.url}/v2/health/ready", timeout=2, headers={"x-api-key": FILE_KEY}
                    ).status_code
                    == 200
                ):
                    return
            time.sleep(0.05)
        raise TimeoutError(self.logs()[-3000:])


@pytest.fixture(scope="module")
def locked_down(model_repo: Path, key_file: Path) -> Iterator[ServerProcess]:
    """Key from the file only; health and metrics not exempt; docs off."""
    env = {
        "PODSERVE_API_KEYS_FILE": str(key_file),
        "PODSERVE_AUTH_EXEMPT_HEALTH": "false",
        "PODSERVE_AUTH_EXEMPT_METRICS": "false",
        "PODSERVE_DOCS_ENABLED": "false",
    }
    with KeyedServer(model_repo, workers=1, env=env) as server:
        yield server


def _post(server: ServerProcess, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{server.url}{INFER}", json=BODY, headers=headers, timeout=10)


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer inline-key-0123456789abcdef"},
        {"authorization": "bearer second-inline-key-fedcba9876543210"},
        {"x-api-key": "inline-key-0123456789abcdef"},
        {"authorization": f"Bearer {FILE_KEY}"},
        {"authorization": "Basic Zm9vOmJhcg==", "x-api-key": FILE_KEY},
    ],
    ids=["bearer", "bearer lower-case", "x-api-key", "key from file", "x-api-key beside basic"],
)
def test_accepted_credentials(secured: ServerProcess, headers: dict[str, str]) -> None:
    response = _post(secured, headers)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing credentials"),
        ({"authorization": "Basic Zm9vOmJhcg=="}, "missing credentials"),
        ({"authorization": "Bearer"}, "missing credentials"),
        ({"authorization": "Bearer inline-key-0123456789abcdeX"}, "invalid credentials"),
        ({"x-api-key": "inline-key"}, "invalid credentials"),
        ({"authorization": "Bearer inline-key-0123456789abcdef, x"}, "invalid credentials"),
    ],
    ids=["none", "basic only", "empty bearer", "one char off", "prefix", "key plus junk"],
)
def test_rejected_and_missing_credentials(
    secured: ServerProcess, headers: dict[str, str], message: str
) -> None:
    response = _post(secured, headers)
    assert response.status_code == 401, response.text
    assert message in response.json()["error"]
    assert response.headers["www-authenticate"].startswith('Bearer realm="podserve"')
    assert "0123456789" not in response.text  # the offered key is never echoed


def test_a_401_counts_for_its_route_and_model(secured: ServerProcess) -> None:
    """Authentication answers before the router: its 401 must still count for the route and
    model asked for, not as "unmatched" (the label of unknown paths)."""
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        for _ in range(3):
            assert client.post("/v2/models/affine/versions/1/infer", json=BODY).status_code == 401
        assert client.get("/v2/nowhere").status_code == 401
        wanted = (
            'podserve_requests_total{model="affine",route="/v2/models/{model_name}/versions/'
            '{model_version}/infer",status="401",version="1"}'
        )
        deadline = time.monotonic() + 10
        while wanted not in (text := client.get("/metrics").text):
            assert time.monotonic() < deadline, text[-3000:]
            time.sleep(0.2)
    assert 'route="unmatched",status="401"' in text  # an unknown path stays unmatched
    with httpx.Client(base_url=secured.url, timeout=10, headers={"x-api-key": FILE_KEY}) as client:
        [stats] = client.get("/v2/models/affine/versions/1/stats").json()["model_stats"]
    assert stats["inference_stats"]["fail"]["count"] == 0  # refused, not a failed inference


def test_probes_and_scrapes_open_everything_else_closed(secured: ServerProcess) -> None:
    with httpx.Client(base_url=secured.url, timeout=10) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert client.get("/v2/health/ready").status_code == 200
        assert client.get("/metrics").status_code == 200
        for path in ("/v2", "/v2/models/affine", "/docs", "/openapi.json", "/v1/models/affine",
                     "/v1/models", "/v2/models/stats", "/v2/models/affine/stats",
                     "/v2/models/affine/config", "/v2/logging", "/v2/trace/setting",
                     "/v2/models/affine/trace/setting"):  # fmt: skip
            assert client.get(path).status_code == 401, path
        assert client.post("/v2/repository/index").status_code == 401
        assert client.post("/v2/logging", json={"log_info": False}).status_code == 401
        assert client.post("/v2/trace/setting", json={"trace_rate": "1"}).status_code == 401
        model_settings = "/v2/models/affine/trace/setting"
        assert client.post(model_settings, json={"trace_rate": "1"}).status_code == 401
        assert client.get("/openapi.json", headers={"x-api-key": FILE_KEY}).status_code == 200


def test_key_file_rotation_without_restart(secured: ServerProcess, key_file: Path) -> None:
    _write_atomically(key_file, f"{ROTATED_KEY}\n")
    try:
        deadline = time.monotonic() + auth.RELOAD_CHECK_S + 10
        streak = 0  # both workers must have reloaded: several answers in a row
        while streak < 8 and time.monotonic() < deadline:
            new = _post(secured, {"authorization": f"Bearer {ROTATED_KEY}"}).status_code
            old = _post(secured, {"authorization": f"Bearer {FILE_KEY}"}).status_code
            streak = streak + 1 if (new, old) == (200, 401) else 0
            time.sleep(0.1)
        assert streak >= 8, "the rotated key file was not picked up"
        assert _post(secured, {"x-api-key": "inline-key-0123456789abcdef"}).status_code == 200
    finally:
        _write_atomically(key_file, f"{FILE_KEY}\n")


def test_exemptions_off_and_docs_off(locked_down: ServerProcess) -> None:
    key = {"x-api-key": FILE_KEY}
    with httpx.Client(base_url=locked_down.url, timeout=10) as client:
        assert client.get("/v2/health/ready").status_code == 401
        assert client.get("/v2/health/live").status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/v2/health/ready", headers=key).status_code == 200
        assert client.get("/metrics", headers=key).status_code == 200
        assert client.get("/docs", headers=key).status_code == 404
        assert client.get("/openapi.json", headers=key).status_code == 404
        assert client.post(INFER, json=BODY, headers=key).status_code == 200


def test_unreadable_key_file_fails_closed(model_repo: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    server = ServerProcess(model_repo, workers=1, env={"PODSERVE_API_KEYS_FILE": str(missing)})
    try:
        with pytest.raises(RuntimeError, match="exited with 3"):  # Worker failed to boot
            server.start(timeout=60)
    finally:
        server.stop()
    assert "cannot read PODSERVE_API_KEYS_FILE" in server.logs()


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = auth.ApiKeys("alpha-key, beta-key, gamma-key", None)
    calls: list[tuple[int, int]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    for candidate in ("alpha-key", "gamma-key", "wrong", "x" * 5000):
        calls.clear()
        keys.accepts(candidate)
        # all keys, every time (no early exit), on fixed-length digests (no length leak)
        assert calls == [(32, 32)] * 3, (candidate, calls)
    assert keys.accepts("beta-key") and not keys.accepts("beta-ke")


def test_parsing_keys_and_credentials() -> None:
    assert auth.parse_keys("# comment\n a, b\tc\n\n#d\ne") == ["a", "b", "c", "e"]
    assert auth.credentials([(b"authorization", b"Bearer  tok "), (b"x-api-key", b" k ")]) == [
        "tok",
        "k",
    ]
    assert auth.credentials([(b"authorization", b"Basic abc")]) == []
    with pytest.raises(ValueError, match="no API key"):
        auth.ApiKeys(" , ", None)
    assert auth.api_keys(Settings(api_keys=None, api_keys_file=None)) is None


def test_a_key_file_without_keys_stops_the_boot_and_never_drops_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Empty: the boot stops (as the README says), inline keys or not; emptied later, the
    file's keys are kept, inline keys or not (it dropped them when inline keys were set)."""
    empty = tmp_path / "empty"
    empty.write_text("# rotated out\n")
    for inline in (None, "inline-key-0123456789abcdef"):
        with pytest.raises(ValueError, match="holds no key"):
            auth.ApiKeys(inline, empty)
    key_file = tmp_path / "keys"
    key_file.write_text(f"{FILE_KEY}\n")
    for inline in (None, "inline-key-0123456789abcdef"):
        keys = auth.ApiKeys(inline, key_file)
        _write_atomically(key_file, "\n")
        monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
        keys.maybe_reload()
        assert keys.accepts(FILE_KEY), inline
        key_file.write_text(f"{FILE_KEY}\n")


def test_non_ascii_keys_match_as_clients_send_them(tmp_path: Path) -> None:
    """Keys are digested as UTF-8; the header bytes were read as latin-1, so a key such as
    "clé" sent as UTF-8 (as curl and httpx do) never matched."""
    key_file = tmp_path / "keys"
    key_file.write_text("clé-ünïcode-0123456789\n", encoding="utf-8")
    keys = auth.ApiKeys(None, key_file)
    sent = "clé-ünïcode-0123456789".encode()
    for headers in ([(b"x-api-key", sent)], [(b"authorization", b"Bearer " + sent)]):
        [candidate] = auth.credentials(headers)
        assert keys.accepts(candidate)
    [latin1] = auth.credentials([(b"x-api-key", "clé-ünïcode-0123456789".encode("latin-1"))])
    assert not keys.accepts(latin1)  # other bytes: another key
