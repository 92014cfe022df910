"""`prepack_weights: false` in a model's config.yaml: ORT reads the weights where they are
(for ONNX external data, the mapped file the workers share) instead of copying them into
pre-packed buffers on each worker's heap. Real servers, real ORT; RSS from /proc."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import yaml

from server_process import ServerProcess, serve_to_exit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmark's MLP builder
    sys.path.insert(0, str(ROOT))

from loadtests.bench_model_memory import mlp_model  # noqa: E402

WIDTH, LAYERS = 1024, 16  # 64 MiB of FP32 weights: far above the noise of a worker's heap
WEIGHTS_MIB = WIDTH * WIDTH * 4 * LAYERS / 2**20


def _repo(root: Path, config: dict, width: int = WIDTH, layers: int = LAYERS) -> Path:
    """A repository with the MLP, its weights in model.onnx.data (external data)."""
    path = root / "mlp" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(mlp_model(width, layers), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data")  # fmt: skip
    (root / "mlp" / "config.yaml").write_text(yaml.safe_dump(config))
    return root


def _rss_anon_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RssAnon for {pid}")


def _serve(repo: Path, rows: np.ndarray) -> tuple[float, np.ndarray]:
    """The one worker's anonymous memory once loaded and warm, and its answer for `rows`."""
    body = {"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.ravel().tolist()}]}  # fmt: skip
    with ServerProcess(repo, workers=1) as server:
        response = httpx.post(f"{server.url}/v2/models/mlp/infer", json=body, timeout=30)
        assert response.status_code == 200, response.text
        (pid,) = server.worker_pids()
        anon = _rss_anon_mib(pid)
    output = response.json()["outputs"][0]
    return anon, np.asarray(output["data"], np.float32).reshape(output["shape"])


def test_without_prepacking_a_worker_holds_no_copy_of_the_weights(tmp_path: Path) -> None:
    rows = np.random.default_rng(3).standard_normal((3, WIDTH)).astype(np.float32)
    packed_anon, packed = _serve(_repo(tmp_path / "packed", {}), rows)
    inplace_anon, inplace = _serve(_repo(tmp_path / "inplace", {"prepack_weights": False}), rows)
    # Pre-packing copies the 64 MiB into the worker's heap; without it they stay file pages.
    assert packed_anon - inplace_anon > 0.6 * WEIGHTS_MIB, (packed_anon, inplace_anon)
    np.testing.assert_allclose(inplace, packed, rtol=1e-4, atol=1e-5)
    assert np.abs(packed).max() > 0  # a real answer, not zeros twice


def test_a_bad_prepack_weights_value_fails_the_start_naming_model_and_key(
    tmp_path: Path,
) -> None:
    repo = _repo(tmp_path, {"prepack_weights": "sometimes"}, width=4, layers=1)
    code, output = serve_to_exit(repo, {})
    assert code != 0
    assert f"{repo / 'mlp'}" in output
    assert "prepack_weights" in output and "valid boolean" in output, output[-3000:]
