"""One servable model version: an ONNX Runtime session plus its processors and tensor specs."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument

from podserve import batching_demotion
from podserve.classification import load_labels
from podserve.datatypes import FLOAT_TYPES, ORT_TO_V2, V2_TO_NUMPY
from podserve.errors import BadRequest, RejectedRequests, check_rows
from podserve.model_config import ModelConfig, TensorSpec
from podserve.processors import (
    Postprocessor,
    Preprocessor,
    Tensors,
    make_postprocessor,
    make_preprocessor,
)

log = logging.getLogger(__name__)

# Dim names that exporters make up for a dynamic dim the user never named: tf2onnx writes
# `unk__<n>`, torch.onnx `<tensor>_dynamic_axes_<i>` (list-form dynamic_axes), a new one per
# tensor. They say no more than an unnamed dim, so they do not tell a batch from other rows.
_GENERATED_DIM_NAME = re.compile(r"unk__\d+|.+_dynamic_axes_\d+")

# ORT raises the shape checks that fail inside a kernel (broadcast, Reshape, MatMul, Concat)
# as `Fail`, the class it also uses for internal faults: only the message tells them apart.
# Inputs passed `validate`, so a shape that does not fit is one the client chose. Only the
# kernel's own words count (after "Status Message:"): the text before names the node, and a
# node named `/encoder/Reshape_3` failing for lack of memory is no client's error.
_SHAPE_FAILURE = re.compile(
    r"Status Message:.*("
    r"Attempting to broadcast|cannot be reshaped|dimension mismatch|[Ii]ncompatible dimensions"
    r"|mismatched dimensions|Invalid input shape|[Ss]hape mismatch)",
    re.DOTALL,
)


@dataclass(frozen=True)
class ThreadBudget:
    intra_op: int
    inter_op: int
    allow_spinning: bool


@dataclass
class BatchResult:
    """Per-request outputs of one session run, and how long each phase took (seconds)."""

    outputs: list[Tensors]
    preprocess_s: float
    infer_s: float
    postprocess_s: float
    feed: Tensors | None = None  # the session's inputs, where a pre-processor made them


class UnsplittableBatch(RuntimeError):
    """A merged run's output has no row per input row: its rows cannot be told apart."""


def _dim(value: object) -> int:
    """ORT reports dynamic dims as None or a symbolic name: both become -1."""
    return value if isinstance(value, int) and value >= 0 else -1


def _dim0(node: ort.NodeArg) -> int | str | None:
    """Dim 0 as the graph declares it: a size (0 for a scalar: nothing to batch along), the
    name of its symbol, or None where it is dynamic and unnamed (as skl2onnx writes it)."""
    if not node.shape:
        return 0
    dim = node.shape[0]
    if isinstance(dim, str):
        return None if _GENERATED_DIM_NAME.fullmatch(dim) else dim
    return dim if isinstance(dim, int) and dim >= 0 else None


def batchable(inputs: Sequence[ort.NodeArg], outputs: Sequence[ort.NodeArg]) -> bool:
    """What the graph says: requests can be concatenated along dim 0 only if it is dynamic on
    every tensor, and the inputs' dim 0s, where named, share one symbol (inputs whose dim 0s
    vary independently, queries and documents say, have no one batch dim). Whether each
    output holds one row per input row, the names cannot tell (exporters name an output's
    dims as they please: torch.onnx's `Addoutput_dim_0`): the warm-up measures it."""
    dims = [_dim0(node) for node in inputs]
    if any(isinstance(dim, int) for dim in (*dims, *(_dim0(node) for node in outputs))):
        return False
    return len({dim for dim in dims if dim is not None}) <= 1


def padded_outputs(
    preprocessor: Preprocessor | None,
    postprocessor: Postprocessor | None,
    outputs: Sequence[TensorSpec],
) -> list[str]:
    """The outputs that keep a dim the pre-processor pads per run. The tokenizer pads a run's
    texts to their longest, so such an output `[B, S, ...]` (token logits, raw hidden states)
    of merged requests would answer each with its batch-mates' length, and the model's values
    at positions the client never sent: that model's requests must run alone (and whole).
    A post-processor (mean pooling) takes that dim away: its outputs' dynamic dims (a hidden
    size ONNX Runtime could not infer) are no padding."""
    if preprocessor is None or postprocessor is not None:
        return []
    return [spec.name for spec in outputs if any(dim < 0 for dim in spec.shape[1:])]


