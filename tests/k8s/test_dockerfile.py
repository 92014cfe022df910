"""The Dockerfile's structure, and its runtime stage reproduced outside Docker (slow)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_support import CHART, ROOT

DOCKERFILE = ROOT / "Dockerfile"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for arg in self.args("ENV"):
            for item in shlex.split(arg):
                key, _, value = item.partition("=")
                out[key] = value
        return out

    def arg_defaults(self) -> dict[str, str]:
        return dict(a.split("=", 1) for a in self.args("ARG") if "=" in a)


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage (continuations joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        logical.append(pending.strip())
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, arg = line.partition(" ")
        if keyword.upper() == "FROM":
            match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", arg.strip(), re.IGNORECASE)
            assert match, line
            stages.append(Stage(match[1], match[2] or str(len(stages))))
        else:
            stages[-1].instructions.append((keyword.upper(), arg.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
BUILD, RUNTIME = STAGES[0], STAGES[-1]


def test_multi_stage_same_pinned_base() -> None:
    assert [s.name for s in STAGES] == ["build", "runtime"]
    assert BUILD.base == RUNTIME.base
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", RUNTIME.base), RUNTIME.base


def test_demo_models_built_in_build_stage_only() -> None:
    build_runs = " ".join(BUILD.args("RUN"))
    assert "podserve models build-demo /models" in build_runs
    assert "[demo]" in build_runs
    runtime_text = " ".join(arg for _, arg in RUNTIME.instructions)
    for build_only in ("[demo]", "skl2onnx", "scikit-learn", "onnx>="):
        assert build_only not in runtime_text, build_only
    assert any(
        a.startswith("--from=build") and a.endswith("/models /models") for a in RUNTIME.args("COPY")
    )


def test_runs_as_fixed_non_root_user_matching_chart() -> None:
    (user,) = RUNTIME.args("USER")
    defaults = RUNTIME.arg_defaults()
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m[1]], user)
    assert resolved == f"{VALUES['podSecurity']['runAsUser']}:{VALUES['podSecurity']['runAsGroup']}"
    assert int(resolved.split(":")[0]) > 0


def test_entrypoint_and_labels() -> None:
    assert RUNTIME.args("ENTRYPOINT") == ['["podserve", "serve"]']
    labels = " ".join(RUNTIME.args("LABEL"))
    for key in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_env_matches_chart_paths() -> None:
    env = RUNTIME.env()
    assert env["PODSERVE_HOST"] == "0.0.0.0"
    assert env["PODSERVE_PORT"] == str(VALUES["server"]["port"])
    assert RUNTIME.args("EXPOSE") == [str(VALUES["server"]["port"])]
    assert env["PODSERVE_MODEL_REPOSITORY"] == VALUES["modelRepository"]["path"]
    assert env["PODSERVE_SPOOL_DIR"] == VALUES["storage"]["spoolPath"]
    metrics = VALUES["storage"]["metricsPath"]
    assert env["PODSERVE_PROMETHEUS_MULTIPROC_DIR"] == env["PROMETHEUS_MULTIPROC_DIR"] == metrics
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"  # the root filesystem is read-only


def test_dockerignore_admits_exactly_what_is_copied() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "allow-list: exclude everything, then re-include"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = {
        src.rstrip("/")
        for stage in STAGES
        for arg in stage.args("COPY")
        if not arg.startswith("--from")
        for src in arg.split()[:-1]
        if not src.startswith("--")
    }
    assert copied <= allowed, copied - allowed
    for path in ("pyproject.toml", "service"):
        assert (ROOT / path).exists(), path


def test_writable_dirs_exist_for_plain_docker_run() -> None:
    runs = " ".join(RUNTIME.args("RUN"))
    for path in (VALUES["storage"]["spoolPath"], VALUES["storage"]["metricsPath"]):
        assert path in runs, path


def test_runtime_pip_is_offline_from_built_wheels() -> None:
    runs = " ".join(RUNTIME.args("RUN"))
    assert "--mount=type=bind,from=build,source=/wheels" in runs
    assert "--no-index --find-links /wheels podserve" in runs


def test_readme_copied_exists_for_setuptools() -> None:
    # pyproject.toml names README.md as the readme: the build stage copies it.
    assert "README.md" in " ".join(BUILD.args("COPY"))
    assert Path(ROOT / "pyproject.toml").read_text().count('readme = "README.md"') == 1


# --- the runtime stage, reproduced outside Docker ------------------------------------------------

RUNTIME_UID = VALUES["podSecurity"]["runAsUser"]
BUILD_ONLY_MODULES = ("sklearn", "skl2onnx", "onnx")


@dataclass
class RuntimeInstall:
    root: Path
    venv: Path
    models: Path


def sh(cmd: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )
    return proc


def make_read_only(path: Path) -> None:
    for item in [path, *path.rglob("*")]:
        item.chmod(0o555 if item.is_dir() else 0o444)


@pytest.fixture(scope="module")
def runtime_install() -> Iterator[RuntimeInstall]:
    """The Dockerfile's runtime stage without Docker: the project wheel (no extras) in a fresh
    venv, and the demo models built separately (as the build stage does) and made read-only."""
    # World-readable root, so the server can run as the image's non-root UID when we are root.
    root = Path(tempfile.mkdtemp(prefix="podserve-runtime-"))
    root.chmod(0o755)
    try:
        sh(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--no-deps",
                "-w",
                str(root / "wheels"),
                str(ROOT),
            ]
        )
        (wheel,) = (root / "wheels").glob("podserve-*.whl")
        sh([sys.executable, "-m", "venv", str(root / "venv")])
        sh([str(root / "venv" / "bin" / "pip"), "install", "-q", str(wheel)])
        models = root / "models"
        sh([sys.executable, "-m", "podserve.cli", "models", "build-demo", str(models)])
        make_read_only(models)
        yield RuntimeInstall(root, root / "venv", models)
    finally:
        for item in [root, *root.rglob("*")]:
            if not item.is_symlink():
                item.chmod(0o755 if item.is_dir() else 0o644)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_runtime_venv_has_no_build_only_packages(runtime_install: RuntimeInstall) -> None:
    probe = (
        f"import importlib.util as u; print([m for m in {BUILD_ONLY_MODULES!r} if u.find_spec(m)])"
    )
    out = sh([str(runtime_install.venv / "bin" / "python"), "-c", probe]).stdout.strip()
    assert out == "[]", f"build-only packages in the runtime venv: {out}"


def writable_dir(path: Path, uid: int | None) -> Path:
    path.mkdir(parents=True)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"podserve exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"not ready after {timeout}s")


def infer_tabular(url: str) -> dict[str, Any]:
    body = {"inputs": [{"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [0.5] * 30}]}
    request = urllib.request.Request(
        f"{url}/v2/models/tabular/infer",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.load(resp)


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.mark.slow
def test_podserve_serve_runs_like_the_container(runtime_install: RuntimeInstall) -> None:
    """ENTRYPOINT `podserve serve` from the runtime venv: non-root (when we are root), read-only
    models, writes only to the spool, Prometheus and tmp directories; drains on SIGTERM."""
    as_root = os.geteuid() == 0
    uid = RUNTIME_UID if as_root else None
    work = runtime_install.root / f"run-{time.monotonic_ns()}"
    dirs = {name: writable_dir(work / name, uid) for name in ("tmp", "spool", "prometheus")}
    port = free_port()
    env = {
        "PATH": f"{runtime_install.venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(dirs["tmp"]),
        "TMPDIR": str(dirs["tmp"]),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PODSERVE_HOST": "127.0.0.1",
        "PODSERVE_PORT": str(port),
        "PODSERVE_WORKERS": "2",
        "PODSERVE_GRACEFUL_TIMEOUT_S": "10",
        "PODSERVE_MODEL_REPOSITORY": str(runtime_install.models),
        "PODSERVE_SPOOL_DIR": str(dirs["spool"]),
        "PODSERVE_PROMETHEUS_MULTIPROC_DIR": str(dirs["prometheus"]),
        "PROMETHEUS_MULTIPROC_DIR": str(dirs["prometheus"]),
        "PODSERVE_TRACING_ENABLED": "false",
    }
    drop = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if as_root else []
    before = snapshot(runtime_install.models)
    log = (work / "server.log").open("wb")
    proc = subprocess.Popen(
        [*drop, str(runtime_install.venv / "bin" / "podserve"), "serve"],
        env=env,
        cwd=dirs["tmp"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        out = infer_tabular(url)
        assert out["model_name"] == "tabular" and out["outputs"], out
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as resp:
            assert b"podserve_requests_total" in resp.read()
        assert any(dirs["prometheus"].iterdir()), "multiprocess metrics not in the given directory"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        if proc.returncode not in (0, None):
            print((work / "server.log").read_text(errors="replace")[-4000:])
    assert snapshot(runtime_install.models) == before, "the server wrote into the model directory"
