"""MLServer custom runtime: the MiniLM pipeline + the 5 ms awaited I/O step.

MLServer serves the Open Inference Protocol itself, so the request bytes and path are the
same as podserve's. `predict` awaits the I/O step and runs the model in MLServer's parallel
inference workers (settings.json `parallel_workers` = podserve's worker count); adaptive
batching is on (model-settings.json: max_batch_size 32, max_batch_time 2 ms).
"""

from __future__ import annotations

import asyncio

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse

from loadtests.reference.common import IO_S, Embedder, model_dir


class MiniLMRuntime(MLModel):
    async def load(self) -> bool:
        self.embedder = Embedder(model_dir())
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        texts = [str(t) for t in StringCodec.decode_input(payload.inputs[0])]
        embedding, _ = self.embedder(texts)  # MLServer runs predict in a worker process
        await asyncio.sleep(IO_S)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("embedding", np.asarray(embedding))],
        )
