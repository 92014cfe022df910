"""The tokenizer pre-processor with real tokenizers and ONNX Runtime: token types of the
model's own inputs, no padding without a mask, long texts tokenized from a prefix."""

from __future__ import annotations

import asyncio
import copy
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from batch_support import run_alone, run_concurrently
from podserve.errors import BadRequest
from podserve.model_repository import ModelRepository, load_repository
from podserve.onnx_model import ThreadBudget
from podserve.processors import (
    CHARS_PER_TOKEN,
    MAX_CHARS_PER_TOKEN,
    PREFIX_CHARS_PER_TOKEN,
    WHOLE_READ_CHARS,
    TokenizerPreprocessor,
)
from podserve.settings import Settings

THREADS = ThreadBudget(intra_op=1, inter_op=1, allow_spinning=False)
TOKEN_INPUTS = ("input_ids", "attention_mask")


def _variant(
    model_repo: Path, dest: Path, name: str, change: Callable[[onnx.GraphProto], None]
) -> Path:
    """A copy of the demo `text` model (tokenizer, config) whose graph `change` rewrote."""
    shutil.copytree(model_repo / "text", dest / name)
    path = dest / name / "1" / "model.onnx"
    model = onnx.load(path)
    change(model.graph)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return dest


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new


def _int32_inputs(graph: onnx.GraphProto) -> None:
    """Token inputs typed INT32 (as tf2onnx exports BERTs), cast to int64 inside."""
    casts = []
    for value in graph.input:
        if value.name in TOKEN_INPUTS:
            value.type.tensor_type.elem_type = TensorProto.INT32
            _rename_uses(graph, value.name, f"{value.name}_64")
            casts.append(helper.make_node("Cast", [value.name], [f"{value.name}_64"], to=7))
    for index, cast in enumerate(casts):
        graph.node.insert(index, cast)


def _no_mask_input(graph: onnx.GraphProto) -> None:
    """No attention_mask input: the graph makes a mask of ones itself."""
    (mask,) = [value for value in graph.input if value.name == "attention_mask"]
    graph.input.remove(mask)
    ones = helper.make_tensor("one", TensorProto.INT64, [1], [1])
    graph.node.insert(0, helper.make_node("Shape", ["input_ids"], ["mask_shape"]))
    graph.node.insert(
        1, helper.make_node("ConstantOfShape", ["mask_shape"], ["attention_mask"], value=ones)
    )


