"""Broken models among many: every one is named in one start-up error, and a broken config
or layout fails the start before any model's session is made (real ONNX Runtime)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from model_builders import affine_model, save
from podserve.model_repository import ModelLoadError, load_repository
from podserve.onnx_model import ThreadBudget
from podserve.settings import Settings
from server_process import serve_to_exit

THREADS = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)


def _repo_with_broken_models(repo: Path) -> Path:
    """a, c, e load; b's model.onnx is no ONNX; d's config is invalid; f lacks a model.onnx."""
    for name in "abcde":
        save(affine_model(), repo, name)
    (repo / "b" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    (repo / "d" / "config.yaml").write_text("max_batch_size: 0\n")
    (repo / "f" / "1").mkdir(parents=True)
    (repo / "f" / "config.yaml").write_text("batching: false\n")
    return repo


def test_every_broken_model_is_named_in_one_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        load_repository(_repo_with_broken_models(tmp_path), Settings(), THREADS)
    message = str(caught.value)
    assert str(tmp_path / "d" / "config.yaml") in message
    assert str(tmp_path / "f" / "1" / "model.onnx") in message
    assert message.startswith("2 models failed to load:")  # the layout and config checks


def test_session_failures_are_all_named_once_layouts_and_configs_pass(tmp_path: Path) -> None:
    _repo_with_broken_models(tmp_path)
    (tmp_path / "d" / "config.yaml").unlink()
    (tmp_path / "f" / "config.yaml").unlink()
    save(affine_model(), tmp_path, "f")
    (tmp_path / "e" / "1" / "model.onnx").write_bytes(b"truncated")
    with pytest.raises(ModelLoadError) as caught:
        load_repository(tmp_path, Settings(), THREADS)
    message = str(caught.value)
    assert message.startswith("2 models failed to load:")
    for name in "be":
        assert f"{tmp_path / name / '1' / 'model.onnx'}: failed to load" in message


def test_a_broken_config_fails_before_any_session_is_made(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The config is checked in milliseconds; the models before it in order could take
    minutes to load (one 200 MB model takes ~1.2 s)."""
    for name in ("a", "b", "zz"):
        save(affine_model(), tmp_path, name)
    (tmp_path / "zz" / "config.yaml").write_text("max_batch_delay_ms: -1\n")
    with (
        caplog.at_level(logging.INFO, logger="podserve.model_repository"),
        pytest.raises(ModelLoadError, match=r"zz/config\.yaml: invalid model config"),
    ):
        load_repository(tmp_path, Settings(), THREADS)
    assert [r.getMessage() for r in caplog.records if r.getMessage() == "model loaded"] == []


def test_a_single_broken_model_keeps_its_own_message(tmp_path: Path) -> None:
    save(affine_model(), tmp_path, "a")
    (tmp_path / "a" / "config.yaml").write_text("max_batch_size: 0\n")
    with pytest.raises(ModelLoadError) as caught:
        load_repository(tmp_path, Settings(), THREADS)
    assert str(caught.value).startswith(f"{tmp_path / 'a' / 'config.yaml'}: invalid model config")


def test_the_server_names_every_broken_model_on_one_line(tmp_path: Path) -> None:
    code, output = serve_to_exit(_repo_with_broken_models(tmp_path), {})
    assert code == 3, output
    failed = [line for line in output.splitlines() if '"start-up failed"' in line]
    assert failed, output
    assert "2 models failed to load" in failed[0]
    assert "d/config.yaml" in failed[0] and "f/1/model.onnx" in failed[0]
