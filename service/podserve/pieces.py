"""Requests and jobs larger than one session run of their model, run in pieces.

A run of a model's `max_batch_size` rows holds an inference thread for as long as a full
online batch of it; a request of 256 rows in one run held a worker's only thread for ~2-3 s
(a slow model) and drove the session's memory arena to its high-water mark for good. The
batcher (online requests) and db/jobs.py (background jobs) cut such inputs into pieces of at
most `piece_rows` rows and join the pieces' outputs, in order, into what one run makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from podserve.processors import Tensors

if TYPE_CHECKING:
    from podserve.onnx_model import OnnxModel


def piece_rows(model: OnnxModel) -> int | None:
    """Rows per session run of a request or job; None: it runs whole.

    Only a model whose requests the batcher merges (`batching`: its rows are independent
    and each output has a row per input row) is split, into pieces of its max_batch_size:
    a piece then holds the thread no longer than a full online batch of the model does,
    and the runs are of the size the model is tuned for. A model whose output keeps its
    pre-processor's padded dim is not batched (onnx_model.padded_outputs): its pieces'
    outputs would not fit together either."""
    return model.max_batch_size if model.batching else None


def slice_rows(inputs: Tensors, start: int, stop: int) -> Tensors:
    """Rows [start, stop) of every input, as views (no copy)."""
    return {name: array[start:stop] for name, array in inputs.items()}


def join_pieces(pieces: Sequence[Tensors], rows: Sequence[int]) -> Tensors | None:
    """The pieces' outputs concatenated along dim 0, in order: as one run would have made
    them. None where an output of some piece has no row per input row or other dims than
    the other pieces' (dims that depend on values): no concatenation is one run's output."""
    for name in pieces[0]:
        shapes = [piece[name].shape for piece in pieces]
        if any(shape[:1] != (count,) for shape, count in zip(shapes, rows, strict=True)):
            return None
        if len({shape[1:] for shape in shapes}) != 1:
            return None
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