@pytest.fixture(scope="module")
def repository(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    repo = tmp_path_factory.mktemp("text-variants")
    shutil.copytree(model_repo / "text", repo / "text")
    _variant(model_repo, repo, "text32", _int32_inputs)
    return load_repository(repo, Settings(), THREADS)


def test_int32_token_inputs_are_fed_in_their_own_type(repository: ModelRepository) -> None:
    texts = ["a short one", "a considerably longer sentence that pads the shorter one", ""]
    request = {"text": np.array(texts, dtype=object)}
    expected = run_alone(repository.get("text"), request)["embedding"]
    got = run_alone(repository.get("text32"), request)["embedding"]  # failed to load before
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_a_tokenizer_model_without_attention_mask_is_refused(
    model_repo: Path, tmp_path: Path
) -> None:
    """Padding a batch to one length would change such a model's answers (and mean pooling
    would average the padding): refused at load, not served wrong."""
    repo = _variant(model_repo, tmp_path, "nomask", _no_mask_input)
    with pytest.raises(Exception, match="needs an input 'attention_mask'"):
        load_repository(repo, Settings(), THREADS)


@pytest.fixture(scope="module")
def preprocessor(repository: ModelRepository) -> TokenizerPreprocessor:
    pre = repository.get("text").preprocessor
    assert isinstance(pre, TokenizerPreprocessor)
    return pre


def _long_texts(limit: int) -> dict[str, str]:
    words = "the event loop never runs the model while requests wait for a batch "
    return {
        "prose": (words * (3 * limit // len(words) + 1))[: 3 * limit],
        "no spaces": ("ünïcödé,🚀." * limit)[: 3 * limit],
        "huge words": ("x" * 900 + " ") * (3 * limit // 900),  # a few tokens per 900 chars
        "one word": "y" * (3 * limit),
    }


class RecordingTokenizer:
    """The real tokenizer, noting how long the texts are that it tokenizes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lengths: list[int] = []

    def encode(self, text: str) -> Any:
        self.lengths.append(len(text))
        return self.inner.encode(text)

    def encode_batch(self, texts: list[str]) -> Any:
        self.lengths += [len(text) for text in texts]
        return self.inner.encode_batch(texts)


def test_long_texts_make_the_same_tokens_from_a_prefix(
    preprocessor: TokenizerPreprocessor,
) -> None:
    limit = preprocessor.max_length * PREFIX_CHARS_PER_TOKEN
    for name, text in _long_texts(limit).items():
        recording = copy.copy(preprocessor)
        recording.tokenizer = RecordingTokenizer(preprocessor.tokenizer)
        feed = recording([{"text": np.array([text, "short"], dtype=object)}])
        expected = preprocessor.tokenizer.encode(text)  # the whole text, truncated
        length = len(expected.ids)
        assert feed["input_ids"][0].tolist()[:length] == expected.ids, name
        assert feed["attention_mask"][0].sum() == length, name
        # Where a prefix runs far past max_length tokens, only it is tokenized: the work is
        # bounded by max_length, not by the text. A text of few, huge words is read whole.
        read = max(recording.tokenizer.lengths)
        if name in ("prose", "no spaces"):
            assert read <= limit, (name, read)
        else:
            assert read == len(text), (name, read)


def test_a_text_sparse_in_tokens_at_its_start_is_read_in_doubling_parts(
    preprocessor: TokenizerPreprocessor,
) -> None:
    """Past a start of huge words (one token each), a prefix twice as long holds enough
    tokens: only it is read (the whole 1 MB text was)."""
    limit = preprocessor.max_length * PREFIX_CHARS_PER_TOKEN
    text = ("x" * 900 + " ") * (limit // 901 + 1) + _long_texts(limit)["prose"] * 80
    recording = copy.copy(preprocessor)
    recording.tokenizer = RecordingTokenizer(preprocessor.tokenizer)
    feed = recording([{"text": np.array([text], dtype=object)}])
    expected = preprocessor.tokenizer.encode(text).ids
    assert feed["input_ids"][0].tolist() == expected
    assert max(recording.tokenizer.lengths) <= 4 * limit < len(text)


def test_a_long_text_of_huge_words_is_refused_having_read_a_bounded_part(
    preprocessor: TokenizerPreprocessor,
) -> None:
    """15 MB of 150-character words (each one unknown token) held the inference thread 8 s
    and the worker's memory peaked 1.1 GB higher: a text that makes too few tokens in
    its last try (max_length x 64 characters or half of WHOLE_READ_CHARS, whichever is
    more) is refused past twice that, not read whole."""
    text = ("y" * 999 + " ") * 1000  # 1 MB: 1000 words, 1000 unknown tokens
    recording = copy.copy(preprocessor)
    recording.tokenizer = RecordingTokenizer(preprocessor.tokenizer)
    batch = [{"text": np.array(["fine", text], dtype=object)}]
    with pytest.raises(BadRequest, match=r"element 1 has 1000000 characters .* too few tokens"):
        recording(batch)
    whole_read = max(2 * preprocessor.max_length * MAX_CHARS_PER_TOKEN, WHOLE_READ_CHARS)
    assert max(recording.tokenizer.lengths) <= whole_read // 2
    # Up to twice that length such a text is still read whole, and answered.
    whole = text[:whole_read]
    feed = preprocessor([{"text": np.array([whole], dtype=object)}])
    assert feed["input_ids"][0].tolist() == preprocessor.tokenizer.encode(whole).ids


def test_a_document_opening_with_a_long_token_poor_run_is_still_answered(
    preprocessor: TokenizerPreprocessor,
) -> None:
    """A 16,400-character hex digest (one unknown token) before the prose: refused past
    max_length x 128 characters (16 Ki for this model), where reading it whole costs ~10 ms."""
    prose = _long_texts(preprocessor.max_length * PREFIX_CHARS_PER_TOKEN)["prose"]
    text = "0123456789abcdef" * 1025 + " " + prose[:4000]
    assert 2 * preprocessor.max_length * MAX_CHARS_PER_TOKEN < len(text) <= WHOLE_READ_CHARS
    feed = preprocessor([{"text": np.array([text], dtype=object)}])
    assert feed["input_ids"][0].tolist() == preprocessor.tokenizer.encode(text).ids


def test_a_refused_text_costs_its_batch_mates_no_rerun(repository: ModelRepository) -> None:
    """One refused text failed its whole batch, which bisection then reran: 15 good long
    texts in 8 runs (16/8/4/2/1 requests). Now only its own request gets the 400."""
    model = repository.get("text")
    prose = _long_texts(model.preprocessor.max_length * PREFIX_CHARS_PER_TOKEN)["prose"][:3000]
    requests = [{"text": np.array([f"{prose} {i}"], dtype=object)} for i in range(16)]
    requests[5] = {"text": np.array([("y" * 999 + " ") * 1000], dtype=object)}
    outcomes, records = asyncio.run(run_concurrently(model, requests, return_exceptions=True))
    assert [i for i, o in enumerate(outcomes) if isinstance(o, Exception)] == [5]
    assert isinstance(outcomes[5], BadRequest)
    assert [len(r.requests) for r in records if r.error is None] == [15]


def test_long_and_short_texts_batched_equal_alone(repository: ModelRepository) -> None:
    model = repository.get("text")
    limit = model.preprocessor.max_length * PREFIX_CHARS_PER_TOKEN
    texts = [*_long_texts(limit).values(), "a short one", ""]
    requests = [{"text": np.array([text], dtype=object)} for text in texts]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    assert max(len(r.requests) for r in records) > 1, "requests were never batched"
    for request, outcome in zip(requests, outcomes, strict=True):
        expected = run_alone(model, request)["embedding"]
        np.testing.assert_allclose(outcome.outputs["embedding"], expected, atol=1e-5)


def _raw_states_variant(model_repo: Path, dest: Path) -> Path:
    """The demo `text` model without its post-processor: it answers the encoder's token
    states `[B, S, 32]` as they are, S padded to the run's longest text (as NER logits)."""
    shutil.copytree(model_repo / "text", dest / "text_raw")
    path = dest / "text_raw" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    del config["postprocessor"], config["outputs"]
    path.write_text(yaml.safe_dump(config))
    return dest


def test_a_model_answering_the_padded_token_dim_is_not_batched(
    repository: ModelRepository,
    model_repo: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Merged with a long text, a short one was answered `[1, 128, 32]` instead of its own
    `[1, 7, 32]`: tokens it never sent. Each request of such a model runs alone, though
    its config (the demo model's) says `batching: true`."""
    with caplog.at_level(logging.INFO, logger="podserve.onnx_model"):
        raw = load_repository(_raw_states_variant(model_repo, tmp_path), Settings(), THREADS)
    model = raw.get("text_raw")
    assert model.batching is False and model.outputs[0].shape == [-1, -1, 32]
    (line,) = [r for r in caplog.records if "padded dim" in r.message]
    assert line.outputs == ["last_hidden_state"]  # type: ignore[attr-defined]
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 10)
    requests = [
        {"text": np.array(texts, dtype=object)}
        for texts in (["hello world"], [long_text] * 4, ["hello world"], [long_text])
    ]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    assert all(len(record.requests) == 1 for record in records)
    for request, outcome in zip(requests, outcomes, strict=True):
        expected = run_alone(model, request)["last_hidden_state"]
        np.testing.assert_array_equal(outcome.outputs["last_hidden_state"], expected)
    # The demo model pools the states away: its output has no padded dim, it still batches
    # (test_long_and_short_texts_batched_equal_alone: its requests merge).
    assert repository.get("text").batching


def test_a_pooled_model_whose_hidden_size_is_not_inferred_still_batches(
    model_repo: Path, tmp_path: Path
) -> None:
    """Mean pooling takes the padded dim away: a hidden size ONNX Runtime cannot infer
    (`embedding [-1, -1]`) is no padding (it had turned batching off)."""
    shutil.copytree(model_repo / "text", tmp_path / "text")
    config_path = tmp_path / "text" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    del config["outputs"]  # the served output is the post-processor's, from the model's
    config_path.write_text(yaml.safe_dump(config))
    model_path = tmp_path / "text" / "1" / "model.onnx"
    graph_model = onnx.load(model_path)
    graph = graph_model.graph
    (last,) = [node for node in graph.node if "last_hidden_state" in node.output]
    last.output[0] = "states"  # reshaped by its own shape: a hidden dim nothing infers
    graph.node.extend([
        helper.make_node("Shape", ["states"], ["states_shape"]),
        helper.make_node("Reshape", ["states", "states_shape"], ["last_hidden_state"]),
    ])  # fmt: skip
    hidden = graph.output[0].type.tensor_type.shape.dim[2]
    hidden.ClearField("dim_value")
    hidden.dim_param = "hidden"
    onnx.save(graph_model, model_path)
    model = load_repository(tmp_path, Settings(), THREADS).get("text")
    assert model.outputs[0].shape == [-1, -1]
    assert model.batching


def test_the_tokenizer_files_padding_and_truncation_are_kept(
    model_repo: Path, tmp_path: Path
) -> None:
    """A file that pads with its own token (RoBERTa: 1 `<pad>`) and truncates from the left
    keeps both; its fixed padding length gives way to padding per batch, and max_length
    is the model config's."""
    from tokenizers import Tokenizer

    from podserve.model_config import TensorSpec

    written = Tokenizer.from_file(str(model_repo / "text" / "tokenizer.json"))
    pad_id = 5
    written.enable_padding(pad_id=pad_id, pad_token=written.id_to_token(pad_id), length=512)
    written.enable_truncation(max_length=512, direction="left")
    written.save(str(tmp_path / "tokenizer.json"))
    specs = [TensorSpec(name=name, datatype="INT64", shape=[-1, -1]) for name in TOKEN_INPUTS]
    pre = TokenizerPreprocessor(tmp_path, specs, max_length=16)

    limit = pre.max_length * PREFIX_CHARS_PER_TOKEN
    long_text = _long_texts(limit)["prose"] + " returns the value of the attribute"
    feed = pre([{"text": np.array([long_text, "short"], dtype=object)}])

    reference = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    reference.no_padding()
    reference.enable_truncation(max_length=16, direction="left")
    kept_end = reference.encode(long_text).ids
    reference.enable_truncation(max_length=16, direction="right")
    assert kept_end != reference.encode(long_text).ids  # the text's end, not its start
    assert feed["input_ids"].shape == (2, 16)  # the batch's longest, not the file's 512
    assert feed["input_ids"][0].tolist() == kept_end  # the whole text read, not a prefix
    short_length = int(feed["attention_mask"][1].sum())
    assert short_length < 16
    assert set(feed["input_ids"][1, short_length:].tolist()) == {pad_id}


def test_short_texts_are_not_batched_with_long_ones(repository: ModelRepository) -> None:
    """A batch's texts are padded to its longest: merged with a long text, a short one's
    run cost as much as the long one's (MiniLM: short requests' p50 15 ms -> 2.1 s under a
    mixed load). Requests merge with those of about their own length only."""
    model = repository.get("text")
    prose = _long_texts(model.preprocessor.max_length * PREFIX_CHARS_PER_TOKEN)["prose"]
    long_texts = [prose[:600], prose[:700], prose]  # one class: past max_length x 4 chars
    texts = ["a short one", long_texts[0], "another short text", long_texts[1], "", prose]
    requests = [{"text": np.array([text], dtype=object)} for text in texts]
    outcomes, records = asyncio.run(run_concurrently(model, requests))
    batches = [[str(item.inputs["text"][0]) for item in record.requests] for record in records]
    assert sorted(batches, key=len) == [
        ["a short one", "another short text", ""],
        long_texts,
    ], "short and long texts shared a batch"
    for request, outcome in zip(requests, outcomes, strict=True):
        expected = run_alone(model, request)["embedding"]
        np.testing.assert_allclose(outcome.outputs["embedding"], expected, atol=1e-5)


def test_padding_classes_bound_the_padding(preprocessor: TokenizerPreprocessor) -> None:
    """Short texts share one class, texts truncated to max_length share the top one, and
    within a class the longest text is at most twice the shortest (in characters)."""

    def klass(*texts: str) -> int:
        return preprocessor.padding_class({"text": np.array(texts, dtype=object)})

    assert klass("") == klass("hi") == klass("a sentence of a few words")
    cap = preprocessor.max_length * CHARS_PER_TOKEN
    assert klass("y" * cap) == klass("y" * 100 * cap)
    assert klass("y" * 200) != klass("y" * 401)
    assert klass("hi", "y" * 300) == klass("y" * 300)  # a request's longest text
