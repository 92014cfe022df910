"""BentoML 1.4 service: the MiniLM pipeline + the 5 ms awaited I/O step, in BentoML's own way.

An async API (I/O on the event loop) that runs the model on a 1-thread executor, with
`workers` = the same count as podserve's Gunicorn workers and one ORT intra-op thread each.
Served on the same path and with the same V2 request body as every other system.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bentoml

from loadtests.reference.common import IO_S, Embedder, model_dir

WORKERS = int(os.environ.get("BENCH_WORKERS", "2"))


@bentoml.service(workers=WORKERS, traffic={"timeout": 60, "max_concurrency": 1024})
class MiniLM:
    def __init__(self) -> None:
        self.embedder = Embedder(model_dir())
        self.pool = ThreadPoolExecutor(max_workers=1)

    @bentoml.api(route="/v2/models/minilm/infer")
    async def infer(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        texts = [str(t) for t in inputs[0]["data"]]
        loop = asyncio.get_running_loop()
        embedding, _ = await loop.run_in_executor(self.pool, self.embedder, texts)
        await asyncio.sleep(IO_S)
        return {
            "model_name": "minilm",
            "outputs": [{"name": "embedding", "datatype": "FP32",
                         "shape": list(embedding.shape), "data": embedding.ravel().tolist()}],
        }  # fmt: skip
