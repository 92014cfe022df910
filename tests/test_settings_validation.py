"""Settings whose value would be read as something else stop the start, naming the setting:
a blank path (the working directory), a blank PODSERVE_API_KEYS (no authentication), a host
with a port or scheme, a stall bound shorter than the loop's tick. Oversubscribed inference
threads are warned of once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from podserve import cpu_quota, runtime
from podserve.runtime import resolve_workers
from podserve.settings import Settings, settings_errors
from server_process import ServerProcess, serve_to_exit

PATH_SETTINGS = ("model_repository", "spool_dir", "prometheus_multiproc_dir", "api_keys_file")


def _errors(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> list[str]:
    monkeypatch.setenv(f"PODSERVE_{name.upper()}", value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return settings_errors(caught.value)


@pytest.mark.parametrize("value", ["", "  "])
@pytest.mark.parametrize("name", PATH_SETTINGS)
def test_a_blank_path_setting_is_an_error_not_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    [error] = _errors(monkeypatch, name, value)
    assert error.startswith(f"PODSERVE_{name.upper()}={value!r}: ")
    assert "is empty" in error and "leave it unset" in error


@pytest.mark.parametrize("value", ["", " ", ",", " , \n"])
def test_a_set_but_blank_api_keys_is_an_error_not_auth_off(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    [error] = _errors(monkeypatch, "api_keys", value)
    assert error.startswith("PODSERVE_API_KEYS: ")  # no value shown: it is a secret
    assert "holds no key" in error


@pytest.mark.parametrize(
    "value",
    ["", " ", "127.0.0.1:8000", "http://127.0.0.1", "[::1]", "10.0.0.256", "a b", "-pod", "x/y"],
)
def test_a_host_with_a_port_scheme_or_nothing_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    [error] = _errors(monkeypatch, "host", value)
    assert error.startswith(f"PODSERVE_HOST={value!r}: ")


@pytest.mark.parametrize(
    "value", ["127.0.0.1", "0.0.0.0", "::", "::1", "localhost", "pod-0.podserve.svc.local."]
)
def test_ip_addresses_and_host_names_are_hosts(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PODSERVE_HOST", value)
    assert Settings().host == value


@pytest.mark.parametrize(("value", "valid"), [("0.001", False), ("0.4", False), ("0", True)])
def test_a_stall_bound_is_off_or_several_ticks(
    monkeypatch: pytest.MonkeyPatch, value: str, valid: bool
) -> None:
    monkeypatch.setenv("PODSERVE_LOOP_STALL_S", value)
    if valid:
        assert Settings().loop_stall_s == float(value)
    else:
        assert "must be 0 (off) or at least 0.5 s" in _errors(monkeypatch, "loop_stall_s", value)[0]
    monkeypatch.setenv("PODSERVE_LOOP_STALL_S", "0.5")
    assert Settings().loop_stall_s == 0.5


def test_a_blank_metrics_dir_leaves_the_working_directory_alone(
    affine_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The metrics directory's clean-up deleted every *.db file of the working directory."""
    users_file = tmp_path / "customers.db"
    users_file.write_bytes(b"a user's database")
    monkeypatch.chdir(tmp_path)
    try:
        status, output = serve_to_exit(affine_repo, {"PODSERVE_PROMETHEUS_MULTIPROC_DIR": ""}, 20)
    finally:  # also when the server did not stop: what it deleted is the failure to show
        assert users_file.exists(), "the working directory's *.db files were deleted"
    assert status == 2, output[-2000:]
    assert output.startswith("error: PODSERVE_PROMETHEUS_MULTIPROC_DIR='': "), output[-2000:]


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"PODSERVE_API_KEYS": ""}, "error: PODSERVE_API_KEYS: Value error, holds no key"),
        # Gunicorn retried its bind for ~6 s, then named neither the setting nor the cause.
        (
            {"PODSERVE_HOST": "podserve-no-such-host.invalid"},
            "error: PODSERVE_HOST='podserve-no-such-host.invalid': cannot be resolved",
        ),
    ],
)
def test_the_start_stops_with_one_line(affine_repo: Path, env: dict[str, str], line: str) -> None:
    status, output = serve_to_exit(affine_repo, env, 30)
    assert status == 2 and output.startswith(line), output[-2000:]
    assert "Traceback" not in output


@pytest.mark.parametrize("quota", [0.5, 1.0, 1.5, 2.0, 3.7, 64.0])
def test_the_default_threads_never_oversubscribe(
    monkeypatch: pytest.MonkeyPatch, quota: float
) -> None:
    from podserve.runtime import thread_oversubscription

    monkeypatch.delenv("WEB_CONCURRENCY", raising=False)
    monkeypatch.setattr(cpu_quota, "cpu_limit", lambda *args: quota)
    monkeypatch.setattr(runtime, "cpu_limit", lambda *args: quota)
    settings = Settings()
    assert thread_oversubscription(settings, resolve_workers(settings)) is None
    found = thread_oversubscription(Settings(workers=6, pool_threads=4, ort_intra_op_threads=8), 6)
    assert found == {
        "workers": 6,
        "pool_threads": 4,
        "intra_op_threads": 8,
        "threads": 192,
        "cpus": math.ceil(quota),
    }


def test_oversubscribed_threads_are_warned_of_once_by_the_master(affine_repo: Path) -> None:
    cpus = math.ceil(cpu_quota.cpu_limit())
    env = {"PODSERVE_ORT_INTRA_OP_THREADS": str(cpus)}  # x 2 workers: twice the quota
    with ServerProcess(affine_repo, workers=2, env=env) as server:
        master = server.proc.pid if server.proc is not None else None
        logs = server.logs()
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    warnings = [entry for entry in lines if "oversubscribe" in entry["msg"]]
    assert len(warnings) == 1, logs[-3000:]
    [warning] = warnings
    assert warning["level"] == "warning" and warning["pid"] == master
    assert {key: warning[key] for key in ("workers", "intra_op_threads", "threads", "cpus")} == {
        "workers": 2,
        "intra_op_threads": cpus,
        "threads": 2 * cpus,
        "cpus": cpus,
    }
    assert "PODSERVE_ORT_INTRA_OP_THREADS" in warning["msg"]
