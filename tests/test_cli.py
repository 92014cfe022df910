"""The `podserve` command line: demo models, start-up failures that name the file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
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


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODSERVE, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture()
def unmigrated_db(pg_server: object) -> Iterator[str]:
    import postgres

    with postgres.fresh_database(pg_server.admin_url) as url:  # type: ignore[attr-defined]
        yield url


def test_db_status_of_a_fresh_database_says_to_migrate(unmigrated_db: str) -> None:
    """Before: `schema version 0, packaged 2` and exit 1, with no word of what to do."""
    out = _cli("db", "status", "--database-url", unmigrated_db)
    assert out.returncode == 1, out.stderr
    assert out.stdout.endswith(": behind, run `podserve db migrate`\n"), out.stdout
    assert out.stdout.startswith("schema version 0, packaged ")


def test_features_load_into_a_fresh_database_says_to_migrate(
    unmigrated_db: str, tmp_path: Path
) -> None:
    """Before: `error: UndefinedTableError: relation "podserve_features" does not exist`."""
    csv = tmp_path / "users.csv"
    csv.write_text("entity_id,a,b\nu1,1,2\n")
    out = _cli("features", "load", str(csv), "--set", "tabular", "--database-url", unmigrated_db)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr == (
        "error: database schema is missing: run `podserve db migrate` "
        '(relation "podserve_features" does not exist)\n'
    )


def test_build_demo_into_a_file_is_one_line(tmp_path: Path) -> None:
    """Before: a FileExistsError traceback from Path.mkdir."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = _cli("models", "build-demo", str(blocker))
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"error: {blocker} exists and is not a directory\n"
    out = _cli("models", "build-demo", str(blocker / "repo"))  # a file on the way there
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith(f"error: cannot write the demo models to {blocker / 'repo'}: ")


def test_a_bad_serve_flag_is_named_as_the_flag() -> None:
    """Before: `error: PODSERVE_WORKERS='0': ...` for `podserve serve --workers 0`."""
    out = _cli("serve", "--workers", "0", "--port", "70000")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == [
        "error: --port (PODSERVE_PORT)='70000': Input should be less than or equal to 65535",
        "error: --workers (PODSERVE_WORKERS)='0': Input should be greater than or equal to 1",
    ]
    # From the environment, the variable is what the user set: named alone, as before.
    out = _cli("serve", env={"PODSERVE_WORKERS": "0"})
    assert out.stderr == (
        "error: PODSERVE_WORKERS='0': Input should be greater than or equal to 1\n"
    ), out.stderr


def test_dev_server_serves_and_logs_its_address(tmp_path: Path) -> None:
    """`serve --dev` (one uvicorn process with auto-reload) serves, and logs its address:
    before, uvicorn's "Uvicorn running on ..." came from the reloader's process, which had no
    log handler (log_config=None)."""
    save(affine_model(), tmp_path, "affine")
    port = free_port()
    log_path = tmp_path / "dev.log"
    env = {**os.environ, "PODSERVE_MODEL_REPOSITORY": str(tmp_path)}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*PODSERVE, "serve", "--dev", "--port", str(port)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
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
    lines = [orjson.loads(line) for line in log_path.read_text().splitlines() if line[:1] == "{"]
    running = [line for line in lines if line["msg"].startswith("Uvicorn running on ")]
    assert len(running) == 1, log_path.read_text()
    assert running[0]["msg"].startswith(f"Uvicorn running on http://127.0.0.1:{port} ")
    assert not [line for line in lines if line["logger"].startswith("watchfiles")]
