"""The `podserve` command line: demo models, start-up failures that name the file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from model_builders import affine_model, save
from server_process import PODSERVE, ServerProcess, free_port, serve_to_exit


def test_build_demo_writes_a_servable_repository(tmp_path: Path) -> None:
    out = subprocess.run(
        [*PODSERVE, "models", "build-demo", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "tabular" in out.stdout and "text" in out.stdout
    assert (tmp_path / "repo" / "tabular" / "1" / "model.onnx").exists()
    assert (tmp_path / "repo" / "text" / "tokenizer.json").exists()


def _serve_expecting_failure(repo: Path) -> str:
    status, output = serve_to_exit(repo, {})
    assert status != 0
    return output


def test_build_demo_without_the_demo_extra_is_one_line(tmp_path: Path) -> None:
    """As in the runtime image, which has no build tools: a traceback before."""
    code = (
        "import sys; sys.modules['sklearn'] = None; from podserve.cli import main; "
        f"sys.exit(main(['models', 'build-demo', {str(tmp_path)!r}]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr == (
        "error: building the demo models needs 'sklearn': pip install 'podserve[demo]'\n"
    )


def test_corrupt_model_fails_startup_naming_the_file(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "good")
    broken = tmp_path / "broken" / "3" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not an onnx file")
    output = _serve_expecting_failure(tmp_path)
    assert str(broken) in output
    assert "failed to load" in output


def test_invalid_config_fails_startup_naming_the_file(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "affine", config={"max_batch_size": 0, "colour": "red"})
    output = _serve_expecting_failure(tmp_path)
    assert str(tmp_path / "affine" / "config.yaml") in output
    assert "invalid model config" in output


def test_unknown_processor_fails_startup(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "affine", config={"preprocessor": {"name": "magic"}})
    assert "unknown preprocessor 'magic'" in _serve_expecting_failure(tmp_path)


GUNICORN_DIRECT = [
    sys.executable, "-m", "gunicorn", "-c", "python:podserve.gunicorn_conf",
    "podserve.app:create_app()",
]  # fmt: skip


@pytest.mark.parametrize(
    "command", [[*PODSERVE, "serve"], GUNICORN_DIRECT], ids=["cli", "gunicorn"]
)
def test_bad_settings_are_one_line_each_not_a_traceback(command: list[str]) -> None:
    """`gunicorn -c python:podserve.gunicorn_conf` (the README's direct form) printed
    pydantic's traceback, under Gunicorn's own, where `podserve serve` printed one line."""
    env = {
        **os.environ,
        "PODSERVE_PORT": "abc",
        "PODSERVE_WORKERS": "0",
        "PODSERVE_LOG_LEVEL": "loud",
    }
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: PODSERVE_PORT='abc': Input should be a valid integer" in out.stderr
    assert "error: PODSERVE_WORKERS='0': Input should be greater than or equal to 1" in out.stderr
    assert "error: PODSERVE_LOG_LEVEL='loud': Value error, unknown log level" in out.stderr


def test_a_bad_database_url_stops_the_start_before_models_load(tmp_path: Path) -> None:
    """Before: a traceback from asyncpg's URL parser in lifespan start-up, after every model
    had loaded, in every worker."""
    env = {**os.environ, "PODSERVE_DATABASE_URL": "postgresql://podserve:s3cret@db:54x2/test"}
    out = subprocess.run(
        [*PODSERVE, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: PODSERVE_DATABASE_URL: Value error, the database URL's port is" in out.stderr
    assert "s3cret" not in out.stderr


@pytest.mark.parametrize("url", ["", "  "])
def test_an_empty_database_url_stops_the_start(url: str) -> None:
    """asyncpg read "" as libpq's defaults: the workers connected to a local database without
    podserve's schema, and prediction-log rows spooled to disk for ever (38 MB in 2 min)."""
    env = {**os.environ, "PODSERVE_DATABASE_URL": url}
    out = subprocess.run(
        [*PODSERVE, "serve"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "error: PODSERVE_DATABASE_URL: Value error, is empty: leave it unset" in out.stderr


def test_empty_repository_fails_startup(tmp_path: Path) -> None:
    assert "holds no <model>/<version>/model.onnx" in _serve_expecting_failure(tmp_path)


def test_docs_can_be_switched_off(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "affine")
    with ServerProcess(tmp_path, workers=1, env={"PODSERVE_DOCS_ENABLED": "false"}) as server:
        assert httpx.get(f"{server.url}/openapi.json").status_code == 404
        assert httpx.get(f"{server.url}/docs").status_code == 404


def test_dev_server_serves(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "affine")
    port = free_port()
    env = {**os.environ, "PODSERVE_MODEL_REPOSITORY": str(tmp_path)}
    proc = subprocess.Popen(
        [*PODSERVE, "serve", "--dev", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("dev server never became ready")
    finally:
        proc.terminate()
        proc.wait(20)
