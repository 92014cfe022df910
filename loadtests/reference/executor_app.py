"""Variant 2 of the article: `run_in_executor` on a 1-thread pool (ORT releases the GIL)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request, Response

from loadtests.reference.common import (
    Embedder,
    model_dir,
    queued_call,
    response,
    simulated_io,
    texts_of,
)

app = FastAPI()
embedder = Embedder(model_dir())
pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")


@app.post("/v2/models/minilm/infer")
async def infer(request: Request) -> Response:
    texts = texts_of(await request.body())
    loop = asyncio.get_running_loop()
    embedding, infer_s, queue_s = await loop.run_in_executor(
        pool, queued_call, embedder, texts, time.perf_counter()
    )
    io_s = await simulated_io()
    body, headers = response(embedding, infer_s, io_s, queue_s)
    return Response(body, headers=headers, media_type="application/json")
