"""Pre- and post-processors that run inside the inference thread, once per batch.

A pre-processor turns the tensors clients send into the model's feed for a whole batch
(e.g. strings -> padded token ids); a post-processor turns the model's raw outputs into
the tensors clients receive (e.g. token states -> pooled sentence embeddings).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from podserve.datatypes import INT_TYPES, V2_TO_NUMPY
from podserve.errors import BadRequest, RejectedRequests
from podserve.model_config import TensorSpec

Tensors = dict[str, np.ndarray]

# HF tokenizers read a whole text before truncating it: one 8 MB string took 12 s of the
# inference thread for its 256 tokens, holding up every model of the worker. A text longer
# than max_length x this many characters is tokenized from a part of it (see _readable).
PREFIX_CHARS_PER_TOKEN = 32
# A text whose part of max_length x 32 characters makes too few tokens to be cut there
# (words of over 100 characters make one unknown token each) is tried at twice that, and so
# on; it is read whole up to max_length x 128 characters or WHOLE_READ_CHARS, whichever is
# more, and refused beyond. Read whole at any length, 15 MB of 150-character words held the
# thread 8 s and raised the worker's memory peak by 1.1 GB, and 32 texts of 240,000
# characters (7.7 MB) took 8.6 s and left it 550 MB larger. WHOLE_READ_CHARS keeps ordinary
# documents that open with a long token-poor run (a 16,000-character hex digest before the
# prose) answered: ~0.5 us a character, a 64 Ki-character text costs ~30 ms.
MAX_CHARS_PER_TOKEN = 64
WHOLE_READ_CHARS = 1 << 16

# Length classes (padding_class): a text's length in characters stands in for its tokens
# (English: ~4.4 characters per MiniLM token), as tokenizing on the event loop would cost
# the inference thread's work twice. Texts under twice MIN_CLASS_CHARS share the lowest
# class: padding a few tokens to ~30 costs little beside a run's fixed cost.
CHARS_PER_TOKEN = 4
MIN_CLASS_CHARS = 64


class Preprocessor(Protocol):
    input_specs: list[TensorSpec]

    def validate(self, inputs: Tensors) -> Tensors:
        """Cheap per-request checks on the event loop; raise BadRequest for bad input."""

    def __call__(self, batch: Sequence[Tensors]) -> Tensors:
        """All requests of a batch -> one model feed whose dim 0 is the total row count."""

    def padding_class(self, inputs: Tensors) -> int:
        """Validated requests of one class may share a batch (see TokenizerPreprocessor)."""


class Postprocessor(Protocol):
    def output_specs(self, model_outputs: list[TensorSpec]) -> list[TensorSpec]: ...

    def __call__(self, outputs: Tensors, feed: Tensors) -> Tensors: ...


def keep_tokenizer_single_threaded() -> None:
    """Unless the user chose otherwise, tokenize in the calling (inference) thread only.

    HF tokenizers' encode_batch fans out to a rayon pool with a thread per core, in every
    worker: threads outside the budget of workers x inference threads that podserve keeps.
    Measured (8 short sentences per batch, 2 cores): 450 us CPU per batch with the pool vs
    348 us without; the pool only buys wall time by taking cores from the other worker.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TokenizerPreprocessor:
    """Strings (BYTES) -> input_ids / attention_mask / token_type_ids, padded per batch."""

    FEEDS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(
        self,
        model_dir: Path,
        model_inputs: list[TensorSpec],
        tokenizer_file: str = "tokenizer.json",
        max_length: int = 128,
        input_name: str = "text",
    ) -> None:
        from tokenizers import Tokenizer

        keep_tokenizer_single_threaded()
        path = model_dir / tokenizer_file
        if not path.exists():
            raise ValueError(f"tokenizer file {path} does not exist")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.keeps_start = _truncate_and_pad(self.tokenizer, max_length)
        self.max_length = max_length
        self.input_name = input_name
        self.feed_names = [spec.name for spec in model_inputs if spec.name in self.FEEDS]
        unknown = [spec.name for spec in model_inputs if spec.name not in self.FEEDS]
        if unknown or "input_ids" not in self.feed_names:
            raise ValueError(f"tokenizer cannot feed model inputs {unknown or ['input_ids']}")
        if "attention_mask" not in self.feed_names:
            # Texts of a batch are padded to one length: without the mask the model (and the
            # pooling) would read the padding, and a text's answer would depend on its batch.
            raise ValueError("tokenizer pads the texts of a batch: the model needs an input "
                             "'attention_mask'")  # fmt: skip
        self.feed_types = _integer_types(model_inputs, self.feed_names)
        self.input_specs = [TensorSpec(name=input_name, datatype="BYTES", shape=[-1])]

    def validate(self, inputs: Tensors) -> Tensors:
        texts = inputs[self.input_name].reshape(-1)
        decoded = np.empty(texts.shape, dtype=object)
        for i, value in enumerate(texts):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise BadRequest(
                        f"input '{self.input_name}': element {i} is not UTF-8"
                    ) from exc
            decoded[i] = value
        return {self.input_name: decoded}

    def padding_class(self, inputs: Tensors) -> int:
        """The request's length class, from its longest text: the batcher merges requests
        of one class only. A batch's texts are padded to its longest, so a short text
        batched with a long one cost as much as the long one: MiniLM, 31 four-token
        sentences with one of 256 tokens ran 3.5 s against 38 ms for 32 short ones (short
        requests' p50 went from 15 ms to 2.1 s under a mixed load). Within a class (powers
        of two of characters, capped where truncation evens texts out) the longest text
        is at most about twice the shortest."""
        longest = max((len(str(text)) for text in inputs[self.input_name]), default=0)
        cap = self.max_length * CHARS_PER_TOKEN
        return min(max(longest, MIN_CLASS_CHARS), cap).bit_length()

    def __call__(self, batch: Sequence[Tensors]) -> Tensors:
        texts: list[str] = []
        errors: dict[int, BadRequest] = {}
        for index, request in enumerate(batch):
            try:
                texts += [self._readable(str(text), element)
                          for element, text in enumerate(request[self.input_name])]  # fmt: skip
            except BadRequest as exc:
                errors[index] = exc
        if errors:  # those requests get their 400s; the batcher runs the others at once
            raise errors[0] if len(batch) == 1 else RejectedRequests(errors)
        encodings = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(columns[name], dtype=self.feed_types[name])
                for name in self.feed_names}  # fmt: skip

    def _readable(self, text: str, element: int) -> str:
        """What to tokenize of `text` for the same tokens as the whole text: the part that
        truncation keeps (its start, or its end for a tokenizer that truncates on the left)
        of max_length x 32 characters, doubled while it makes too few tokens; the whole
        text where it is short enough. Beyond that (see WHOLE_READ_CHARS) without enough
        tokens, a 400: reading it whole would cost time and memory in proportion."""
        size = self.max_length * PREFIX_CHARS_PER_TOKEN
        last_try = max(self.max_length * MAX_CHARS_PER_TOKEN, WHOLE_READ_CHARS // 2)
        while size < len(text):
            if size > last_try:
                end = "first" if self.keeps_start else "last"
                raise BadRequest(
                    f"input '{self.input_name}': element {element} has {len(text)} characters "
                    f"whose {end} {size // 2} make too few tokens to truncate it there (words "
                    f"of hundreds of characters); send at most {size} characters of such text"
                )
            part = self._part(text, size)
            if len(self.tokenizer.encode(part).overflowing) >= 2:
                return part
            size *= 2
        return text

    def _part(self, text: str, size: int) -> str:
        """`size` characters at the end that truncation keeps, cut at a space where one is
        near. Its tokens are the whole text's where they run past max_length tokens twice
        over (overflowing >= 2): the cut then lies far beyond the tokens kept."""
        if self.keeps_start:
            space = text.rfind(" ", size // 2, size)
            return text[: space if space > 0 else size]
        start = len(text) - size
        space = text.find(" ", start, start + size // 2)
        return text[space if space >= 0 else start :]  # the space kept: a BPE's word mark


def _truncate_and_pad(tokenizer: Any, max_length: int) -> bool:
    """Truncation to `max_length` and padding to the batch's longest text, keeping what the
    tokenizer file says of both (direction, stride, strategy; pad id, token and type: a
    RoBERTa's pad is 1 `<pad>`, and its position ids count from it). True if truncation
    keeps a text's start, so that a long text's prefix makes the same tokens."""
    truncation = tokenizer.truncation or {}
    tokenizer.enable_truncation(
        max_length=max_length,
        stride=truncation.get("stride", 0),
        strategy=truncation.get("strategy", "longest_first"),
        direction=truncation.get("direction", "right"),
    )
    padding = tokenizer.padding
    if padding is None:
        pad_token = next((t for t in _PAD_TOKENS if tokenizer.token_to_id(t) is not None), None)
        padding = {
            "pad_id": tokenizer.token_to_id(pad_token) if pad_token else 0,
            "pad_token": pad_token or "[PAD]",
        }
    tokenizer.enable_padding(  # length None: to the batch's longest, not a fixed length
        **{key: value for key, value in padding.items() if key != "length"}
    )
    return tokenizer.truncation["direction"] == "right"


_PAD_TOKENS = ("[PAD]", "<pad>")  # BERT's, then RoBERTa's and T5's, when the file names none


def _integer_types(model_inputs: list[TensorSpec], names: list[str]) -> dict[str, np.dtype]:
    """Token feeds in the model's own integer type (int64 from torch, often int32 from TF)."""
    types = {spec.name: spec.datatype for spec in model_inputs if spec.name in names}
    wrong = {name: datatype for name, datatype in types.items() if datatype not in INT_TYPES}
    if wrong:
        raise ValueError(f"tokenizer feeds integer token ids; the model's inputs are {wrong}")
    return {name: V2_TO_NUMPY[datatype] for name, datatype in types.items()}


class MeanPoolingPostprocessor:
    """Token states [B, S, H] -> masked mean [B, H] (optionally L2-normalised)."""

    def __init__(
        self,
        normalize: bool = True,
        output_name: str = "embedding",
        hidden_state: str = "last_hidden_state",
    ) -> None:
        self.normalize = normalize
        self.output_name = output_name
        self.hidden_state = hidden_state

    def output_specs(self, model_outputs: list[TensorSpec]) -> list[TensorSpec]:
        hidden = next((s for s in model_outputs if s.name == self.hidden_state), None)
        if hidden is None:
            raise ValueError(f"model has no output {self.hidden_state!r} to pool")
        return [TensorSpec(name=self.output_name, datatype="FP32", shape=[-1, hidden.shape[-1]])]

    def __call__(self, outputs: Tensors, feed: Tensors) -> Tensors:
        states = outputs[self.hidden_state].astype(np.float32, copy=False)
        mask = feed.get("attention_mask")
        if mask is None:
            mask = np.ones(states.shape[:2], dtype=np.float32)
        weights = mask.astype(np.float32)[:, :, None]
        pooled = (states * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.normalize:
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            pooled = pooled / np.clip(norms, 1e-12, None)
        return {self.output_name: pooled.astype(np.float32, copy=False)}


PreFactory = Callable[..., Preprocessor]
PostFactory = Callable[..., Postprocessor]

PREPROCESSORS: dict[str, PreFactory] = {"tokenizer": TokenizerPreprocessor}
POSTPROCESSORS: dict[str, PostFactory] = {"mean_pooling": MeanPoolingPostprocessor}


def make_preprocessor(
    name: str, options: dict[str, Any], model_dir: Path, model_inputs: list[TensorSpec]
) -> Preprocessor:
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}; known: {sorted(PREPROCESSORS)}")
    return PREPROCESSORS[name](model_dir, model_inputs, **options)


def make_postprocessor(name: str, options: dict[str, Any]) -> Postprocessor:
    if name not in POSTPROCESSORS:
        raise ValueError(f"unknown postprocessor {name!r}; known: {sorted(POSTPROCESSORS)}")
    return POSTPROCESSORS[name](**options)
