"""The hardware ceiling: raw ONNX Runtime throughput in-process, no HTTP.

`workers` processes (as many as podserve's Gunicorn workers), each one session with one
intra-op thread and no spinning (podserve's thread budget), each running the same tokenized
sentence at a fixed batch size for a bounded time. Processes, not threads, so the GIL
cannot lower the ceiling (it matters for tiny models: findings, tabular 167k/s vs 435k/s).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class CeilingPoint:
    batch: int
    rows_per_s: float
    infer_ms_p50: float  # one session.run of the whole batch
    cpu_ms_per_row: float  # CPU time per row: unlike rows/s, barely moved by other load


def _session(path: str):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _text_feed(model_dir: Path, sentence: str, batch: int, names: set[str]) -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    encoding = tokenizer.encode(sentence)
    feed = {
        "input_ids": np.array([encoding.ids] * batch, dtype=np.int64),
        "attention_mask": np.array([encoding.attention_mask] * batch, dtype=np.int64),
        "token_type_ids": np.array([encoding.type_ids] * batch, dtype=np.int64),
    }
    return {k: v for k, v in feed.items() if k in names}


def _worker(
    model_path: str, text: str | None, width: int, batch: int, duration_s: float, out: mp.Queue
) -> None:
    session = _session(model_path)
    names = {i.name for i in session.get_inputs()}
    if text is not None:
        feed = _text_feed(Path(model_path).parent.parent, text, batch, names)
    else:
        feed = {next(iter(names)): np.random.default_rng(0).random((batch, width), np.float32)}
    for _ in range(5):  # warm up
        session.run(None, feed)
    times: list[float] = []
    start, cpu_start = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < duration_s and len(times) < 1_000_000:
        began = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - began)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rows = len(times) * batch
    out.put((rows / elapsed, float(np.median(times)), 1000 * cpu / rows))


def measure(
    model_path: Path,
    batch: int,
    workers: int,
    duration_s: float,
    text: str | None = None,
    width: int = 30,
) -> CeilingPoint:
    """Rows per second of `workers` concurrent single-thread sessions at one batch size."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited ORT thread pools
    out: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(str(model_path), text, width, batch, duration_s, out))
        for _ in range(workers)
    ]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=duration_s + 120) for _ in procs]
    for proc in procs:
        proc.join(timeout=10)
    rate = sum(r[0] for r in results)
    infer_ms = float(np.median([r[1] for r in results])) * 1000
    return CeilingPoint(batch, rate, infer_ms, float(np.median([r[2] for r in results])))


def sweep(
    model_path: Path,
    batches: list[int],
    workers: int,
    duration_s: float,
    text: str | None = None,
    width: int = 30,
) -> list[CeilingPoint]:
    return [measure(model_path, b, workers, duration_s, text, width) for b in batches]