def check_output_overrides(configured: list[TensorSpec], actual: list[TensorSpec]) -> None:
    """`outputs:` in config.yaml describes tensors the model makes, it cannot rename or cast
    them: a name the model lacks failed every request (500), a wrong datatype or shape made
    the metadata lie. Dims the config fixes where the model's are dynamic are allowed."""
    by_name = {spec.name: spec for spec in actual}
    for spec in configured:
        real = by_name.get(spec.name)
        if real is None:
            raise ValueError(
                f"configured output {spec.name!r} is not an output of the model; "
                f"its outputs are {sorted(by_name)}"
            )
        if spec.datatype != real.datatype:
            raise ValueError(
                f"configured output {spec.name!r}: datatype {spec.datatype} does not match "
                f"the model's {real.datatype}"
            )
        if not real.shape:  # a rank ORT could not infer (a Reshape to a computed shape)
            continue  # is what configuring an output is for: the config says it
        fixed_differ = any(
            want >= 0 and got >= 0 and want != got
            for want, got in zip(spec.shape, real.shape, strict=False)
        )
        if len(spec.shape) != len(real.shape) or fixed_differ:
            raise ValueError(
                f"configured output {spec.name!r}: shape {spec.shape} does not match the "
                f"model's {real.shape}"
            )


def _spec(node: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_V2.get(node.type)
    if datatype is None:
        raise ValueError(f"tensor {node.name!r} has unsupported type {node.type}")
    return TensorSpec(name=node.name, datatype=datatype, shape=[_dim(d) for d in node.shape])


def make_session(
    path: Path, threads: ThreadBudget, prepack_weights: bool = True
) -> ort.InferenceSession:
    """`prepack_weights=False` keeps ORT from copying MatMul/Gemm weights into its own packed
    buffers: the kernels read the initializers in place, which for ONNX external data are
    pages of the mapped file that every worker shares (see README, "Memory per model")."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads.intra_op
    options.inter_op_num_threads = threads.inter_op
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads burn the CPU quota that other workers need (measured: -25% peak).
    spin = "1" if threads.allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if not prepack_weights:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxModel:
    def __init__(
        self,
        name: str,
        version: str,
        path: Path,
        config: ModelConfig,
        threads: ThreadBudget,
        default_max_batch_size: int,
        default_max_batch_delay_ms: float,
        default_allow_nonfinite: bool,
        max_rows_per_request: int,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.session = make_session(path, threads, config.prepack_weights)
        self.model_inputs = [_spec(n) for n in self.session.get_inputs()]
        self.model_outputs = [_spec(n) for n in self.session.get_outputs()]
        self.preprocessor = self._make_preprocessor(config, path.parent.parent)
        self.postprocessor = self._make_postprocessor(config)
        self.inputs = config.inputs or self._public_inputs()
        if config.outputs:
            check_output_overrides(config.outputs, self._public_outputs())
        self.outputs = config.outputs or self._public_outputs()
        self.batchable = batchable(self.session.get_inputs(), self.session.get_outputs())
        if self.batchable and (
            padded := padded_outputs(self.preprocessor, self.postprocessor, self.outputs)
        ):
            self.batchable = False  # whatever `batching:` says: the padding is per run
            log.info(
                "model output keeps the pre-processor's padded dim: served unbatched",
                extra={"model": name, "version": version, "outputs": padded},
            )
        self.batching = config.batching and self.batchable
        self.max_batch_size = config.max_batch_size or default_max_batch_size
        delay = config.max_batch_delay_ms
        self.max_batch_delay_s = (default_max_batch_delay_ms if delay is None else delay) / 1000
        nonfinite = config.allow_nonfinite
        self.allow_nonfinite = default_allow_nonfinite if nonfinite is None else nonfinite
        self.max_rows_per_request = max_rows_per_request
        self._input_by_name = {spec.name: spec for spec in self.inputs}
        self._finite_inputs = [
            spec.name
            for spec in self.inputs
            if spec.datatype in FLOAT_TYPES and not self.allow_nonfinite
        ]
        self.output_specs = {spec.name: spec for spec in self.outputs}
        self.labels = load_labels(config.labels, path.parent.parent, set(self.output_specs))

    # --- construction helpers ------------------------------------------------------
    def _make_preprocessor(self, config: ModelConfig, model_dir: Path) -> Preprocessor | None:
        spec = config.preprocessor
        if spec is None:
            return None
        return make_preprocessor(spec.name, spec.options, model_dir, self.model_inputs)

    def _make_postprocessor(self, config: ModelConfig) -> Postprocessor | None:
        spec = config.postprocessor
        return make_postprocessor(spec.name, spec.options) if spec else None

    def _public_inputs(self) -> list[TensorSpec]:
        return self.preprocessor.input_specs if self.preprocessor else self.model_inputs

    def _public_outputs(self) -> list[TensorSpec]:
        if self.postprocessor:
            return self.postprocessor.output_specs(self.model_outputs)
        return self.model_outputs

    # --- per-request checks (event loop; cheap) ------------------------------------
    def validate(
        self, inputs: Tensors, datatypes: dict[str, str] | None = None, values: bool = True
    ) -> tuple[Tensors, int]:
        """Check names, datatypes, shapes and (unless `values` is false) values; return the
        inputs and their row count.

        Online requests pass `values=False`: scanning every element is CPU work that grows
        with the payload, so the inference thread does it once per batch (run_batch).
        """
        self._check_names(inputs)
        rows: set[int] = set()
        for name, array in inputs.items():
            spec = self._input_by_name[name]
            self._check_datatype(spec, (datatypes or {}).get(name))
            rows.add(self._check_tensor(spec, array))
        if values:
            self._check_values(inputs)
        if len(rows) != 1:
            raise BadRequest(f"inputs disagree on the batch dimension: {sorted(rows)}")
        count = rows.pop()
        if count < 1:
            raise BadRequest("inputs have no rows (batch dimension is 0)")
        check_rows(count, self.max_rows_per_request)
        if self.preprocessor:
            inputs = self.preprocessor.validate(inputs)
        return inputs, count

    def _check_names(self, inputs: Tensors) -> None:
        if inputs.keys() == self._input_by_name.keys():
            return
        missing = sorted(set(self._input_by_name) - set(inputs))
        unknown = sorted(set(inputs) - set(self._input_by_name))
        if unknown:
            raise BadRequest(
                f"unknown input(s) {unknown} for model '{self.name}'; "
                f"expected {sorted(self._input_by_name)}"
            )
        if missing:
            raise BadRequest(f"missing input(s) {missing} for model '{self.name}'")

    @staticmethod
    def _check_datatype(spec: TensorSpec, datatype: str | None) -> None:
        if datatype is not None and datatype != spec.datatype:
            raise BadRequest(
                f"input '{spec.name}': datatype {datatype} does not match the model's "
                f"{spec.datatype}"
            )

    def _check_tensor(self, spec: TensorSpec, array: np.ndarray) -> int:
        if array.ndim != len(spec.shape):
            raise BadRequest(
                f"input '{spec.name}': shape {list(array.shape)} has {array.ndim} dims, "
                f"model expects {len(spec.shape)} ({spec.shape})"
            )
        for axis, (got, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if want >= 0 and got != want:
                raise BadRequest(
                    f"input '{spec.name}': dim {axis} is {got}, model expects {want} "
                    f"(model shape {spec.shape})"
                )
        return int(array.shape[0]) if array.ndim else 1

    def _check_values(self, inputs: Tensors) -> None:
        for name in self._finite_inputs:
            if not np.isfinite(inputs[name]).all():
                datatype = self._input_by_name[name].datatype
                raise BadRequest(  # JSON has no NaN or Inf: a number past the type's range
                    f"input '{name}': NaN or Inf values are not allowed (a JSON number "
                    f"beyond {datatype}'s range, such as 1e39 for FP32, is Inf)"
                )

    def batch_key(self, inputs: Tensors) -> tuple:
        """Requests can share a batch only if all non-batch dims agree (tokens pad anyway:
        a model whose output keeps the padded dim is not batched, see padded_outputs)."""
        if self.preprocessor:
            return ()
        return tuple((name, a.shape[1:]) for name, a in sorted(inputs.items()))

    # --- the work (inference thread) -------------------------------------------
    def run_batch(
        self,
        batch: Sequence[Tensors],
        rows: Sequence[int],
        run_options: ort.RunOptions | None = None,
    ) -> BatchResult:
        """`run_options`: set `terminate` on them to stop the session run: a background job's
        runner does when the worker shuts down or the lease is lost, the batcher when every
        request of an online batch has given up."""
        start = time.perf_counter()
        feed = self._feed(batch)
        preprocessed = time.perf_counter()
        try:
            results = self.session.run(None, feed, run_options)
        except InvalidArgument as exc:  # shapes ORT could not reconcile: the client's input
            raise BadRequest(f"model '{self.name}' rejected the input: {exc}") from None
        except Fail as exc:
            if not _SHAPE_FAILURE.search(str(exc)):
                raise  # an internal fault: 500
            # A merged run fails for all if one request's dims do not fit: the batcher
            # reruns each alone, and only that one gets this 400.
            raise BadRequest(f"model '{self.name}' rejected the input: {exc}") from None
        raw = dict(zip(self.session_output_names, results, strict=True))
        inferred = time.perf_counter()
        outputs = self.postprocessor(raw, feed) if self.postprocessor else raw
        split = self._split(outputs, rows)
        done = time.perf_counter()
        return BatchResult(
            split,
            preprocessed - start,
            inferred - preprocessed,
            done - inferred,
            feed if self.preprocessor else None,  # else the requests' own inputs, as sent
        )

    @property
    def session_output_names(self) -> list[str]:
        return [spec.name for spec in self.model_outputs]

    def _feed(self, batch: Sequence[Tensors]) -> Tensors:
        """The session's inputs for the batch, after the value checks `validate` left out."""
        if self.preprocessor:
            self._reject_bad_values(batch)  # before the processor sees them
            return self.preprocessor(batch)
        if len(batch) == 1:
            feed = dict(batch[0])
        else:
            feed = {name: np.concatenate([r[name] for r in batch]) for name in batch[0]}
        if not all(np.isfinite(feed[name]).all() for name in self._finite_inputs):
            self._reject_bad_values(batch)  # one scan per input found a bad value: whose?
        return feed

    def _reject_bad_values(self, batch: Sequence[Tensors]) -> None:
        if not self._finite_inputs:
            return
        errors: dict[int, BadRequest] = {}
        for index, inputs in enumerate(batch):
            try:
                self._check_values(inputs)
            except BadRequest as exc:
                errors[index] = exc
        if errors and len(batch) == 1:
            raise errors[0]
        if errors:
            raise RejectedRequests(errors)

    def _split(self, outputs: Tensors, rows: Sequence[int]) -> list[Tensors]:
        """Each request's rows of every output, as views (no copy). Plain slices: np.split
        cost ~23 us for 8 requests of the tabular model against ~4 us (more than its run)."""
        if len(rows) == 1:
            return [outputs]  # whole, whatever its dim 0: nothing to tell apart
        items = list(outputs.items())
        total = sum(rows)
        for name, value in items:
            if value.shape[:1] != (total,):
                self._stop_batching(name, value.shape, total)
        parts: list[Tensors] = []
        start = 0
        for count in rows:
            end = start + count
            parts.append({name: value[start:end] for name, value in items})
            start = end
        return parts

    def _stop_batching(self, output: str, shape: tuple[int, ...], rows: int) -> NoReturn:
        """An output without one row per input row cannot be handed back by request (the
        graph left its dim 0 unnamed, so the load could not tell). Raising makes the batcher
        rerun each request alone; from now on they are not merged, so as not to run twice."""
        if self.batching:
            self.batching = False
            log.warning(
                "model output has no row per input row: batching turned off",
                extra={
                    "model": self.name,
                    "version": self.version,
                    "output": output,
                    "shape": list(shape),
                    "rows": rows,
                },
            )
            batching_demotion.publish(self)  # the pod's other workers follow
        raise UnsplittableBatch(
            f"model '{self.name}' output '{output}' has shape {list(shape)} for {rows} rows "
            "of merged requests: it cannot be split by request"
        )

    def warm_up(self) -> None:
        """One inference with a dummy row, so the first real request pays no lazy init; then,
        for a model that could batch, runs of 2 and 3 rows to check that every output has a
        row per input row. One that does not (NonZero's hits, a flattening Reshape) would mix
        the rows of merged requests: it is served unbatched."""
        self._run_dummy(1)
        if not self.batchable:
            return
        try:
            per_row = all(self._rows_out(self._run_dummy(rows)) == {rows} for rows in (2, 3))
        except Exception as exc:  # a model that runs one row but not several: unbatched too
            per_row = False
            log.warning(
                "model fails on several rows: served unbatched",
                extra={"model": self.name, "version": self.version, "error": repr(exc)},
            )
        if not per_row:
            self.batchable = self.batching = False
            log.info(
                "model outputs have no row per input row: served unbatched",
                extra={"model": self.name, "version": self.version},
            )

    def _run_dummy(self, rows: int) -> Tensors:
        """Zeros (or text) of `rows` rows where dim 0 is dynamic; other dynamic dims are 1."""
        dummy: Tensors = {}
        for spec in self.inputs:
            shape = [1 if d < 0 else d for d in spec.shape]
            if spec.shape and spec.shape[0] < 0:
                shape[0] = rows
            if spec.datatype == "BYTES":
                dummy[spec.name] = np.full(shape, "warm up", dtype=object)
            else:
                dummy[spec.name] = np.zeros(shape, dtype=V2_TO_NUMPY[spec.datatype])
        inputs, count = self.validate(dummy)
        return self.run_batch([inputs], [count]).outputs[0]

    @staticmethod
    def _rows_out(outputs: Tensors) -> set[int]:
        return {value.shape[0] if value.ndim else -1 for value in outputs.values()}
