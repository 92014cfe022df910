"""A pod serves one repository: a worker started after the files changed refuses to serve.

Before: the workers of one pod answered the same request with different versions after one
of them was replaced (a recycle, a crash) while the repository had changed on disk.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from model_builders import affine_model, save
from podserve import repository_fingerprint
from podserve.model_repository import ModelLoadError
from podserve.repository_fingerprint import fingerprint
from server_process import ServerProcess

BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}


def configmap_style(tmp_path: Path, content: str) -> Path:
    """A kubelet-mounted ConfigMap: visible links into `..data`, itself a link to a
    timestamped directory, swapped atomically on update."""
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    stamp = repo / f"..{time.monotonic_ns()}"
    (stamp / "model").mkdir(parents=True)
    (stamp / "model" / "config.yaml").write_text(content)
    (repo / "..data_tmp").symlink_to(stamp.name)
    os.replace(repo / "..data_tmp", repo / "..data")
    if not (repo / "model").is_symlink():
        (repo / "model").symlink_to("..data/model")
    return repo


def test_the_fingerprint_follows_edits_new_versions_and_configmap_updates(tmp_path: Path) -> None:
    repo = tmp_path / "plain"
    save(affine_model(), repo, "affine", 1, {"max_batch_size": 8})
    first = fingerprint(repo)
    assert fingerprint(repo) == first
    (repo / ".hidden").write_text("ignored, as the loader ignores it")
    assert fingerprint(repo) == first
    save(affine_model(3.0), repo, "affine", 2)
    second = fingerprint(repo)
    assert second != first
    (repo / "affine" / "config.yaml").write_text("max_batch_size: 4\n")
    assert fingerprint(repo) != second

    (repo / "affine" / "latest").symlink_to(".")  # a link back up: walked once, not to ELOOP
    assert fingerprint(repo) == fingerprint(repo)

    mounted = configmap_style(tmp_path, "max_batch_size: 8\n")
    before = fingerprint(mounted)
    assert configmap_style(tmp_path, "max_batch_size: 8\n") == mounted
    assert fingerprint(mounted) != before  # the same text, a new file behind the link


def test_a_worker_checks_only_under_the_master(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(affine_model(), tmp_path, "affine", 1)
    repository_fingerprint.check_unchanged(tmp_path)  # no master: nothing to compare with
    monkeypatch.setattr(repository_fingerprint, "_at_start", fingerprint(tmp_path))
    repository_fingerprint.check_unchanged(tmp_path)
    save(affine_model(3.0), tmp_path, "affine", 2)
    with pytest.raises(ModelLoadError, match="changed on disk since the pod started"):
        repository_fingerprint.check_unchanged(tmp_path)


def test_a_replaced_worker_does_not_serve_a_changed_repository(tmp_path: Path) -> None:
    save(affine_model(2.0, 1.0), tmp_path, "affine", 1, {"max_batch_size": 8})
    with ServerProcess(tmp_path, workers=2) as server:
        save(affine_model(5.0, 0.0), tmp_path, "affine", 2)  # a new latest version on disk
        os.kill(server.worker_pids()[0], signal.SIGKILL)  # an OOM kill, say
        answers: set[float] = set()
        deadline = time.monotonic() + 60
        while server.proc.poll() is None and time.monotonic() < deadline:
            try:
                response = httpx.post(f"{server.url}/v2/models/affine/infer", json=BODY, timeout=5)
                if response.status_code == 200:
                    answers.add(response.json()["outputs"][0]["data"][0])
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        logs = server.logs()
    assert server.proc.returncode not in (None, 0), logs[-3000:]
    assert "changed on disk since the pod started" in logs, logs[-3000:]
    assert answers <= {3.0}, answers  # 1 * 2 + 1: version 1 only, never version 2's 5.0
