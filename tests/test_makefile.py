"""The Makefile's `run` and `clean` honour a user's own model repository (dry runs: `make -n`)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _dry_run(target: str, **env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "PODSERVE_MODEL_REPOSITORY"}
    done = subprocess.run(["make", "-n", target], cwd=ROOT, env={**base, **env},
                          capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return done.stdout


def test_run_serves_the_users_model_repository_when_it_is_set(tmp_path: Path) -> None:
    commands = _dry_run("run", PODSERVE_MODEL_REPOSITORY=str(tmp_path))
    serve = [line for line in commands.splitlines() if "podserve serve" in line]
    assert serve == [".venv/bin/podserve serve"], commands  # the environment's folder, as set
    assert "build-demo" not in commands, commands


def test_run_builds_and_serves_the_demo_models_by_default() -> None:
    commands = _dry_run("run", MODEL_REPOSITORY="demo-models-elsewhere")
    serve = [line for line in commands.splitlines() if "podserve serve" in line]
    assert serve == ["PODSERVE_MODEL_REPOSITORY=demo-models-elsewhere .venv/bin/podserve serve"]
    if not (ROOT / "demo-models-elsewhere" / ".built").exists():
        assert "podserve models build-demo demo-models-elsewhere" in commands, commands


def test_clean_removes_only_a_repository_the_demo_build_made() -> None:
    commands = _dry_run("clean", MODEL_REPOSITORY="/srv/my-models")
    assert "if [ -f /srv/my-models/.built ]; then rm -rf /srv/my-models; fi" in commands
