"""BentoML and Seldon MLServer, each in its own venv under loadtests/.venvs/, same ONNX file.

Only with `bench --competitors`. Each venv is created and installed from the package index
on first use, bounded by --install-timeout; a failed install is reported (with pip's last
lines) and that system is left out of the run rather than failing the benchmark.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from loadtests.bench_systems import ROOT, System, free_port, text_body

VENVS = ROOT / "loadtests" / ".venvs"
COMMON = ["onnxruntime", "tokenizers", "numpy", "orjson", "pyyaml"]
# MLServer 1.7 calls asyncio.get_event_loop() in its workers, which uvloop >= 0.22 refuses.
PACKAGES = {"bentoml": ["bentoml", *COMMON], "mlserver": ["mlserver", "uvloop<0.22", *COMMON]}
PATH = "/v2/models/minilm/infer"


class InstallError(RuntimeError):
    pass


def ensure_venv(name: str, timeout_s: float) -> Path:
    """The venv's python, creating and installing it first if needed."""
    python = VENVS / name / "bin" / "python"
    if python.exists() and _imports(python, name):
        return python
    subprocess.run([sys.executable, "-m", "venv", str(VENVS / name)], check=True, timeout=120)
    try:
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *PACKAGES[name]],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise InstallError(f"pip install {name} did not finish in {timeout_s:.0f} s") from exc
    if done.returncode != 0 or not _imports(python, name):
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise InstallError(f"pip install {name} failed (exit {done.returncode}):\n{tail}")
    return python


def _imports(python: Path, module: str) -> bool:
    check = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True,
                           timeout=120, check=False)  # fmt: skip
    return check.returncode == 0


def _env(args: argparse.Namespace, work: Path) -> dict[str, str]:
    return {
        "REFERENCE_MODEL_DIR": str(args.model_dir.resolve()),
        "REFERENCE_IO_MS": str(args.io_ms),
        "BENCH_WORKERS": str(args.workers),
        "PYTHONPATH": str(ROOT),
        "BENTOML_HOME": str(work / "bentoml-home"),
        "BENTOML_DO_NOT_TRACK": "True",
    }


def bentoml_system(args: argparse.Namespace, python: Path, work: Path) -> System:
    port = free_port()
    service = "loadtests.competitor_apps.bentoml_service:MiniLM"
    argv = [str(python), "-m", "bentoml", "serve", service, "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip
    return System("bentoml", "competitors", argv, _env(args, work), PATH, text_body(),
                  f"BentoML: async API + 1-thread executor, {args.workers} workers",
                  io_phase=None, port=port)  # fmt: skip


def mlserver_system(args: argparse.Namespace, python: Path, work: Path) -> System:
    port = free_port()
    home = work / "mlserver"
    (home / "minilm").mkdir(parents=True, exist_ok=True)
    settings = {"http_port": port, "grpc_port": free_port(), "metrics_port": free_port(),
                "parallel_workers": args.workers, "host": "127.0.0.1", "debug": False}  # fmt: skip
    model = {"name": "minilm", "implementation":
             "loadtests.competitor_apps.mlserver_runtime.MiniLMRuntime",
             "max_batch_size": 32, "max_batch_time": 0.002}  # fmt: skip
    (home / "settings.json").write_text(json.dumps(settings))
    (home / "minilm" / "model-settings.json").write_text(json.dumps(model))
    argv = [str(python), "-m", "mlserver.cli.main", "start", str(home)]
    return System("mlserver", "competitors", argv, _env(args, work), PATH, text_body(),
                  f"MLServer: {args.workers} parallel workers, adaptive batching 32 / 2 ms",
                  io_phase=None, port=port)  # fmt: skip


def systems(args: argparse.Namespace, _py: str) -> list[System]:
    work = Path(tempfile.mkdtemp(prefix="competitors-", dir=args.out))
    found = []
    for name, make in (("bentoml", bentoml_system), ("mlserver", mlserver_system)):
        try:
            python = ensure_venv(name, args.install_timeout)
        except (InstallError, subprocess.SubprocessError, OSError) as exc:
            print(f"{name}: left out: {exc}", flush=True)
            continue
        found.append(make(args, python, work))
    return found
