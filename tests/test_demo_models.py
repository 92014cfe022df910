"""The demo models: layout the runtime reads, sane outputs through onnxruntime, determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import yaml
from tokenizers import Tokenizer

from podserve import demo_models
from podserve.demo_models import build_demo_repository, build_tabular, build_text

SENTENCES = [
    "Return a new path object.",
    "The logging module defines functions and classes which implement a flexible "
    "event logging system for applications and libraries, hello world!",
]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("repo")
    assert build_demo_repository(dest) == ["tabular", "text"]
    return dest


def _session(repo: Path, model: str) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def _io(session: ort.InferenceSession) -> tuple[list, list]:
    return (
        [(i.name, i.type, i.shape) for i in session.get_inputs()],
        [(o.name, o.type, o.shape) for o in session.get_outputs()],
    )


def test_layout(repo: Path) -> None:
    found = sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file())
    assert found == [
        "tabular/1/model.onnx",
        "tabular/config.yaml",
        "tabular/labels.txt",
        "text/1/model.onnx",
        "text/config.yaml",
        "text/tokenizer.json",
    ]
    tabular = yaml.safe_load((repo / "tabular" / "config.yaml").read_text())
    assert tabular == {"max_batch_size": 64, "max_batch_delay_ms": 2.0, "batching": True,
                       "labels": {"probabilities": "labels.txt"}}  # fmt: skip
    assert (repo / "tabular" / "labels.txt").read_text() == "malignant\nbenign\n"
    text = yaml.safe_load((repo / "text" / "config.yaml").read_text())
    assert text["max_batch_size"] == 32 and text["batching"] is True
    assert text["preprocessor"] == {
        "name": "tokenizer",
        "options": {"tokenizer_file": "tokenizer.json", "max_length": 128, "input_name": "text"},
    }
    assert text["postprocessor"]["name"] == "mean_pooling"
    assert text["postprocessor"]["options"]["hidden_state"] == "last_hidden_state"
    assert text["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert text["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 32]}]


def test_tabular_classifies_breast_cancer(repo: Path) -> None:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    session = _session(repo, "tabular")
    assert _io(session) == (
        [("input", "tensor(float)", [None, 30])],
        [("label", "tensor(int64)", [None]), ("probabilities", "tensor(float)", [None, 2])],
    )
    label, proba = session.run(None, {"input": x.astype(np.float32)})
    assert label.shape == (len(y),) and proba.shape == (len(y), 2)
    assert (label == y).mean() > 0.95
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    assert ((proba >= 0) & (proba <= 1)).all()
    np.testing.assert_array_equal(label, proba.argmax(axis=1))
    # Rows are independent: a batch of one gives what the same row gives in a big batch.
    one_label, one_proba = session.run(None, {"input": x[7:8].astype(np.float32)})
    assert one_label[0] == label[7]
    np.testing.assert_allclose(one_proba[0], proba[7], atol=1e-6)


def _tokenizer(repo: Path) -> Tokenizer:
    return Tokenizer.from_file(str(repo / "text" / "tokenizer.json"))


def test_tokenizer_is_bert_like(repo: Path) -> None:
    tok = _tokenizer(repo)
    assert tok.get_vocab_size() == 2000
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]")] == [0, 1, 2, 3]
    assert tok.padding is None and tok.truncation is None  # the runtime pads and truncates
    enc = tok.encode("Hello, WORLD")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert "," in enc.tokens and enc.tokens[1] == tok.encode("hello").tokens[1]  # lowercased
    assert tok.encode("\u2603").tokens == ["[CLS]", "[UNK]", "[SEP]"]


def _embed(session: ort.InferenceSession, tok: Tokenizer, texts: list[str]) -> np.ndarray:
    encs = tok.encode_batch(texts)
    ids = np.array([e.ids for e in encs], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encs], dtype=np.int64)
    (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    assert hidden.shape == (*ids.shape, 32) and hidden.dtype == np.float32
    assert np.all(hidden[mask == 0] == 0)  # padded positions are zeroed by the mask
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / m.sum(axis=1)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_text_embedding_is_padding_and_batch_independent(repo: Path) -> None:
    session = _session(repo, "text")
    assert _io(session) == (
        [
            ("input_ids", "tensor(int64)", ["batch", "sequence"]),
            ("attention_mask", "tensor(int64)", ["batch", "sequence"]),
        ],
        [("last_hidden_state", "tensor(float)", ["batch", "sequence", 32])],
    )
    tok = _tokenizer(repo)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    lengths = [sum(e.attention_mask) for e in tok.encode_batch(SENTENCES)]
    assert lengths[0] < lengths[1]  # so the first row really is padded in the batch
    batch = _embed(session, tok, SENTENCES)
    alone = np.concatenate([_embed(session, tok, [s]) for s in SENTENCES])
    np.testing.assert_allclose(batch, alone, atol=1e-5)
    # Sane embeddings: finite, unit norm, and different sentences differ.
    assert np.isfinite(batch).all()
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    assert float(batch[0] @ batch[1]) < 0.99


def test_text_handles_max_length(repo: Path) -> None:
    session, tok = _session(repo, "text"), _tokenizer(repo)
    tok.enable_truncation(max_length=128)
    emb = _embed(session, tok, [" ".join(["word"] * 500)])
    assert emb.shape == (1, 32) and np.isfinite(emb).all()


def test_rebuild_is_byte_identical(repo: Path, tmp_path: Path) -> None:
    assert build_text(tmp_path) == "text" and build_tabular(tmp_path) == "tabular"
    for rel in ("text/1/model.onnx", "text/tokenizer.json", "tabular/1/model.onnx"):
        assert (tmp_path / rel).read_bytes() == (repo / rel).read_bytes(), rel


def test_missing_build_deps_say_how_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "skl2onnx", None)  # makes `import skl2onnx` fail
    with pytest.raises(RuntimeError, match=r"pip install 'podserve\[demo\]'"):
        demo_models.build_demo_repository(tmp_path)
    assert not any(tmp_path.iterdir())


def test_module_imports_without_build_deps() -> None:
    code = (
        "import sys; sys.modules.update(sklearn=None, skl2onnx=None, onnx=None)\n"
        "import podserve.demo_models\n"
        "assert not {'sklearn', 'skl2onnx', 'onnx'} & {m for m, v in sys.modules.items() if v}"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


_THREADS_SCRIPT = """
import os, sys
from pathlib import Path
from podserve.processors import TokenizerPreprocessor
from podserve.model_config import TensorSpec
specs = [TensorSpec(name=name, datatype="INT64", shape=[-1, -1])
         for name in ("input_ids", "attention_mask")]
pre = TokenizerPreprocessor(Path(sys.argv[1]), specs)
before = len(os.listdir("/proc/self/task"))
pre([{"text": ["a sentence to tokenize, number %d" % i for i in range(256)]}])
print(os.environ.get("TOKENIZERS_PARALLELISM"), before, len(os.listdir("/proc/self/task")))
"""


@pytest.mark.parametrize(("preset", "expected_env", "extra_threads"),
                         [(None, "false", False), ("true", "true", True)])  # fmt: skip
def test_tokenizer_stays_in_the_calling_thread_unless_asked(
    repo: Path, preset: str | None, expected_env: str, extra_threads: bool
) -> None:
    """No rayon pool beside the inference threads (thread budget), unless the user sets it."""
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    if preset is not None:
        env["TOKENIZERS_PARALLELISM"] = preset
    out = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT, str(repo / "text")],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    value, before, after = out.stdout.split()
    assert value == expected_env
    assert (int(after) > int(before)) is extra_threads, out.stdout
