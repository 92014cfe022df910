"""What every MiniLM reference app shares: the model, the request format, the response.

The apps serve the same V2 request bytes at the same path as podserve, with the same model
file, tokenizer, max_length and threads budget (1 ORT intra-op thread per Gunicorn worker, no
spinning), and encode responses with orjson like podserve, so the only difference between
them is where the model runs.

Environment: REFERENCE_MODEL_DIR (a podserve model repository entry: tokenizer.json,
config.yaml, 1/model.onnx), REFERENCE_IO_MS (the awaited I/O step, default 5).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import yaml
from tokenizers import Tokenizer

IO_S = float(os.environ.get("REFERENCE_IO_MS", "5")) / 1000


class Embedder:
    """Tokenizer -> ONNX encoder -> masked mean pooling, L2-normalised (= podserve's pipeline)."""

    def __init__(self, model_dir: Path, intra_op_threads: int = 1) -> None:
        config = yaml.safe_load((model_dir / "config.yaml").read_text())
        max_length = int(config["preprocessor"]["options"].get("max_length", 128))
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        path = max((model_dir).glob("*/model.onnx"), key=lambda p: int(p.parent.name))
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """Embeddings [n, hidden] and the seconds spent in session.run."""
        encodings = self.tokenizer.encode_batch(texts)
        feed = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        feed = {k: v for k, v in feed.items() if k in self.input_names}
        started = time.perf_counter()
        states = self.session.run(["last_hidden_state"], feed)[0]
        infer_s = time.perf_counter() - started
        mask = feed["attention_mask"].astype(np.float32)[:, :, None]
        pooled = (states * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        return pooled.astype(np.float32), infer_s


def model_dir() -> Path:
    return Path(os.environ["REFERENCE_MODEL_DIR"])


def texts_of(body: bytes) -> list[str]:
    """The BYTES input of a V2 infer request."""
    doc = orjson.loads(body)
    return [str(t) for t in doc["inputs"][0]["data"]]


async def simulated_io() -> float:
    """The 5 ms awaited I/O call; returns how long it really took (loop delays included)."""
    started = time.perf_counter()
    await asyncio.sleep(IO_S)
    return time.perf_counter() - started


def queued_call(
    embedder: Embedder | None, texts: list[str], submitted: float
) -> tuple[np.ndarray, float, float]:
    """Run in a pool: also returns how long the call waited for it (perf_counter is
    system-wide on Linux, so this holds across processes too)."""
    queue_s = time.perf_counter() - submitted
    assert embedder is not None, "model not loaded"
    embedding, infer_s = embedder(texts)
    return embedding, infer_s, queue_s


def response(
    embedding: np.ndarray, infer_s: float, io_s: float, queue_s: float | None = None
) -> tuple[bytes, dict[str, Any]]:
    body = orjson.dumps(
        {
            "model_name": "minilm",
            "outputs": [
                {
                    "name": "embedding",
                    "datatype": "FP32",
                    "shape": list(embedding.shape),
                    "data": embedding.ravel(),
                }
            ],
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
    queue = f", queue;dur={queue_s * 1000:.3f}" if queue_s is not None else ""
    timing = f"features;dur={io_s * 1000:.3f}{queue}, infer;dur={infer_s * 1000:.3f}"
    return body, {"Server-Timing": timing}
